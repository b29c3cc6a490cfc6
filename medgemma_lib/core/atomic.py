"""Every file and folder the product writes is written atomically: filled under a temporary name
beside its place, then renamed into place (``os.replace``).

:func:`atomic_folder` for whole folders (prepared splits, exports, the demo model cache);
:func:`atomic_file`, :func:`write_text` and :func:`write_json` for single files (configs, reports,
run summaries, completion markers, plots). A crash, a full disk or Ctrl+C while writing leaves the
previous version exactly as it was and nothing half-written under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medgemma_lib.core.errors import OutputError

TMP_TAG = ".tmp-"  # in every temporary name: readers that list a folder skip such files


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of our temporary names (a write in progress, or left by a crash)."""
    return name.startswith(".") and TMP_TAG in name


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so e.g. matplotlib still sees ``.png``);
    when the block ends without an error it replaces ``path``; otherwise it is removed. ``OSError``
    propagates unchanged, so callers can say what they were writing."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}{TMP_TAG}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``durable``: on disk (fsync) before the rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, data, *, indent: int | None = 1, durable: bool = False) -> Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept readable) to ``path`` atomically."""
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n", durable=durable)


@contextlib.contextmanager
def atomic_folder(out: Path, *, what: str, hint: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``.

    ``what`` names the folder in the Chinese error message (e.g. "匯出資料夾"); ``hint`` says how
    to fix a write failure. An existing ``out`` is moved aside first and removed only after the
    new folder is in place (and put back if the final rename fails).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"無法在 {out.parent} 建立{what}的暫存資料夾：{exc.strerror or exc}", hint=hint) from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(
            f"寫入{what} {out} 失敗：{exc.strerror or exc}", hint=f"{hint}原本的資料夾沒有被更動。"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
