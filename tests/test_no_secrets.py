"""No Hugging Face token in any tracked file (sources, configs, results, notebook outputs)."""

from __future__ import annotations

import re
import subprocess

import pytest
from cli_helpers import run_cli

# Hub user access tokens: "hf_" followed by 34 letters/digits today; 30+ leaves margin.
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
# A fake token with the real shape, put in the environment of whole runs; its middle is what the scans look for
# (a leak of only part of it, e.g. without the prefix, is still found).
FAKE_TOKEN = "hf_" + "LeakCanary0123456789" + "ZqXwRtYpMnKdVb"  # split: the source itself must not hold a token shape
FAKE_TOKEN_CORE = FAKE_TOKEN[3:23]


def files_under(*folders, since: float | None = None):
    """Every regular file under the folders (optionally only those modified at or after ``since``)."""
    out = []
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            if path.is_file() and not path.is_symlink() and (since is None or path.stat().st_mtime >= since):
                out.append(path)
    return out


def files_containing(paths, secret: str = FAKE_TOKEN_CORE) -> list[str]:
    needles = [secret.encode("utf-8"), secret.encode("utf-16-le")]
    return [str(p) for p in paths if any(n in p.read_bytes() for n in needles)]


def tracked_files(root):
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [root / name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def find_token_shapes(paths) -> list[str]:
    hits = []
    for path in paths:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # deleted in the work tree, or a submodule
            continue
        for m in TOKEN_SHAPE.finditer(data):
            shown = m.group().decode()
            hits.append(f"{path.name}: {shown[:5]}…{shown[-2:]}")  # never repeat the whole secret
    return hits


def test_pattern_catches_a_token_shape(tmp_path):
    fake = tmp_path / "x.ipynb"
    fake.write_text('{"outputs": [{"text": "token=hf_' + "a1B2" * 9 + '"}]}')
    assert find_token_shapes([fake])
    safe = tmp_path / "y.py"
    safe.write_text("hf_fake_accepted_token_0001 hf_…abcd")
    assert not find_token_shapes([safe])


def test_no_tracked_file_contains_a_hub_token(repo_root):
    hits = find_token_shapes(tracked_files(repo_root))
    assert not hits, "這些受版本控制的檔案含有看起來像 Hugging Face 權杖的字串（請撤銷該權杖並移除）：\n" + "\n".join(
        hits
    )


def test_scan_finds_the_canary(tmp_path):
    (tmp_path / "events.out.tfevents").write_bytes(b"\x00\x01 token " + FAKE_TOKEN.encode() + b"\x00")
    (tmp_path / "clean.txt").write_text("hf_…KdVb")
    assert files_containing(files_under(tmp_path)) == [str(tmp_path / "events.out.tfevents")]


@pytest.mark.slow
def test_cli_errors_and_reports_never_show_the_token(tmp_path):
    """Exceptions and reports, with --debug tracebacks too: the token in the environment never appears."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "1"}
    commands = [
        ["doctor"],
        ["auth", "check", "--model", "google/medgemma-4b-it"],
        ["--debug", "auth", "check", "--model", "google/medgemma-4b-it"],
        ["config", "show", "--config", "configs/demo.yaml"],
        ["--debug", "train", "--config", str(tmp_path / "missing.yaml")],
        ["--debug", "evaluate", "--run", str(tmp_path / "no-run")],
    ]
    for args in commands:
        proc = run_cli(*args, env=env, cwd=root, timeout=300)
        out = proc.stdout + proc.stderr
        assert FAKE_TOKEN_CORE not in out, args
    # the auth check did see the token (masked), so the test covered the path that holds it
    proc = run_cli("auth", "check", "--model", "google/medgemma-4b-it", env=env, cwd=root, timeout=300)
    assert "KdVb" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_token_notebook_with_a_token_in_the_environment_stores_none(tmp_path, monkeypatch):
    """Notebook 02 (the one about tokens) executed with a token set: no output holds it, only the masked form."""
    import json
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    nb = nbformat.read(root / "notebooks" / "02_HuggingFace認證.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}
    ).execute()
    out = tmp_path / "02.ipynb"
    nbformat.write(nb, out)
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells], ensure_ascii=False)
    assert "hf_…KdVb" in outputs  # the token was found and shown masked
    assert not files_containing([out])


def test_stored_notebook_outputs_hold_no_machine_paths(repo_root):
    """No home folder, temp or install path, user or machine name in what a reader sees on GitHub."""
    import json
    import socket

    needles = ["/home/", "/root/", "/Users/", "/tmp/", "site-packages", "C:\\Users"]
    host = socket.gethostname()
    if len(host) >= 6:
        needles.append(host)
    hits = []
    for nb in sorted((repo_root / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            text = json.dumps(cell.get("outputs", []), ensure_ascii=False)
            hits += [f"{nb.name} cell {i}: {n}" for n in needles if n in text]
    assert not hits, hits
