"""No Hugging Face token in any tracked file (sources, configs, results, notebook outputs)."""

from __future__ import annotations

import re
import subprocess

import pytest

# Hub user access tokens: "hf_" followed by 34 letters/digits today; 30+ leaves margin.
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")


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
    assert not hits, "這些受版本控制的檔案含有看起來像 Hugging Face 權杖的字串（請撤銷該權杖並移除）：\n" + "\n".join(hits)
