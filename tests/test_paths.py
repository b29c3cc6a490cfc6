"""``core.paths``: what notebooks list of a folder they wrote."""

from __future__ import annotations

from medgemma_lib.core.paths import folder_names, missing_files


def test_folder_names_sorted_with_folders_marked(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged-float32").mkdir()
    (tmp_path / "config.yaml").write_text("x", encoding="utf-8")
    assert folder_names(tmp_path) == ["config.yaml", "merged/", "merged-float32/"]
    assert folder_names(tmp_path, mark_folders=False) == ["config.yaml", "merged", "merged-float32"]


def test_missing_files_names_absent_empty_and_folder_entries(tmp_path):
    (tmp_path / "eval.json").write_text("{}", encoding="utf-8")
    (tmp_path / "eval.md").write_text("", encoding="utf-8")
    (tmp_path / "eval.png").mkdir()
    assert missing_files(tmp_path, ("eval.json",)) == []
    assert missing_files(tmp_path, ("eval.json", "eval.md", "eval.png", "gone.txt")) == [
        "eval.md",
        "eval.png",
        "gone.txt",
    ]
