"""The README's main command on the real demo model: exit 0, validation loss clearly lower, results in place."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_trains_real_model_and_lowers_heldout_loss(demo_model_dir, tmp_path):
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "medgemma_lib", "demo", f"train.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "demo"
    summary = json.loads((run / "demo_summary.json").read_text())
    before, after = summary["validation_loss"]["before"], summary["validation_loss"]["after"]
    assert after < before * 0.9, (before, after)  # a clear drop, not noise
    test = summary["test"]
    assert test["tuned"]["loss"] < test["base"]["loss"]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml", "loss.png", "train_log.jsonl", "memory.json", "train_summary.json"):
        assert (run / name).is_file(), name
    assert "驗證集 loss" in proc.stdout and "LoRA adapter" in proc.stdout and "醫療免責聲明" in proc.stdout
    print(f"demo: {before:.3f} -> {after:.3f}, {time.time() - started:.0f} s")
