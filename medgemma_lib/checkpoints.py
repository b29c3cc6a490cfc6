"""Checkpoints that are either complete or ignored.

The Trainer writes ``checkpoint-N/`` folders file by file; a process killed in the middle leaves a
folder that looks like a checkpoint but is not one. After the Trainer has finished saving,
:class:`CompletionMarkerCallback` writes ``medgemma_complete.json`` (the size of every file) into
the folder, last and atomically. :func:`latest_complete_checkpoint` only returns folders whose
marker exists and whose files still have the recorded sizes, so ``--resume`` never picks a
half-written checkpoint; :func:`remove_incomplete_checkpoints` deletes the rest before resuming.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "medgemma_complete.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# Files without which the Trainer cannot resume (adapter weights, optimizer, scheduler, trainer state).
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """All ``checkpoint-N`` folders under ``folder``, oldest first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def write_completion_marker(checkpoint: str | os.PathLike) -> Path:
    """Record every file's size, then rename the marker into place (the last write of a checkpoint)."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")
    }
    tmp = checkpoint / (MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"step": checkpoint_step(checkpoint), "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / MARKER)
    return checkpoint / MARKER


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when the marker exists, lists the required files, and every listed file has its size."""
    checkpoint = Path(checkpoint)
    try:
        info = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    files = info.get("files") or {}
    if not all(name in files for name in _REQUIRED):
        return False
    if not any(name.endswith(".safetensors") for name in files):
        return False
    for name, size in files.items():
        f = checkpoint / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def latest_complete_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    for ckpt in reversed(list_checkpoints(folder)):
        if is_complete(ckpt):
            return ckpt
    return None


def remove_incomplete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders without a valid marker (left by a crash); return what was removed."""
    removed = []
    for ckpt in list_checkpoints(folder):
        if not is_complete(ckpt):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append(ckpt)
    return removed


def make_marker_callback():
    """A ``TrainerCallback`` that marks each checkpoint complete right after the Trainer saved it."""
    from transformers import TrainerCallback

    class CompletionMarkerCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    write_completion_marker(ckpt)
            return control

    return CompletionMarkerCallback()
