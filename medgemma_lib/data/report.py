"""The preparation report, printed in Traditional Chinese."""

from __future__ import annotations

import pandas as pd

from medgemma_lib.data.clean import DROP_REASONS

_SPLIT_NAMES = {"train": "訓練集", "validation": "驗證集", "test": "測試集"}


def format_report(report: dict) -> str:
    """A short Chinese summary: input, counts by reason (they add up), splits, leakage, lengths."""
    inp, counts = report["input"], report["counts"]
    enc = inp.get("encoding") or "—"
    enc_note = "（自動偵測）" if inp.get("encoding_detected") else ""
    lines = [
        f"輸入：{inp['path']}（格式 {inp['format']}，編碼 {enc}{enc_note}，sha256 {inp['sha256'][:12]}…）",
        f"讀入 {counts['rows_in']:,} 筆 ＝ 保留 {counts['kept']:,} 筆 ＋ 捨棄 {sum(counts['dropped'].values()):,} 筆",
    ]
    for key, n in counts["dropped"].items():
        if n:
            where = report.get("drop_examples", {}).get(key, [])
            shown = f"（例如 {'、'.join(where[:3])}）" if where else ""
            lines.append(f"  - {DROP_REASONS.get(key, key)}：{n:,} 筆{shown}")
    if counts.get("answers_truncated"):
        lines.append(f"  - 另有 {counts['answers_truncated']:,} 筆答案超過上限，已在句子邊界截斷（保留）")
    lines.append("切分（同一主題或同一問題只會出現在一個集合）：")
    for name, stats in report["splits"].items():
        limited = counts.get("removed_by_limits", {}).get(name, 0)
        extra = f"（依筆數上限另外略過 {limited:,} 筆）" if limited else ""
        lines.append(
            f"  - {_SPLIT_NAMES.get(name, name)}：{stats['rows']:,} 筆，{stats['focus_areas']:,} 個主題，"
            f"來源 {len(stats['sources'])} 個{extra}"
        )
    leak = report.get("leakage", {})
    lines.append(
        f"洩漏檢查：跨集合的主題 {leak.get('focus_areas_in_two_splits', 0)} 個、"
        f"跨集合的相同問題 {leak.get('questions_in_two_splits', 0)} 個"
    )
    deid = report.get("deidentification")
    if deid:
        found = "、".join(f"{k} {v}" for k, v in deid.get("counts_by_label", {}).items()) or "無"
        lines.append(f"個資掃描（{deid.get('mode')}）：{deid.get('rows_affected', 0)} 筆含疑似個資（{found}）")
    tl = report.get("token_lengths")
    if tl:
        total, rec = tl["summary"]["total"], tl["recommended"]
        lines.append(
            f"Token 長度（合計）：中位數 {total['median']}、p90 {total['p90']}、p99 {total['p99']}、"
            f"最大 {total['max']}；"
            f"建議 max_length = {rec['max_length']}（截斷 {rec['examples_cut_pct']}% 的樣本、"
            f"{rec['tokens_lost_pct']}% 的 token）"
        )
    if report.get("output"):
        lines.append(f"已存到：{report['output']}/（splits/ 與 prepare_report.json）")
    return "\n".join(lines)


def counts_table(report: dict):
    """Rows in, kept and dropped by reason as a pandas table (for notebooks)."""

    counts = report["counts"]
    rows = [("讀入", counts["rows_in"])]
    rows += [(f"捨棄：{DROP_REASONS.get(k, k)}", v) for k, v in counts["dropped"].items()]
    rows += [("保留", counts["kept"])]
    return pd.DataFrame(rows, columns=["項目", "筆數"]).set_index("項目")


def splits_table(report: dict):
    """Rows, focus areas and rows per source for each split."""

    data = {}
    for name, stats in report["splits"].items():
        col = {"筆數": stats["rows"], "主題數": stats["focus_areas"]}
        col.update({f"來源：{s or '（無）'}": n for s, n in stats["sources"].items()})
        data[_SPLIT_NAMES.get(name, name)] = col
    return pd.DataFrame(data).fillna(0).astype(int)
