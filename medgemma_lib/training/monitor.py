"""Watching a training run: JSONL log, memory monitor, loss curve (live in a notebook), advice.

* :class:`MonitorCallback` appends every Trainer log (loss, learning rate, validation loss) to
  ``train_log.jsonl`` together with the memory measured at that moment: peak allocated and reserved
  GPU memory since the previous log on CUDA, resident memory (RSS) of the process on CPU.
* :class:`LiveLossPlotCallback` redraws the train/validation loss curve in a notebook as it grows.
* :func:`plot_loss_curve` draws the same figure from the log (saved as ``loss.png``).
* :func:`memory_summary` and :func:`memory_advice` turn the measured peak into a Chinese sentence:
  what to change on this card, based on the measurement rather than on a guess.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import matplotlib.pyplot as plt
import psutil
import torch
from transformers import TrainerCallback

from medgemma_lib.core import display
from medgemma_lib.core.atomic import atomic_file
from medgemma_lib.core.plots import label, setup_cjk_font

GIB = 1024**3


# ----------------------------------------------------------------------------------------------
# Memory


def memory_snapshot(device: str) -> dict:
    """Current memory figures (GiB). CUDA: peak allocated/reserved since the last reset; CPU: RSS."""
    if device.startswith("cuda"):
        return {
            "gpu_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "gpu_allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
        }

    rss = psutil.Process().memory_info().rss
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"cpu_rss_gib": round(rss / GIB, 3), "cpu_peak_rss_gib": round(peak_kib * 1024 / GIB, 3)}


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def memory_summary(records: list[dict], device: str) -> dict:
    """Peak over the whole run and the capacity of the device (GiB)."""
    summary: dict = {"device": device}
    if device.startswith("cuda"):
        summary["peak_allocated_gib"] = max((r.get("gpu_peak_allocated_gib", 0.0) for r in records), default=0.0)
        summary["peak_reserved_gib"] = max((r.get("gpu_peak_reserved_gib", 0.0) for r in records), default=0.0)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        summary["device_name"] = props.name
        summary["capacity_gib"] = round(props.total_memory / GIB, 2)
    else:
        summary["peak_rss_gib"] = max((r.get("cpu_peak_rss_gib", 0.0) for r in records), default=0.0)
        summary["capacity_gib"] = round(psutil.virtual_memory().total / GIB, 2)
    return summary


def memory_advice(summary: dict, micro_batch: int, gradient_checkpointing: bool, max_length: int) -> str:
    """One or two Chinese sentences of advice from the measured peak."""
    cap = summary.get("capacity_gib") or 0.0
    if summary.get("device", "cpu").startswith("cuda"):
        peak = summary.get("peak_reserved_gib", 0.0)
        share = peak / cap if cap else 0.0
        head = f"GPU 記憶體峰值（reserved）{peak:.1f} GiB，佔 {cap:.0f} GiB 的 {share:.0%}。"
        if share > 0.92:
            return head + "已接近上限：下次可開啟梯度檢查點、減半 micro-batch（梯度累積加倍），或縮短 max_length。"
        if share < 0.5:
            tips = []
            if gradient_checkpointing:
                tips.append("關閉梯度檢查點（約快 1.5 倍）")
            tips.append(f"把 micro-batch 由 {micro_batch} 加大到 {micro_batch * 2}（梯度累積減半，等效批次不變）")
            return head + "還有很多空間：可以" + "，或".join(tips) + "。"
        return head + "使用量適中，目前的設定合適。"
    peak = summary.get("peak_rss_gib", 0.0)
    share = peak / cap if cap else 0.0
    head = f"CPU 記憶體峰值（RSS）{peak:.1f} GiB，佔 {cap:.0f} GiB 的 {share:.0%}。"
    if share > 0.85:
        return head + f"接近上限：請縮短 max_length（目前 {max_length}）或減少 micro-batch。"
    return head + "CPU 訓練的瓶頸是計算而不是記憶體；要更快請改用 GPU。"


# ----------------------------------------------------------------------------------------------
# Loss curve


def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of a ``train_log.jsonl`` (skips a torn last line left by a killed process)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


LOG_COLUMNS = {
    "step": "步數",
    "loss": "訓練 loss",
    "learning_rate": "學習率",
    "eval_loss": "驗證 loss",
    "cpu_rss_gib": "CPU 記憶體（GiB）",
    "gpu_peak_allocated_gib": "GPU 峰值 allocated（GiB）",
    "gpu_peak_reserved_gib": "GPU 峰值 reserved（GiB）",
}


def log_frame(records: list[dict], digits: int = 4):
    """The training log as a table for people (notebook 05): one row per step (the Trainer logs the training
    loss, the validation loss and the final summary of a step as separate records), Chinese headers, ``—``
    where a step has no value, learning rates in scientific notation."""
    keys = [k for k in LOG_COLUMNS if any(k in r for r in records)]
    by_step: dict[int, dict] = {}
    for r in records:
        if "step" not in r:
            continue
        row = by_step.setdefault(r["step"], {k: None for k in keys})
        row.update({k: r[k] for k in keys if r.get(k) is not None})
    rows = []
    for row in by_step.values():
        if row.get("learning_rate") is not None:
            row = {**row, "learning_rate": f"{float(row['learning_rate']):.2e}"}
        rows.append(row)
    return display.frame(rows, LOG_COLUMNS, digits=digits, index="步數")


def loss_series(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) loss points as (step, loss); a resumed run's repeated steps keep the last."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for r in records:
        if "loss" in r and "step" in r:
            train[r["step"]] = r["loss"]
        if "eval_loss" in r and "step" in r:
            val[r["step"]] = r["eval_loss"]
    return sorted(train.items()), sorted(val.items())


def plot_loss_curve(records: list[dict], path: str | os.PathLike | None = None, ax=None, title: str | None = None):
    """Train and validation loss against the step; saved to ``path`` when given. Returns the figure."""

    setup_cjk_font()
    train, val = loss_series(records)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    ax.clear()
    if train:
        ax.plot(
            [s for s, _ in train],
            [v for _, v in train],
            "-",
            color="#1f77b4",
            alpha=0.8,
            label=label("訓練 loss", "train loss"),
        )
    if val:
        ax.plot(
            [s for s, _ in val], [v for _, v in val], "o-", color="#d62728", label=label("驗證 loss", "validation loss")
        )
    ax.set_xlabel(label("訓練步數", "step"))
    ax.set_ylabel("loss")
    ax.set_title(title or label("訓練與驗證 loss", "Training and validation loss"))
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    return fig


# ----------------------------------------------------------------------------------------------
# Callbacks


class MonitorCallback(TrainerCallback):
    """Trainer callback: JSONL log + memory per logging step. ``.records`` holds what was written.

    The log is append-only (one JSON object per line, flushed per record); :func:`read_log` skips a line
    torn by a killed process, so it needs no atomic rewrite.
    """

    def __init__(self, log_path: Path, device: str, extra_records: list[dict] | None = None):
        self.log_path, self.device = Path(log_path), device
        self.records: list[dict] = list(extra_records or [])
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak(self.device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "time_s": round(time.time() - self.started, 2),
        }
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in logs.items()})
        record.update(memory_snapshot(self.device))
        reset_peak(self.device)
        self.records.append(record)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


class LiveLossPlotCallback(TrainerCallback):
    """Notebook callback: redraw the loss curve of ``monitor`` below the cell at each log (one display, updated)."""

    def __init__(self, monitor: MonitorCallback):
        self.monitor = monitor
        self.handle = None
        self.fig = None

    def _draw(self):
        from IPython.display import display  # notebooks only (the CLI never draws live)

        if self.fig is None:
            self.fig, _ = plt.subplots(figsize=(7, 4))
            plt.close(self.fig)  # shown through the display handle only
        plot_loss_curve(self.monitor.records, ax=self.fig.axes[0])
        if self.handle is None:
            self.handle = display(self.fig, display_id=True)
        else:
            self.handle.update(self.fig)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self._draw()
