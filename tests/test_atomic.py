"""Atomic output folders: a failed write (disk full, crash, Ctrl+C) leaves the previous results intact."""

from __future__ import annotations

import errno

import pytest

from medgemma_lib.atomic import atomic_folder
from medgemma_lib.errors import OutputError


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
