"""DDP plumbing: ``accelerate launch`` with two CPU processes trains the tiny model and writes one run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_cpu_processes_train_together(tiny_model_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "29517",
        str(ROOT / "tests" / "train_script.py"),
        "--result",
        str(tmp_path / "ddp.json"),
        *tiny_overrides(tiny_model_dir, tmp_path, "ddp", max_steps=2, eval_steps=2, save_steps=2, logging_steps=1),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["global_step"] == 2
    run = tmp_path / "ddp"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "checkpoint-2" / "medgemma_complete.json").is_file()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if r.get("step") == 1 and "loss" in r) == 1  # only the main process writes the log
    # each optimizer step saw both processes' batches: 2 micro-batches per step
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "可訓練參數" in proc.stdout
