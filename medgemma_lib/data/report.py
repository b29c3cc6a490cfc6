"""The preparation report, printed in Traditional Chinese."""

from __future__ import annotations

import pandas as pd

from medgemma_lib.data.clean import CLEAN_COUNTS, DROP_REASONS

_SPLIT_NAMES = {"train": "訓練集", "validation": "驗證集", "test": "測試集", "test_mix": "混合來源測試集（test_mix）"}


def _cleaned_line(cleaned: dict | None, where: list[str], indent: str = "") -> list[str]:
    """The HTML cleanup in one line (nothing when there was none)."""
    if not cleaned or not cleaned.get("rows_with_html"):
        return []
    shown = f"（例如 {'、'.join(where[:3])}）" if where else ""
    emptied = cleaned.get("emptied_by_html", 0)
    tail = f"；其中 {emptied:,} 列清理後變成空的，已計入上面「空的」" if emptied else ""
    return [
        f"{indent}HTML 清理：{cleaned['rows_with_html']:,} 列含 HTML{shown}，移除標籤 {cleaned['html_tags']:,} 個、"
        f"解碼字元實體 {cleaned['html_entities']:,} 個{tail}"
    ]


def _mix_lines(mix: dict) -> list[str]:
    lines = [
        f"資料混合（data.mix）：主要訓練 {mix['main_train']:,} 筆，混合後訓練集 {mix['train_total']:,} 筆"
        f"（每個來源抽 round(fraction × N_main / (1 − Σfraction)) 筆）"
    ]
    for src in mix["sources"]:
        sp = src["splits"]
        repeats = f"，其中重複 {src['repeats']:,} 筆（來源的訓練集只有 {sp['train']:,} 筆）" if src["repeats"] else ""
        conv = f"，{src['chinese_conversion']} 轉換" if src.get("chinese_conversion") else ""
        leak = src["leakage"]
        lines += [
            f"  - {src['name']}（{src['path']}，sha256 {src['sha256'][:12]}…{conv}）：讀入 {src['rows_in']:,} ＝ 保留 "
            f"{src['kept']:,} ＋ 捨棄 {sum(src['dropped'].values()):,}；自己的切分 訓練 {sp['train']:,}／驗證 "
            f"{sp['validation']:,}／測試 {sp['test']:,}，跨集合主題 {leak['focus_areas_in_two_splits']} 個",
            f"    進訓練集 {src['sampled_into_train']:,} 筆{repeats}；比例 設定 {src['fraction_stated']:.2%}、實際 "
            f"{src['fraction_actual']:.2%}；驗證集 {src['validation_used']:,} 筆；test_mix {src['test_mix']:,} 筆"
            + ("（fraction 0：只用來評估，不訓練）" if src["fraction_stated"] == 0 else ""),
        ]
        lines += [f"    {d}" for d in _dropped_lines(src["dropped"], src.get("drop_examples", {}))]
        lines += _cleaned_line(src.get("cleaned"), src.get("cleaned_examples", []), "    ")
        deid = src.get("deidentification") or {}
        if deid.get("rows_affected"):
            found = "、".join(f"{k} {v}" for k, v in (deid.get("counts_by_label") or {}).items())
            lines.append(f"    個資掃描（{deid.get('mode')}）：{deid['rows_affected']} 筆含疑似個資（{found}）")
    lines.append("  驗證集規則：" + mix["rules"]["validation"])
    return lines


def _dropped_lines(dropped: dict, examples: dict) -> list[str]:
    lines = []
    for key, n in dropped.items():
        if n:
            where = examples.get(key, [])
            shown = f"（例如 {'、'.join(where[:3])}）" if where else ""
            lines.append(f"  - {DROP_REASONS.get(key, key)}：{n:,} 筆{shown}")
    return lines


def format_report(report: dict) -> str:
    """A short Chinese summary: input, counts by reason (they add up), HTML cleanup, splits, mix, leakage, lengths."""
    inp, counts = report["input"], report["counts"]
    enc = inp.get("encoding") or "—"
    enc_note = "（自動偵測）" if inp.get("encoding_detected") else ""
    lines = [
        f"輸入：{inp['path']}（格式 {inp['format']}，編碼 {enc}{enc_note}，sha256 {inp['sha256'][:12]}…）",
        f"讀入 {counts['rows_in']:,} 筆 ＝ 保留 {counts['kept']:,} 筆 ＋ 捨棄 {sum(counts['dropped'].values()):,} 筆",
    ]
    lines += _dropped_lines(counts["dropped"], report.get("drop_examples", {}))
    lines += _cleaned_line(counts.get("cleaned"), report.get("cleaned_examples", []), "  ")
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
    if report.get("mix"):
        lines += _mix_lines(report["mix"])
    leak = report.get("leakage", {})
    which = "（主要資料）" if report.get("mix") else ""
    lines.append(
        f"洩漏檢查{which}：跨集合的主題 {leak.get('focus_areas_in_two_splits', 0)} 個、"
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
    """Rows in, kept, dropped by reason and the HTML cleanup counts as a pandas table (for notebooks)."""

    counts = report["counts"]
    rows = [("讀入", counts["rows_in"])]
    rows += [(f"捨棄：{DROP_REASONS.get(k, k)}", v) for k, v in counts["dropped"].items()]
    rows += [("保留", counts["kept"])]
    # HTML cleanup changes rows but drops none (an emptied row is in 捨棄：答案是空的), so it sits below 保留.
    rows += [(f"清理：{CLEAN_COUNTS[k]}", v) for k, v in counts.get("cleaned", {}).items() if k in CLEAN_COUNTS]
    return pd.DataFrame(rows, columns=["項目", "筆數"]).set_index("項目")


def splits_table(report: dict):
    """Rows, focus areas and rows per source for each split."""

    data = {}
    for name, stats in report["splits"].items():
        col = {"筆數": stats["rows"], "主題數": stats["focus_areas"]}
        col.update({f"來源：{s or '（無）'}": n for s, n in stats["sources"].items()})
        data[_SPLIT_NAMES.get(name, name)] = col
    return pd.DataFrame(data).fillna(0).astype(int)


def mix_table(report: dict):
    """One row per data.mix source: rows, its own split, sampled into train (repeats), fractions, test_mix."""

    rows = {}
    for src in report.get("mix", {}).get("sources", []):
        rows[src["name"]] = {
            "讀入": src["rows_in"],
            "保留": src["kept"],
            "自己的訓練集": src["splits"]["train"],
            "抽進訓練": src["sampled_into_train"],
            "其中重複": src["repeats"],
            "設定比例": f"{src['fraction_stated']:.2%}",
            "實際比例": f"{src['fraction_actual']:.2%}",
            "加入驗證": src["validation_used"],
            "test_mix": src["test_mix"],
        }
    return pd.DataFrame(rows).T.rename_axis("來源")
