"""Atomic output folders: a failed write (disk full, crash, Ctrl+C) leaves the previous results intact."""

from __future__ import annotations

import errno
import json

import pytest

from medgemma_lib.core.atomic import atomic_folder
from medgemma_lib.core.errors import OutputError


def _previous(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "eval.json").write_text("old", encoding="utf-8")
    return out


def test_success_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    out = _previous(tmp_path)
    with atomic_folder(out, what="輸出資料夾", hint="") as tmp:
        (tmp / "eval.json").write_text("new", encoding="utf-8")
    assert (out / "eval.json").read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_disk_full_keeps_previous_results_and_says_so_in_chinese(tmp_path):
    out = _previous(tmp_path)
    with pytest.raises(OutputError) as info:
        with atomic_folder(out, what="匯出資料夾", hint="請確認磁碟空間；") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "匯出資料夾" in str(info.value) and "沒有被更動" in str(info.value)
    assert (out / "eval.json").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_interrupt_keeps_previous_results(tmp_path):
    out = _previous(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, what="輸出資料夾", hint="") as tmp:
            (tmp / "eval.json").write_text("half", encoding="utf-8")
            raise KeyboardInterrupt
    assert (out / "eval.json").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# ----------------------------------------------------------------------------------------------
# Single files


def test_write_json_replaces_a_file_whole_and_keeps_the_suffix_for_writers_that_need_it(tmp_path):
    from medgemma_lib.core.atomic import atomic_file, write_json

    target = tmp_path / "eval.json"
    target.write_text("old", encoding="utf-8")
    write_json(target, {"loss": 1.5, "模型": "demo"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"loss": 1.5, "模型": "demo"}
    assert "模型" in target.read_text(encoding="utf-8")  # readable, not \\u-escaped
    with atomic_file(tmp_path / "eval.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # matplotlib picks the format from the suffix
        tmp.write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.png"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path, failure):
    from medgemma_lib.core.atomic import atomic_file, is_temporary

    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n", encoding="utf-8")
    seen = []
    with pytest.raises(type(failure)):
        with atomic_file(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            seen.append(tmp.name)
            raise failure
    assert target.read_text(encoding="utf-8") == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert is_temporary(seen[0]) and not is_temporary("config.yaml")


def test_the_product_writes_no_file_outside_the_atomic_helper():
    """Every ``write_text`` / ``json.dump`` / ``savefig`` / ``os.replace`` in the package goes through
    medgemma_lib.core.atomic (the append-only training log and the helper itself are the exceptions)."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "medgemma_lib"
    pattern = re.compile(r"\.write_text\(|\.write_bytes\(|json\.dump\(|\.savefig\(|os\.replace\(|\.replace\(tmp")
    allowed = {"atomic.py"}
    found = []
    for path in package.rglob("*.py"):
        if path.name in allowed:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and "tmp" not in line and "atomic" not in line:
                found.append(f"{path.relative_to(package)}:{n}: {line.strip()}")
    assert not found, "write through medgemma_lib.core.atomic:\n" + "\n".join(found)
