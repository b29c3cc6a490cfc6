"""``evaluation.report``: what notebooks 05 and 06 show of finished results, from the shipped reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medgemma_lib.checks import reference
from medgemma_lib.evaluation import quality, report


@pytest.fixture(scope="module")
def full():
    return reference.load_report()


@pytest.fixture(scope="module")
def bilingual(repo_root):
    return quality.load_report(repo_root / "docs" / "quality" / "medquad-bilingual-gemma3-270m")


def _comparison(short_high: float):
    return {
        "models": {"base": {"loss": 3.0}, "short": {"loss": 2.5}, "full": {"loss": 2.0}},
        "ci95": {"short": {"loss": {"ci95": [-0.7, short_high]}}, "full": {"loss": {"ci95": [-1.2, -0.8]}}},
    }


def test_full_training_summary(full):
    text = report.full_training_summary(full, short=SimpleNamespace(global_step=20, tokens_trained=12345))
    lines = text.splitlines()
    assert (
        len(lines) == 3 and full["hardware"]["gpu"] in lines[0] and f"{full['training']['global_step']} 步" in lines[0]
    )
    assert lines[1].startswith(f"驗證集 loss {full['training']['initial_eval_loss']:.3f} → ")
    assert lines[2] == "相較之下，這裡的短訓練：20 步、12,345 個 token"
    assert len(report.full_training_summary(full).splitlines()) == 2


def test_missing_metrics():
    result = {"models": {"base": {"rougeL": 1.0, "chrf": None}, "tuned": {"rougeL": 2.0, "chrf": 3.0}}}
    assert report.missing_metrics(result) == ["base.chrf"]
    assert report.missing_metrics(result, ("rougeL",)) == []


def test_loss_changes_and_which_are_clearly_lower():
    labels = {"base": "基礎", "short": "短", "full": "完整"}
    lines = report.loss_change_lines(_comparison(-0.1), labels).splitlines()
    assert lines == [
        "短：loss 3.000 → 2.500（95% 區間 [-0.700, -0.100]）",
        "完整：loss 3.000 → 2.000（95% 區間 [-1.200, -0.800]）",
    ]
    assert report.clearly_lower_loss(_comparison(-0.1)) == ["short", "full"]
    assert report.clearly_lower_loss(_comparison(0.05)) == ["full"]  # the interval reaches above 0


def test_language_table_and_recipes(full, bilingual):
    table = report.language_table({"只用英文": full, "雙語": bilingual})
    assert list(table.index) == ["只用英文", "雙語"] and list(table.columns) == list(report.LANGUAGE_COLUMNS)
    assert table.loc["雙語", "中文 loss（基礎 → 微調後）"].endswith(f"{bilingual['chinese']['tuned']['loss']:.3f}")
    recipes = report.dates_and_learning_rates([full, bilingual])
    assert recipes[bilingual["name"]] == (bilingual["date"], bilingual["config"]["train"]["learning_rate"])
