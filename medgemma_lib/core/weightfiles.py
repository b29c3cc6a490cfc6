"""Is a safetensors file, or a model folder's set of them, whole? Read from headers and sizes alone.

One check used everywhere a weights file is trusted: checkpoints and adapters (:mod:`checkpoints`),
a local base-model folder before ``config check``, ``train``, ``evaluate``, ``chat`` or ``export``
load it (:func:`medgemma_lib.core.profiles.model_source`), and the shards of a streamed merge
(:mod:`export`). Nothing is loaded and no torch is imported: a 27B folder is checked in milliseconds.

A safetensors file is an 8-byte little-endian header length, a JSON header whose ``data_offsets``
say where each tensor's bytes end, then the bytes. A file cut short by a full disk or an interrupted
copy has fewer bytes than its header promises, which is what is checked here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medgemma_lib.core.errors import ModelError

MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses headers over 100 MB too
SAFETENSORS_INDEX = "model.safetensors.index.json"
REDOWNLOAD_HINT = "檔案可能在下載或複製中途被截斷；請重新下載或重新複製整個模型資料夾。"


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a ``.safetensors`` file is not whole (header unreadable, size not what the header says), or None."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} 只有 {size} 位元組（檔案被截斷）"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                return f"{path.name} 的標頭長度不合理（檔案損壞或被截斷）"
            header = json.loads(handle.read(n))
    except FileNotFoundError:
        return f"找不到 {path.name}"
    except OSError as exc:
        return f"無法讀取 {path.name}：{exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} 的標頭不是有效的 JSON（檔案損壞）"
    if not isinstance(header, dict):
        return f"{path.name} 的標頭格式不對（檔案損壞）"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} 的標頭格式不對（檔案損壞）"
    if 8 + n + end != size:
        return f"{path.name} 應有 {8 + n + end:,} 位元組，實際 {size:,} 位元組（檔案被截斷或損壞）"
    return None


def check_safetensors_file(path: str | os.PathLike, where: str = "權重檔") -> None:
    """Raise a :class:`ModelError` (what is wrong, how to fix it) when ``path`` is not a whole safetensors file."""
    problem = safetensors_problem(path)
    if problem:
        raise ModelError(f"{where}不完整或已損毀：{problem}。", hint=REDOWNLOAD_HINT)


def model_shards(folder: str | os.PathLike) -> list[Path]:
    """A model folder's safetensors files (from its index, or the single ``model.safetensors``), each checked whole.

    Refuses a folder without safetensors weights (a pickled ``.bin`` can run code when loaded, so it is
    never an alternative), an unreadable index, and an index naming a file that is missing.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ModelError(
                f"無法讀取 {folder.name}/{index.name}：{reason}",
                hint="檔案可能損毀，請重新下載或重新匯出模型。",
            ) from None
        if not names or any("/" in n or n.startswith(".") for n in names):
            raise ModelError(f"{folder.name}/{index.name} 的內容不對（沒有權重檔或檔名不合理）。", hint=REDOWNLOAD_HINT)
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in [*folder.glob("*.bin"), *folder.glob("*.pt")])
        if pickled:
            raise ModelError(
                f"模型資料夾 {folder.name} 只有 .bin／.pt（pickle）權重（例如 {pickled[0]}）："
                "本課程只載入 safetensors，因為 pickle 檔在載入時可以執行任意程式碼。",
                hint="請用 safetensors 格式的模型（Hub 上的 MedGemma 都是），或在信任來源的前提下轉換成 safetensors。",
            )
        raise ModelError(
            f"模型資料夾 {folder.name} 裡沒有權重檔（找不到 model.safetensors 或 {SAFETENSORS_INDEX}）。",
            hint="資料夾可能沒有下載或複製完整；請重新下載或重新匯出模型。",
        )
    shards = [folder / n for n in names]
    for shard in shards:
        check_safetensors_file(shard, where=f"模型資料夾 {folder.name} 的權重檔")
    return shards


def folder_fingerprint(folder: str | os.PathLike, sample: int = 65536) -> str:
    """A digest that two copies of one model share and two different models (even of equal shapes) do not.

    Covers each shard's name, size and header, and ``sample`` bytes of tensor data at its start and end,
    so that it costs a few reads however large the model is. Raises like :func:`model_shards`.
    """
    import hashlib

    digest = hashlib.sha256()
    for shard in model_shards(folder):
        size = shard.stat().st_size
        with open(shard, "rb") as handle:
            n = int.from_bytes(handle.read(8), "little")
            digest.update(f"{shard.name}:{size}:".encode())
            digest.update(handle.read(n + sample))
            handle.seek(max(8 + n, size - sample))
            digest.update(handle.read(sample))
    return digest.hexdigest()
