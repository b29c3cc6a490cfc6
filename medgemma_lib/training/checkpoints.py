"""Checkpoints and adapters that are either complete and intact, or refused with a reason.

The Trainer writes ``checkpoint-N/`` folders file by file; a process killed in the middle leaves a
folder that looks like a checkpoint but is not one, and a disk can later damage a file that was
written correctly. After the Trainer has finished saving, :class:`CompletionMarkerCallback` writes
``medgemma_complete.json`` (size and SHA-256 of every file) into the folder, last and atomically;
training writes the same marker into the final ``adapter/`` folder.

:func:`checkpoint_problem` says in Chinese why a checkpoint cannot be used (no marker, a file
missing, truncated, or with other bytes than when it was saved, a safetensors file whose header
does not match its size) or returns None. :func:`latest_complete_checkpoint` returns the newest
usable one, so ``--resume`` falls back to the previous good checkpoint;
:func:`remove_incomplete_checkpoints` deletes the others before resuming and says why.
:func:`verify_adapter` is called before any adapter is loaded (evaluation, chat, export): only
safetensors, and a damaged file gives a clear :class:`~medgemma_lib.core.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from medgemma_lib.core.atomic import is_temporary, write_json
from medgemma_lib.core.errors import ModelError
from medgemma_lib.core.paths import display_path
from medgemma_lib.core.weightfiles import safetensors_problem

MARKER = "medgemma_complete.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# Files without which the Trainer cannot resume (adapter weights, optimizer, scheduler, trainer state).
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def write_completion_marker(folder: str | os.PathLike) -> Path:
    """Record every file's size and SHA-256, then rename the marker into place (the folder's last write)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and not is_temporary(p.name)
    }
    return write_json(folder / MARKER, {"step": checkpoint_step(folder), "files": files}, durable=True)


def _marker_problem(folder: Path, required: tuple[str, ...]) -> str | None:
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "沒有完成標記（存檔時被中斷，或不是本工具寫的）"
    except (OSError, ValueError):
        return "完成標記無法讀取（檔案損壞）"
    files = info.get("files") or {}
    for name in required:
        if name not in files:
            return f"缺少 {name}"
    for name, record in files.items():
        f = folder / name
        if not f.is_file():
            return f"缺少 {name}"
        # markers written before hashes were added hold only the size
        want_size = record if isinstance(record, int) else record.get("size")
        size = f.stat().st_size
        if size != want_size:
            return f"{name} 應有 {want_size:,} 位元組，實際 {size:,} 位元組（檔案被截斷或被改寫）"
        want_hash = None if isinstance(record, int) else record.get("sha256")
        if want_hash and sha256_of(f) != want_hash:
            return f"{name} 的內容與存檔時不同（SHA-256 不符，檔案損壞）"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, in Chinese, or None when it is complete and intact."""
    checkpoint = Path(checkpoint)
    problem = _marker_problem(checkpoint, _REQUIRED)
    if problem:
        return problem
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "沒有 safetensors 權重檔"
    for f in weights:
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when the marker exists, lists the required files, and every file is as it was saved."""
    return checkpoint_problem(checkpoint) is None


def latest_complete_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete and intact checkpoint under ``folder``, or None."""
    for ckpt in reversed(list_checkpoints(folder)):
        if is_complete(ckpt):
            return ckpt
    return None


def remove_incomplete_checkpoints(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Delete checkpoint folders that cannot be resumed from; return ``(folder, reason)`` for each."""
    removed = []
    for ckpt in list_checkpoints(folder):
        problem = checkpoint_problem(ckpt)
        if problem:
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append((ckpt, problem))
    return removed


def adapter_problem(adapter_dir: str | os.PathLike) -> str | None:
    """Why the LoRA adapter in ``adapter_dir`` must not be loaded, in Chinese, or None."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return "資料夾不存在"
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if any(adapter_dir.glob("*.bin")) or any(adapter_dir.glob("*.pt")):
            return (
                f"只有 .bin／.pt 權重：本課程只載入 safetensors（{ADAPTER_WEIGHTS}），"
                "因為 pickle 格式在載入時可以執行任意程式碼"
            )
        return f"缺少 {ADAPTER_WEIGHTS}"
    try:
        json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"缺少 {ADAPTER_CONFIG}"
    except (OSError, ValueError):
        return f"{ADAPTER_CONFIG} 無法讀取（不是有效的 JSON）"
    problem = safetensors_problem(weights)
    if problem:
        return problem
    if (adapter_dir / MARKER).exists():  # adapters written by this project's training carry a marker
        return _marker_problem(adapter_dir, (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    return None


def verify_adapter(adapter_dir: str | os.PathLike, *, run_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Raise :class:`ModelError` with a reason and a way out when the adapter is missing or damaged.

    Returns ``{file name: SHA-256}`` as just checked against the completion marker, so a caller that needs
    a digest (the export manifest) does not hash the file again; ``{}`` for an adapter without a marker
    (checked for format and size only).
    """
    problem = adapter_problem(adapter_dir)
    if problem is None:
        return _marker_hashes(Path(adapter_dir))
    hint = "請重新訓練（python -m medgemma_lib train …）。"
    if run_dir is not None:
        run_dir = Path(run_dir)
        good = latest_complete_checkpoint(run_dir / "checkpoints")
        if good is not None:
            hint = (
                f"訓練的完整檢查點 {good.name} 還在：執行 python -m medgemma_lib train "
                f"--config {display_path(run_dir / 'config.yaml')} --resume "
                "會從它接續並重新寫出轉接器（若它已是最後一步，只會重新存檔，不再訓練）。"
            )
    raise ModelError(f"LoRA 轉接器 {display_path(adapter_dir)} 已損毀或不完整，無法使用：{problem}。", hint=hint)


def _marker_hashes(folder: Path) -> dict[str, str]:
    """``{file: sha256}`` recorded in ``folder``'s completion marker (sizes-only records and no marker: left out)."""
    try:
        files = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError):
        return {}
    return {name: rec["sha256"] for name, rec in files.items() if isinstance(rec, dict) and rec.get("sha256")}


class CompletionMarkerCallback(TrainerCallback):
    """Marks each checkpoint complete right after the Trainer saved it (add it as the last callback)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_completion_marker(ckpt)
        return control
