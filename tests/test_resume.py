"""A training process killed with SIGKILL mid-run resumes to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli
from train_helpers import tiny_overrides

from medgemma_lib.training import checkpoints

SCRIPT = Path(__file__).with_name("train_script.py")
ROOT = SCRIPT.parents[1]


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
    assert (
        "checkpoint-4 接續" in resumed.stdout
        and "已移除無法使用的檢查點 checkpoint-6" in resumed.stdout
        and "沒有完成標記" in resumed.stdout
    )

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
    from medgemma_lib.training.monitor import loss_series, read_log

    train, val = loss_series(read_log(tmp_path / "killed" / "train_log.jsonl"))
    assert [s for s, _ in train] == list(range(1, 9))
    assert [s for s, _ in val] == [0, 4, 8]
    assert [c.name for c in checkpoints.list_checkpoints(ckpt_dir)] == ["checkpoint-6", "checkpoint-8"]
    assert all(checkpoints.is_complete(c) for c in checkpoints.list_checkpoints(ckpt_dir))


def _safetensors(path, value=1.0):
    import torch
    from safetensors.torch import save_file

    save_file({"lora_A": torch.full((8, 4), value), "lora_B": torch.zeros(4, 8)}, str(path))


def _make_checkpoint(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
        (d / name).write_bytes(b"x" * 100)
    _safetensors(d / "adapter_model.safetensors", float(step))
    if complete:
        checkpoints.write_completion_marker(d)
    return d


def _flip_bytes(path, offset_from_end=16):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the recorded SHA-256 can tell


def test_half_written_or_damaged_checkpoint_is_never_chosen(tmp_path):
    """Marker missing, a file truncated or with other bytes after saving, required files absent."""
    root = tmp_path / "checkpoints"
    _make_checkpoint(root, 2)
    good = _make_checkpoint(root, 4)
    _make_checkpoint(root, 6, complete=False)  # killed before the marker
    truncated = _make_checkpoint(root, 8)
    (truncated / "optimizer.pt").write_bytes(b"x" * 10)  # size no longer matches the marker
    partial = _make_checkpoint(root, 10, complete=False)
    (partial / "optimizer.pt").unlink()
    checkpoints.write_completion_marker(partial)  # a marker, but the optimizer is missing
    flipped = _make_checkpoint(root, 12)
    _flip_bytes(flipped / "adapter_model.safetensors")  # bit rot: same size, other bytes
    cut = _make_checkpoint(root, 14, complete=False)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    checkpoints.write_completion_marker(cut)  # marker matches the cut file, but the safetensors header does not

    assert checkpoints.latest_complete_checkpoint(root) == good
    reasons = {p.name: why for p, why in checkpoints.remove_incomplete_checkpoints(root)}
    assert set(reasons) == {"checkpoint-6", "checkpoint-8", "checkpoint-10", "checkpoint-12", "checkpoint-14"}
    assert "完成標記" in reasons["checkpoint-6"]
    assert "optimizer.pt" in reasons["checkpoint-8"] and "10 位元組" in reasons["checkpoint-8"]
    assert "缺少 optimizer.pt" in reasons["checkpoint-10"]
    assert "adapter_model.safetensors" in reasons["checkpoint-12"] and "SHA-256" in reasons["checkpoint-12"]
    assert "adapter_model.safetensors" in reasons["checkpoint-14"] and "被截斷" in reasons["checkpoint-14"]
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]


def test_old_size_only_markers_still_accepted(tmp_path):
    d = _make_checkpoint(tmp_path, 3, complete=False)
    sizes = {p.name: p.stat().st_size for p in d.iterdir()}
    (d / checkpoints.MARKER).write_text(json.dumps({"step": 3, "files": sizes}))
    assert checkpoints.is_complete(d)


def test_adapter_problems_are_named(tmp_path):
    from medgemma_lib.core.errors import ModelError

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    _safetensors(adapter / "adapter_model.safetensors")
    checkpoints.write_completion_marker(adapter)
    assert checkpoints.adapter_problem(adapter) is None

    _flip_bytes(adapter / "adapter_model.safetensors")
    assert "SHA-256" in checkpoints.adapter_problem(adapter)
    # with a complete checkpoint beside it, the message says how to get the adapter back
    ckpt = _make_checkpoint(tmp_path / "run" / "checkpoints", 5)
    with pytest.raises(ModelError) as err:
        checkpoints.verify_adapter(adapter, run_dir=tmp_path / "run")
    assert "損毀" in str(err.value) and ckpt.name in str(err.value) and "--resume" in str(err.value)

    (adapter / checkpoints.MARKER).unlink()  # adapters from elsewhere have no marker: header and size still checked
    _safetensors(adapter / "adapter_model.safetensors")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert "被截斷" in checkpoints.adapter_problem(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    assert "標頭" in checkpoints.adapter_problem(adapter)

    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    assert "只載入 safetensors" in checkpoints.adapter_problem(adapter)
    (adapter / "adapter_model.bin").unlink()
    _safetensors(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json" in checkpoints.adapter_problem(adapter)


def test_graceful_stop_first_ctrl_c_requests_second_interrupts():
    import os

    from medgemma_lib.training.trainer import GracefulStop

    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(verbose=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def _cli(args, **kw):
    return run_cli(*args, timeout=900, **kw)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_then_resume_skips_a_damaged_checkpoint(tiny_model_dir, tmp_path):
    """SIGINT (Ctrl+C, Jupyter's interrupt) mid-training: exit 130, a complete checkpoint at the stop step,
    no traceback. The stop checkpoint is then damaged on disk: --resume says so, falls back to the
    previous good one and finishes. Finally the adapter is damaged: evaluation refuses it with a way
    back, and --resume rewrites it from the last checkpoint without training again."""
    import os
    import re
    import time

    max_steps = 60
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        "ctrl-c",
        max_steps=max_steps,
        save_steps=2,
        eval_steps=1000,
        save_total_limit=3,
        logging_steps=1,
    )
    run = tmp_path / "ctrl-c"
    log = run / "train_log.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medgemma_lib", "train", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # wait until a few steps are logged, as a user would
        steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()] if log.exists() else []
        if any(s >= 5 for s in steps):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "安全停止" in err and "--resume" in err, err[-2000:]
    stopped = int(re.search(r"在第 (\d+) 步安全停止", err).group(1))
    assert 5 <= stopped < max_steps
    ckpt_dir = run / "checkpoints"
    assert checkpoints.latest_complete_checkpoint(ckpt_dir).name == f"checkpoint-{stopped}"
    assert not (run / "adapter").exists() and not (run / "train_summary.json").exists()
    earlier = [c for c in checkpoints.list_checkpoints(ckpt_dir) if checkpoints.checkpoint_step(c) < stopped]
    assert earlier, "save_steps=2 leaves earlier checkpoints"

    # the newest checkpoint rots on disk; resume must notice and use the previous good one
    _flip_bytes(ckpt_dir / f"checkpoint-{stopped}" / "adapter_model.safetensors")
    resumed = _cli(["train", "--resume", *overrides])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"已移除無法使用的檢查點 checkpoint-{stopped}" in resumed.stdout and "SHA-256" in resumed.stdout
    assert f"{earlier[-1].name} 接續" in resumed.stdout
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == max_steps and summary["resumed_from"].endswith(earlier[-1].name)
    assert checkpoints.adapter_problem(run / "adapter") is None

    # a truncated adapter: refused before any model is loaded, with the way back
    weights = run / "adapter" / "adapter_model.safetensors"
    good_bytes = weights.read_bytes()
    weights.write_bytes(good_bytes[: len(good_bytes) // 2])
    refused = _cli(["evaluate", "--run", str(run)])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "損毀" in refused.stderr and f"checkpoint-{max_steps}" in refused.stderr and "--resume" in refused.stderr
    again = _cli(["train", "--resume", *overrides])
    assert again.returncode == 0, again.stderr[-3000:]
    assert weights.read_bytes() == good_bytes  # rewritten from checkpoint-60, no step trained twice
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == max_steps


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing checkpoint-4 (adapter weights written, optimizer not): a Chinese
    OutputError naming the intact checkpoint-2 and the resume command; checkpoint-2 stays complete and
    --resume (with space again) finishes the run."""
    import errno

    from transformers import Trainer

    from medgemma_lib.core.config import load_config
    from medgemma_lib.core.errors import OutputError
    from medgemma_lib.training.train import run_training

    overrides = tiny_overrides(
        tiny_model_dir, tmp_path, "full", max_steps=6, save_steps=2, eval_steps=100, save_total_limit=3
    )
    original = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    with pytest.raises(OutputError) as err:
        run_training(load_config(None, overrides), verbose=False)
    message = err.value.format()
    assert (
        "磁碟空間不足" in message and "optimizer.pt" in message and "checkpoint-2" in message and "--resume" in message
    )
    ckpt_dir = tmp_path / "full" / "checkpoints"
    assert checkpoints.latest_complete_checkpoint(ckpt_dir).name == "checkpoint-2"
    assert checkpoints.checkpoint_problem(ckpt_dir / "checkpoint-4")  # the half-written one is never trusted
    assert not (tmp_path / "full" / "adapter").exists()

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)  # space again
    result = run_training(load_config(None, overrides), resume=True, verbose=False)
    assert result.global_step == 6 and result.resumed_from.endswith("checkpoint-2")
    assert checkpoints.adapter_problem(tmp_path / "full" / "adapter") is None
