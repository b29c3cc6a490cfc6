"""A training process killed with SIGKILL mid-run resumes to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import tiny_overrides

from medgemma_lib import checkpoints

SCRIPT = Path(__file__).with_name("train_script.py")


def _run(overrides, *extra, result=None):
    cmd = [sys.executable, str(SCRIPT), *extra]
    if result:
        cmd += ["--result", str(result)]
    return subprocess.run([*cmd, *overrides], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    common = dict(max_steps=8, save_steps=2, eval_steps=4, save_total_limit=2, logging_steps=1)

    straight = _run(tiny_overrides(tiny_model_dir, tmp_path, "straight", **common), result=tmp_path / "straight.json")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_overrides = tiny_overrides(tiny_model_dir, tmp_path, "killed", **common)
    killed = _run(killed_overrides, "--kill-at-save", "6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    # checkpoint-6 was written but the process died before marking it complete
    assert (ckpt_dir / "checkpoint-6").is_dir() and not checkpoints.is_complete(ckpt_dir / "checkpoint-6")
    assert checkpoints.latest_complete_checkpoint(ckpt_dir).name == "checkpoint-4"
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = _run(killed_overrides, "--resume", result=tmp_path / "resumed.json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4" in resumed.stdout and "未寫完的檢查點" in resumed.stdout

    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert b["global_step"] == a["global_step"] == 8
    assert b["resumed_from"].endswith("checkpoint-4")
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-3)
    assert b["final_eval_loss"] == pytest.approx(a["final_eval_loss"], rel=1e-3)
    assert b["initial_eval_loss"] == pytest.approx(a["initial_eval_loss"], rel=1e-6)  # kept from the first attempt
    # the adapters themselves agree
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key] - wb[key]).abs().max().item() < 1e-3 * max(1e-3, wa[key].abs().max().item()), key
    # the resumed log continues the first attempt's log: every step 1..8 has a loss
    from medgemma_lib.monitor import loss_series, read_log

    train, val = loss_series(read_log(tmp_path / "killed" / "train_log.jsonl"))
    assert [s for s, _ in train] == list(range(1, 9))
    assert [s for s, _ in val] == [0, 4, 8]
    assert [c.name for c in checkpoints.list_checkpoints(ckpt_dir)] == ["checkpoint-6", "checkpoint-8"]
    assert all(checkpoints.is_complete(c) for c in checkpoints.list_checkpoints(ckpt_dir))


def test_half_written_checkpoint_is_never_chosen(tmp_path):
    """Marker missing, marker listing a file that was later truncated, or required files absent."""
    root = tmp_path / "checkpoints"

    def make(step, complete=True):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
            (d / name).write_bytes(b"x" * 100)
        if complete:
            checkpoints.write_completion_marker(d)
        return d

    make(2)
    good = make(4)
    make(6, complete=False)  # killed before the marker
    truncated = make(8)
    (truncated / "optimizer.pt").write_bytes(b"x" * 10)  # size no longer matches the marker
    partial = make(10, complete=False)
    (partial / "optimizer.pt").unlink()
    checkpoints.write_completion_marker(partial)  # a marker, but the optimizer is missing
    assert checkpoints.latest_complete_checkpoint(root) == good
    removed = {p.name for p in checkpoints.remove_incomplete_checkpoints(root)}
    assert removed == {"checkpoint-6", "checkpoint-8", "checkpoint-10"}
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]
