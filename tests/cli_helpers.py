"""The one way tests run the command line: ``python -m medgemma_lib ARGS`` as a user types it, or ``cli.main`` in
this process when only the exit code and the printed text matter (much faster: no new interpreter, no re-import)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    env: dict | None = None,
    cwd: str | os.PathLike | None = ROOT,
    stdin: str | None = None,
    timeout: int = 600,
    expect: int | None = None,
) -> subprocess.CompletedProcess:
    """``python -m medgemma_lib ARGS`` in a fresh interpreter, from the repository root unless ``cwd`` says otherwise.

    ``env`` replaces the environment (build it from ``os.environ``); ``expect`` is the exit code it must return (the
    assertion shows the end of both streams)."""
    proc = subprocess.run(
        [sys.executable, "-m", "medgemma_lib", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_cli_here(*args: str) -> tuple[int, str, str]:
    """``cli.main(ARGS)`` in this process: (exit code, stdout, stderr)."""
    from medgemma_lib import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()
