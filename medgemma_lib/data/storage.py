"""Save and load prepared splits atomically, with ``prepare_report.json`` beside them.

The splits are written with ``DatasetDict.save_to_disk`` into a temporary sibling folder, which is
renamed into place only when everything succeeded, so a failed run never creates or changes the
output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import datasets
from datasets import load_from_disk

from medgemma_lib.core.atomic import atomic_folder
from medgemma_lib.core.errors import DataError, OutputError

REPORT_NAME = "prepare_report.json"


@contextlib.contextmanager
def quiet_datasets():
    """No ``datasets`` progress bars (they clutter the CLI and notebook output)."""

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any work) when ``path`` cannot become the output folder."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"輸出路徑 {out} 已經是一個檔案，不是資料夾。", hint="請用 --output 指定一個新的資料夾名稱。")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(
                f"輸出資料夾 {out} 已存在且不是空的，為避免覆蓋沒有寫入。",
                hint="請指定新的資料夾，或加上 --overwrite 取代舊的結果。",
            )
        if not (out / REPORT_NAME).is_file():
            raise OutputError(
                f"輸出資料夾 {out} 裡有其他檔案（不是 data prepare 的輸出），不會覆蓋它。",
                hint="請指定新的或空的資料夾。",
            )
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(
            f"無法建立輸出資料夾 {out}：上層路徑 {ancestor} 是檔案，不是資料夾。", hint="請換一個輸出位置。"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"沒有權限寫入 {ancestor}，無法建立輸出資料夾 {out}。",
            hint="請換一個有寫入權限的位置（例如家目錄下的資料夾）。",
        )
    return out


def save_prepared(splits, report: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``splits`` (a DatasetDict) and ``report`` to ``path`` atomically."""
    out = check_output_dir(path, overwrite)
    with atomic_folder(out, what="輸出資料夾", hint="請確認磁碟空間與寫入權限；") as tmp:
        with quiet_datasets():
            splits.save_to_disk(str(tmp / "splits"))
        (tmp / REPORT_NAME).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return out


def load_prepared(path: str | Path):
    """The DatasetDict saved by :func:`save_prepared` (records identical to what was saved)."""

    folder = Path(path).expanduser()
    if not (folder / REPORT_NAME).is_file() or not (folder / "splits").is_dir():
        raise DataError(
            f"{folder} 不是 data prepare 的輸出資料夾（找不到 {REPORT_NAME} 或 splits/）。",
            hint="請先執行 python -m medgemma_lib data prepare --input ... --output 這個資料夾。",
        )
    try:
        with quiet_datasets():
            return load_from_disk(str(folder / "splits"))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(
            f"無法載入 {folder}/splits：{exc}", hint="資料夾可能不完整；請重新執行 data prepare。"
        ) from None


def load_report(path: str | Path) -> dict:
    folder = Path(path).expanduser()
    try:
        return json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"無法讀取 {folder / REPORT_NAME}：{exc}", hint="請重新執行 data prepare。") from None


def differing_splits(loaded, saved) -> list[str]:
    """Names of the splits whose records differ between two ``DatasetDict``s (empty: a faithful round trip)."""
    names = sorted(set(loaded) | set(saved))
    return [n for n in names if n not in loaded or n not in saved or loaded[n].to_list() != saved[n].to_list()]
