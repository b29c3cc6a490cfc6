"""Write a whole output folder atomically: fill a temporary sibling, then rename it into place.

Used by ``data prepare`` (prepared splits) and ``export`` (merged model). A crash, a full disk or
Ctrl+C while writing leaves the previous folder exactly as it was and no half-written folder under
the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medgemma_lib.errors import OutputError


@contextlib.contextmanager
def atomic_folder(out: Path, *, what: str, hint: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``.

    ``what`` names the folder in the Chinese error message (e.g. "匯出資料夾"); ``hint`` says how
    to fix a write failure. An existing ``out`` is moved aside first and removed only after the
    new folder is in place (and put back if the final rename fails).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
        raise OutputError(f"寫入{what} {out} 失敗：{exc.strerror or exc}", hint=f"{hint}原本的資料夾沒有被更動。") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
