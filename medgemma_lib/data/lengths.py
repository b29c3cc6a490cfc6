"""Token lengths with the real tokenizer: a table, a histogram and a recommended max length.

Lengths are counted the way TRL will see them: the full chat-template rendering (one ``<bos>``,
the turns, ``<end_of_turn>``) tokenized without adding special tokens again. Rendering is batched,
so a thousand examples take about a second with the fast tokenizer.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from medgemma_lib.core import plots

CANDIDATE_LENGTHS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


def token_lengths(tokenizer, records, batch_size: int = 512) -> dict[str, list[int]]:
    """Per record: ``prompt`` tokens (with the generation prompt), ``total`` tokens, ``completion`` = total - prompt."""
    prompts, totals = [], []
    records = list(records)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        p_text = tokenizer.apply_chat_template([r["prompt"] for r in chunk], tokenize=False, add_generation_prompt=True)
        f_text = tokenizer.apply_chat_template([r["prompt"] + r["completion"] for r in chunk], tokenize=False)
        prompts += [len(x) for x in tokenizer(p_text, add_special_tokens=False)["input_ids"]]
        totals += [len(x) for x in tokenizer(f_text, add_special_tokens=False)["input_ids"]]
    return {"prompt": prompts, "completion": [t - p for t, p in zip(totals, prompts)], "total": totals}


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_summary(lengths: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """min / median / p90 / p95 / p99 / max / sum per kind."""
    out = {}
    for kind, values in lengths.items():
        s = sorted(values)
        out[kind] = {
            "min": s[0] if s else 0,
            "median": _percentile(s, 50),
            "p90": _percentile(s, 90),
            "p95": _percentile(s, 95),
            "p99": _percentile(s, 99),
            "max": s[-1] if s else 0,
            "sum": sum(s),
        }
    return out


def cut_table(totals: list[int], candidates=CANDIDATE_LENGTHS) -> list[dict]:
    """For each candidate max length: share of examples cut and share of all tokens lost."""
    n, all_tokens = len(totals), sum(totals) or 1
    rows = []
    for length in candidates:
        cut = [t for t in totals if t > length]
        rows.append(
            {
                "max_length": length,
                "examples_cut": len(cut),
                "examples_cut_pct": round(100 * len(cut) / n, 2) if n else 0.0,
                "tokens_lost_pct": round(100 * sum(t - length for t in cut) / all_tokens, 2),
            }
        )
    return rows


def recommend_max_length(totals: list[int], max_cut_pct: float = 5.0, candidates=CANDIDATE_LENGTHS) -> dict:
    """The smallest candidate length that cuts at most ``max_cut_pct`` % of the examples."""
    table = cut_table(totals, candidates)
    choice = next((row for row in table if row["examples_cut_pct"] <= max_cut_pct), table[-1])
    return {**choice, "rule": f"cuts at most {max_cut_pct}% of examples"}


def length_report(tokenizer, records, max_cut_pct: float = 5.0) -> dict:
    """Everything the report needs about token lengths of ``records``."""
    lengths = token_lengths(tokenizer, records)
    return {
        "summary": length_summary(lengths),
        "cut_table": cut_table(lengths["total"]),
        "recommended": recommend_max_length(lengths["total"], max_cut_pct),
        "lengths": lengths,
    }


def length_table(report: dict):
    """The summary as a pandas table (rows: prompt / completion / total) with Chinese headers."""

    names = {"prompt": "提示（prompt）", "completion": "答案（completion）", "total": "合計"}
    frame = pd.DataFrame(report["summary"]).T.loc[["prompt", "completion", "total"]]
    frame.index = [names[i] for i in frame.index]
    return frame.rename(columns={"min": "最小", "median": "中位數", "max": "最大", "sum": "總和"})


def plot_token_lengths(report: dict, ax=None):
    """Histogram of total tokens per example, with the recommended max length marked."""
    plots.setup_cjk_font()

    totals = report["lengths"]["total"]
    rec = report["recommended"]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    top = max(totals) if totals else 1
    bins = min(60, max(10, len(set(totals))))
    ax.hist(totals, bins=bins, color="#4C72B0", alpha=0.85)
    ax.axvline(
        rec["max_length"],
        color="#C44E52",
        linestyle="--",
        label=plots.label(
            f"建議 max_length = {rec['max_length']}（截斷 {rec['examples_cut_pct']}% 的樣本）",
            f"suggested max_length = {rec['max_length']} (cuts {rec['examples_cut_pct']}% of examples)",
        ),
    )
    ax.set_xlim(0, max(top, rec["max_length"]) * 1.05)
    ax.set_xlabel(
        plots.label(
            "每筆樣本的 token 數（提示＋答案，含對話模板）", "tokens per example (prompt + answer, chat template)"
        )
    )
    ax.set_ylabel(plots.label("樣本數", "examples"))
    ax.set_title(plots.label("Token 長度分布", "Token length distribution"))
    ax.legend()
    return ax


CUT_COLUMNS = {
    "max_length": "max_length",
    "examples_cut": "被截斷的樣本數",
    "examples_cut_pct": "被截斷的樣本 %",
    "tokens_lost_pct": "損失的 token %",
}


def cut_length_table(report: dict):
    """:func:`length_report`'s ``cut_table`` for people: one row per candidate ``max_length``, Chinese headers."""
    return pd.DataFrame(report["cut_table"]).rename(columns=CUT_COLUMNS).set_index("max_length")
