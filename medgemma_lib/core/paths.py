"""Paths: how the product shows a path to the learner, and how it finds the files a config names.

One rule for display everywhere (CLI messages, reports, notebook outputs): relative to the working
folder or the repository when inside them, ``~/...`` under the home folder, ``../...`` beside the
repository (the course's shared data), else the path itself. No user name reaches a stored output.
"""

from __future__ import annotations

import os
from pathlib import Path

from medgemma_lib.core.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "MEDGEMMA_CACHE"


def display_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as the learner should read it (see the module docstring for the rule)."""
    p = Path(os.fsdecode(path)).expanduser().resolve()  # OSError.filename can be bytes (TensorBoard writes with them)
    for base in (Path.cwd().resolve(), REPO_ROOT):
        try:
            return str(p.relative_to(base))
        except ValueError:
            pass
    home = Path.home().resolve()
    if home != Path(home.anchor):
        try:
            return "~/" + str(p.relative_to(home))
        except ValueError:
            pass
    if REPO_ROOT.parent != Path(REPO_ROOT.anchor):
        try:
            return str(Path("..") / p.relative_to(REPO_ROOT.parent))
        except ValueError:
            pass
    return str(p)


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given; a relative path missing from the working folder is tried against the repository.

    So ``data/medquad_sample.csv`` (the config default) works from the repository root and from ``notebooks/``.
    The one rule for the paths a config names (``data.input``, ``data.mix[].input``, ``data.prepared_dir``):
    the config check, the data step, evaluation and the run's data record all find a data file through it.
    """
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def require_input(path: str | os.PathLike) -> Path:
    """``path`` (expanded) if it exists; else the Chinese "input not found" error, naming data files beside it.

    Light on purpose: ``data prepare`` calls it before the data step's imports (TRL, transformers), the
    readers call it before reading."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    near = ""
    if p.parent.is_dir():
        similar = sorted(x.name for x in p.parent.iterdir() if x.suffix.lower() in (".csv", ".jsonl", ".json", ".gz"))
        near = f"同一資料夾裡有：{'、'.join(similar[:5])}。" if similar else ""
    raise DataError(f"找不到輸入檔 {p}。", hint=f"請確認路徑（相對於目前的工作資料夾 {Path.cwd().name}/）。{near}")


def cache_dir() -> Path:
    """Where converted models live: ``$MEDGEMMA_CACHE`` or ``~/.cache/medgemma_lib``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medgemma_lib"


def folder_names(folder: str | os.PathLike, mark_folders: bool = True) -> list[str]:
    """The names in ``folder``, sorted; a sub-folder's name ends in ``/`` unless ``mark_folders`` is off.

    What a notebook lists of a folder it wrote (prepared data, a run folder), without a machine path.
    """
    return [p.name + ("/" if mark_folders and p.is_dir() else "") for p in sorted(Path(folder).iterdir())]


def missing_files(folder: str | os.PathLike, names: list[str] | tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are not a non-empty file in ``folder``; empty when every one was written."""
    paths = {name: Path(folder) / name for name in names}
    return [name for name, p in paths.items() if not p.is_file() or p.stat().st_size == 0]
