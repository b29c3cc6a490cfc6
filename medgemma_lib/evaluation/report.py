"""What notebooks 05 and 06 show of finished results: short summaries, checks and tables, built from plain dicts.

The inputs are what other modules already wrote or returned: a quality report (``report.json`` of the shipped
adapter, ``docs/quality/*.json``), ``run_evaluation``'s result and ``reference.compare_adapters``'s comparison.
Nothing here loads a model or reads a file, so a notebook cell calls one function instead of looping over keys,
and each table or line is tested once here (``tests/test_report.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from medgemma_lib.core import display


def full_training_summary(full: dict, short=None) -> str:
    """The full training of a quality report in three lines: GPU and date, steps, tokens and time, the loss.

    ``short``: the learner's run (``TrainResult`` or anything with ``global_step`` and ``tokens_trained``), set
    beside it in a last line.
    """
    tr, hw = full["training"], full["hardware"]
    lines = [
        f"完整訓練（{hw['gpu']}，{full['date']}）：{tr['global_step']} 步、{tr['tokens_trained']:,} 個 token、"
        f"{tr['train_seconds']:.0f} 秒（每秒 {tr['tokens_per_second']:,.0f} 個 token）",
        f"驗證集 loss {tr['initial_eval_loss']:.3f} → {tr['final_eval_loss']:.3f}；"
        f"訓練 {full['data']['splits']['train']:,} 筆（完整 MedQuAD，一個 epoch）",
    ]
    if short is not None:
        lines.append(f"相較之下，這裡的短訓練：{short.global_step} 步、{short.tokens_trained:,} 個 token")
    return "\n".join(lines)


def missing_metrics(result: dict, keys: Iterable[str] = ("rougeL", "chrf")) -> list[str]:
    """``model.metric`` for each of ``keys`` that some model of an evaluation has no value for (empty: all there)."""
    return [f"{name}.{key}" for name, metrics in result["models"].items() for key in keys if metrics.get(key) is None]


def loss_change_lines(comparison: dict, labels: Mapping[str, str]) -> str:
    """One line per adapter of ``compare_adapters``: the base's loss, the adapter's, and the paired 95 % interval
    of the difference (adapter − base)."""
    models, lines = comparison["models"], []
    for name, ci in comparison["ci95"].items():
        low, high = ci["loss"]["ci95"]
        lines.append(
            f"{labels[name]}：loss {models['base']['loss']:.3f} → {models[name]['loss']:.3f}"
            f"（95% 區間 [{low:+.3f}, {high:+.3f}]）"
        )
    return "\n".join(lines)


def clearly_lower_loss(comparison: dict) -> list[str]:
    """The adapters of ``compare_adapters`` whose loss is below the base's with the whole 95 % interval below 0."""
    models = comparison["models"]
    return [
        name
        for name, ci in comparison["ci95"].items()
        if models[name]["loss"] < models["base"]["loss"] and ci["loss"]["ci95"][1] < 0
    ]


LANGUAGE_COLUMNS = (
    "中文題以中文回答（基礎 → 微調後）",
    "中文答案的簡體字比例（微調後）",
    "中文 loss（基礎 → 微調後）",
)


def language_table(reports: Mapping[str, dict]):
    """Chinese questions in quality reports (label -> report): answered in Chinese, simplified characters, loss."""
    rows = []
    for label, r in reports.items():
        lang, zh = r["language"], r["chinese"]
        values = (
            f"{lang['chinese']['base']['fidelity']:.1%} → {lang['chinese']['tuned']['fidelity']:.1%}",
            f"{lang['simplified_share']['tuned']:.1%}",
            f"{zh['base']['loss']:.3f} → {zh['tuned']['loss']:.3f}",
        )
        rows.append({"訓練": label, **dict(zip(LANGUAGE_COLUMNS, values))})
    return display.frame(rows, index="訓練")


def dates_and_learning_rates(reports: Iterable[dict]) -> dict[str, tuple[str, float]]:
    """Report name -> (date, learning rate): a reader sees which reports were made with an older recipe."""
    return {r["name"]: (r["date"], r["config"]["train"]["learning_rate"]) for r in reports}
