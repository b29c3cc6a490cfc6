"""``core.config``: the configs listed with what each is for (notebook 05)."""

from __future__ import annotations

from medgemma_lib.core.config import config_headlines


def test_config_headlines_one_line_per_yaml(tmp_path, repo_root):
    (tmp_path / "b.yaml").write_text("# 第二個：說明\nmodel: {}\n", encoding="utf-8")
    (tmp_path / "a.yaml").write_text("# 第一個\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("# 不是設定檔\n", encoding="utf-8")
    assert config_headlines(tmp_path) == f"{'a.yaml':<28}第一個\n{'b.yaml':<28}第二個：說明"
    shipped = config_headlines(repo_root / "configs").splitlines()
    assert len(shipped) == len(list((repo_root / "configs").glob("*.yaml"))) and shipped[0].startswith("demo.yaml")
