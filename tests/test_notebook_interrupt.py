"""Jupyter's "interrupt kernel" (■) during training: the same clean stop as Ctrl+C in a terminal.

A real kernel (jupyter_client) runs ``run_training(cfg, notebook=True)``; when a few steps are logged the
kernel is interrupted as JupyterLab does it (SIGINT to the kernel process). The cell must end with
``TrainingInterrupted`` (not a KeyboardInterrupt from inside torch), leaving a complete checkpoint at the
stop step, and the kernel must still work afterwards.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import pytest
from train_helpers import tiny_overrides

from medgemma_lib.training import checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernel_interrupt_stops_training_cleanly(tiny_model_dir, tmp_path):
    from jupyter_client.manager import start_new_kernel

    overrides = tiny_overrides(tiny_model_dir, tmp_path, "nb-stop", max_steps=400, save_steps=1000, eval_steps=1000)
    log = tmp_path / "nb-stop" / "train_log.jsonl"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT / "notebooks"))
    try:
        code = (
            "from medgemma_lib.core.config import load_config\n"
            "from medgemma_lib.training import train\n"
            f"cfg = load_config(None, {overrides!r})\n"
            "result = train.run_training(cfg, notebook=True)\n"
        )
        msg_id = kc.execute(code)
        deadline = time.time() + 600
        interrupted, error, idle = False, None, False
        while time.time() < deadline and not idle:
            if not interrupted and log.exists():
                steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
                if any(s >= 3 for s in steps):
                    km.interrupt_kernel()
                    interrupted = True
            try:
                msg = kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg["content"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        assert interrupted and idle, "training finished or hung before the interrupt"
        assert error is not None and error["ename"] == "TrainingInterrupted", error
        stopped = int(error["evalue"].split("在第 ")[1].split(" 步")[0])
        assert 3 <= stopped < 400
        ckpt = checkpoints.latest_complete_checkpoint(tmp_path / "nb-stop" / "checkpoints")
        assert ckpt is not None and ckpt.name == f"checkpoint-{stopped}"
        # the kernel is still usable, and the default Ctrl+C behaviour is back
        reply = kc.execute_interactive(
            "import signal; assert signal.getsignal(signal.SIGINT) is not None; print('ok')", timeout=60
        )
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
