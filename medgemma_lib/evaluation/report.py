"""What a person reads of evaluation results: tables, summaries and the ``eval.md`` / ``eval.png`` reports.

The inputs are plain dicts that other modules already wrote or returned: ``run_evaluation``'s result (``eval.json``),
a quality report (``report.json`` of the shipped adapter, ``docs/quality/*.json``) and
``reference.compare_adapters``'s comparison. Nothing here loads a model or computes a metric (that is
:mod:`.metrics`), so a notebook cell calls one function instead of looping over keys, and each table or line is
tested once (``tests/test_report.py``, ``tests/test_evaluate.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display, plots
from medgemma_lib.core.atomic import atomic_file, write_json, write_text
from medgemma_lib.core.errors import OutputError
from medgemma_lib.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES
from medgemma_lib.models.generation import THINKING_SYSTEM_PROMPT, fold_thought_markdown, load_before_answers
from medgemma_lib.training.runs import EVAL_JSON, EVAL_MD, EVAL_PNG


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


# ----------------------------------------------------------------------------------------------
# Evaluation reports (eval.md, eval.png)


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_diff(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    better = value < 0 if key in LOWER_IS_BETTER else value > 0
    mark = "" if key == "length" or value == 0 else (" ✓" if better else " ✗")
    return f"{value:+.{4 if key == 'loss' else 2}f}{mark}"


def comparison_rows(result: dict, section: str = "models") -> list[dict]:
    """Rows ``指標 / 基礎模型 / 微調後 / 差異`` for the main (or ``chinese``) table."""
    models = result[section] if section == "models" else result["chinese"]["models"]
    diff = result["difference"] if section == "models" else result["chinese"]["difference"]
    ci = (result.get("ci95") if section == "models" else result["chinese"].get("ci95")) or {}
    rows = []
    for key, label in METRIC_NAMES.items():
        b, t = models["base"].get(key), models["tuned"].get(key)
        if b is None and t is None:
            continue
        digits = 4 if key == "loss" else 2
        rows.append(
            {
                "指標": label,
                "基礎模型": _fmt(b, digits),
                "微調後": _fmt(t, digits),
                "差異": _fmt_diff(key, diff.get(key)),
            }
        )
        if ci:
            rows[-1]["差異的 95% 信賴區間"] = fmt_interval(key, (ci.get(key) or {}).get("ci95"))
    return rows


def fmt_interval(key: str, interval) -> str:
    """``[low, high]`` with ✓ (wholly better), ✗ (wholly worse) or ≈ (includes zero: no clear difference)."""
    if not interval or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in interval):
        return "—"
    low, high = interval
    digits = 4 if key == "loss" else 2
    if key == "length":
        mark = ""
    elif low > 0 or high < 0:
        better = high < 0 if key in LOWER_IS_BETTER else low > 0
        mark = " ✓" if better else " ✗"
    else:
        mark = " ≈"
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


def language_rows(result: dict) -> list[dict]:
    """Language fidelity: share of answers in the language of their question, base vs tuned."""
    lang = result.get("language") or {}
    rows = []
    for part, label in (("english", "英文問題"), ("chinese", "中文問題")):
        entry = lang.get(part) or {}
        if not entry or not entry.get("base", {}).get("answers"):
            continue
        row = {"問題": label, "題數": entry["base"]["answers"]}
        for name, col in (("base", "基礎模型"), ("tuned", "微調後")):
            f = entry[name]
            row[col] = f"{f['fidelity'] * 100:.1f}%（{f['same_language']}/{f['answers']}）"
        rows.append(row)
    share = lang.get("simplified_share") or {}
    if rows and share.get("base") is not None:
        ref = lang.get("simplified_share_reference")
        rows.append(
            {
                "問題": "中文答案中的簡體字比例",
                "題數": "—",
                "基礎模型": _fmt_pct(share.get("base")),
                "微調後": _fmt_pct(share.get("tuned")),
            }
        )
        if ref is not None:
            rows[-1]["問題"] += f"（參考答案 {_fmt_pct(ref)}）"
    return rows


def _fmt_pct(value) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def decoding_rows(result: dict) -> list[dict]:
    """What ``max_new_tokens`` cuts: reference lengths in tokens and the share of answers stopped by the limit."""
    rows = []
    for part, label in (("english", "英文"), ("chinese", "中文")):
        d = (result.get("decoding") or {}).get(part) or {}
        if not d:
            continue
        ref = d["reference_tokens"]
        cut = d["answers_cut_at_limit"]
        rows.append(
            {
                "題目": label,
                "上限（token）": d["max_new_tokens"],
                "參考答案 token 中位數 / p90": f"{ref['median']} / {ref['p90']}",
                "參考答案超過上限": _fmt_pct(d["references_longer_than_limit"]),
                "被上限截斷：基礎模型": _fmt_pct(cut.get("base")),
                "被上限截斷：微調後": _fmt_pct(cut.get("tuned")),
            }
        )
    return rows


STOPPING_NOTE = (
    "停止率：產生的答案在 max_new_tokens 之前以 <end_of_turn> 或 <eos> 結束的比例。"
    "停止機率：把完整的參考答案餵給模型（teacher forcing）之後，下一個 token 是 <end_of_turn> 的機率，取平均。"
    "長度比：答案 token 數 ÷ 參考答案 token 數的中位數（都含停止符號；被上限截斷的答案以上限計）。\n"
)


def stopping_rows(result: dict) -> list[dict]:
    """Does each model end its answers: stop rate, stop probability, median length ratio (base vs tuned)."""
    rows = []
    for part, label in (("english", "英文"), ("chinese", "中文")):
        st = (result.get("stopping") or {}).get(part) or {}
        if not st:
            continue
        ci = st.get("ci95") or {}
        for key, name, fmt in (
            ("stop_rate", f"停止率（{st.get('n_generated', 0)} 題）", _fmt_pct),
            ("stop_probability", f"停止機率（{st.get('n_probability', 0)} 題）", _fmt_prob),
            ("length_ratio_median", "長度比（中位數）", lambda v: _fmt(v, 2)),
        ):
            if key not in st:
                continue
            row = {
                "題目": label,
                "指標": name,
                "基礎模型": fmt(st[key].get("base")),
                "微調後": fmt(st[key].get("tuned")),
            }
            interval = (ci.get(key) or {}).get("ci95")
            row["差異的 95% 信賴區間"] = (
                f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval and None not in interval else "—"
            )
            rows.append(row)
    return rows


def _fmt_prob(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.1e}"


def stopping_table(result: dict):
    """The stopping rows as a DataFrame (notebook 06)."""
    return pd.DataFrame(stopping_rows(result))


def comparison_table(result: dict, section: str = "models"):
    """The base vs fine-tuned table as a pandas DataFrame (for notebooks)."""

    return pd.DataFrame(comparison_rows(result, section)).set_index("指標")


def breakdown_table(result: dict, by: str = "source"):
    """Per source (``by="source"``) or question type (``by="qtype"``): loss and ROUGE-L, base vs tuned."""

    rows = []
    for key, e in result[f"by_{by}"].items():
        rows.append(
            {
                "來源" if by == "source" else "問題類型": key,
                "loss 筆數": e["loss_examples"],
                "loss 基礎": _fmt(e["base"]["loss"], 4),
                "loss 微調後": _fmt(e["tuned"]["loss"], 4),
                "生成題數": e["generated"],
                "ROUGE-L 基礎": _fmt(e["base"]["rougeL"]),
                "ROUGE-L 微調後": _fmt(e["tuned"]["rougeL"]),
            }
        )
    return pd.DataFrame(rows)


def side_by_side_markdown(result: dict, n: int | None = None, chinese: bool = False) -> str:
    """A few questions with the reference, base and fine-tuned answers, under the medical disclaimer."""
    rows = result["chinese"]["answers"] if chinese else result["answers"]
    n = result.get("num_side_by_side", 3) if n is None else n
    parts = [f"> {MEDICAL_DISCLAIMER}\n"]
    for i, row in enumerate(rows[:n], 1):
        where = f"（{row.get('source', '')}{'，' + row['qtype'] if row.get('qtype') else ''}）"
        parts.append(f"### {i}. {row['question']} {where}\n")
        parts.append(f"**參考答案**：{display.clip(row['reference'], markdown=True)}\n")
        for name, label in (("base", "基礎模型"), ("tuned", "微調後")):
            s = row["scores"].get(name, {})
            thought = (row.get("thoughts") or {}).get(name)
            parts.append(
                f"**{label}**（ROUGE-L {_fmt(s.get('rougeL'))}，chrF {_fmt(s.get('chrf'))}）："
                + (fold_thought_markdown("", thought) if thought else "")
                + f"{display.clip(row['answers'].get(name, ''), markdown=True) or '（空白）'}\n"
            )
    return "\n".join(parts)


def before_after_markdown(result: dict, before: dict) -> str:
    """Answers saved before fine-tuning (notebook 04) next to the fine-tuned answers, same questions."""
    tuned = {
        row["question"]: row["answers"].get("tuned", "") for row in result["chinese"]["answers"] + result["answers"]
    }
    parts = [f"> {MEDICAL_DISCLAIMER}\n"]
    for item in before.get("answers", []):
        if item["question"] in tuned:
            parts.append(f"**問：{item['question']}**\n")
            parts.append(f"- 微調前（notebook 04）：{display.clip(item['answer'], markdown=True) or '（空白）'}")
            parts.append(f"- 微調後：{display.clip(tuned[item['question']], markdown=True) or '（空白）'}\n")
    return "\n".join(parts) if len(parts) > 1 else "（沒有相同的問題可以比較）"


def before_after_section(result: dict, results_dir: str | Path | None = None) -> str:
    """Markdown of the answers saved before fine-tuning next to the fine-tuned ones (notebook 06), or, when notebook 04
    has not saved them yet, a Chinese note saying how to get them (the lesson goes on either way)."""
    try:
        before = load_before_answers(result["profile"], results_dir)
    except OutputError as err:
        return f"> {err.format()}"
    return before_after_markdown(result, before)


def _thinking_line(settings: dict) -> str:
    """The report's sentence on thinking: the system prompt used, and that only the answer is scored."""
    on = settings.get("thinking")
    with_thought = settings.get("answers_with_thought") or {}
    counts = (
        f"（帶思考過程的答案：基礎模型 {with_thought.get('base', 0)} 題、微調後 {with_thought.get('tuned', 0)} 題）"
    )
    prompt = f"加上系統指示 `{THINKING_SYSTEM_PROMPT}`" if on else "未加思考系統指示（eval.thinking: false）"
    return (
        f"- 思考過程：{prompt}{counts}；ROUGE-L、BLEU、chrF 與答案長度只計算答案，"
        "`<unused94>…<unused95>` 之間的思考過程不計分，另存於 eval.json 的 thoughts 欄位"
    )


def render_markdown(result: dict) -> str:
    s = result["settings"]
    lang_rule = (result.get("language") or {}).get("rule", "")
    lines = [
        f"# 評估報告：{result['run']}\n",
        f"> {MEDICAL_DISCLAIMER}\n",
        f"- 模型：{result['profile']}（{result['quantization']}），LoRA 轉接器 `{result['adapter']}`",
        f"- 測試集 {s['test_examples']} 筆；loss 用 {s['loss_examples']} 筆；"
        f"英文產生 {s['generated_english']} 題、中文 {s['generated_chinese']} 題，"
        f"貪婪解碼（greedy），每題最多 {s['max_new_tokens']} 個 token",
        "- 基礎模型與微調後模型是同一份權重：基礎模型的數字是在 `model.disable_adapter()` 之內量的",
        f"- 斷詞方式：{result['tokenization']['english']}；{result['tokenization']['chinese']}",
        f"- loss：{result['tokenization']['loss']}",
        _thinking_line(s),
        f"- 產生時間：{result['created']}，共 {result['seconds']:.0f} 秒\n",
        "## 基礎模型 vs 微調後（英文測試集）\n",
        display.markdown_table(comparison_rows(result)).data + "\n",
        "✓ 表示微調後較好（loss、困惑度越低越好；ROUGE-L、BLEU、chrF 越高越好）。"
        "答案長度受 max_new_tokens 限制，參考答案平均長度："
        f"{_fmt(result['models']['base'].get('reference_length'), 0)} 個單字。\n",
        *(
            [
                "## 答案的語言（語言一致率）\n",
                display.markdown_table(language_rows(result)).data + "\n",
                f"判定方式：{lang_rule}。\n",
            ]
            if language_rows(result)
            else []
        ),
        *(
            ["## 答案有沒有說完就停\n", display.markdown_table(stopping_rows(result)).data + "\n", STOPPING_NOTE]
            if stopping_rows(result)
            else []
        ),
        *(
            ["## 解碼上限截掉了什麼\n", display.markdown_table(decoding_rows(result)).data + "\n"]
            if decoding_rows(result)
            else []
        ),
        "## 依來源\n",
        display.markdown_table(breakdown_table(result, "source").to_dict("records")).data + "\n",
        "## 依問題類型\n",
        display.markdown_table(breakdown_table(result, "qtype").to_dict("records")).data + "\n",
    ]
    if result["chinese"]["answers"]:
        lines += [
            f"## 中文問題（{result['settings'].get('chinese_questions', '原始指南的三題＋隨附中文樣本')}）\n",
            display.markdown_table(comparison_rows(result, "chinese")).data + "\n",
            side_by_side_markdown(result, n=len(result["chinese"]["answers"]), chinese=True),
        ]
    lines += ["## 答案並排（英文測試題）\n", side_by_side_markdown(result)]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path: str | Path | None = None):
    """Bars: test loss (left) and ROUGE-L / BLEU / chrF (right), base vs fine-tuned. Returns the figure."""

    plots.setup_cjk_font()

    base, tuned = result["models"]["base"], result["models"]["tuned"]
    names = (plots.label("基礎模型", "base"), plots.label("微調後", "fine-tuned"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    ax1.bar(names, [base["loss"], tuned["loss"]], color=["#9e9e9e", "#1e88e5"])
    ax1.set_title(plots.label("測試集 loss（越低越好）", "test loss (lower is better)"))
    for i, v in enumerate([base["loss"], tuned["loss"]]):
        ax1.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    metrics = [("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("chrf", "chrF")]
    xs = range(len(metrics))
    width = 0.38
    for offset, (m, color, name) in zip(
        (-width / 2, width / 2), ((base, "#9e9e9e", names[0]), (tuned, "#1e88e5", names[1]))
    ):
        vals = [m.get(k) or 0.0 for k, _ in metrics]
        ax2.bar([x + offset for x in xs], vals, width, color=color, label=name)
    ax2.set_xticks(list(xs), [n for _, n in metrics])
    ax2.set_title(
        plots.label("英文答案與參考答案的重疊（越高越好）", "overlap with reference answers (higher is better)")
    )
    ax2.legend()
    fig.suptitle(f"{result['run']} ({result['profile']})")
    fig.tight_layout()
    if path is not None:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    return fig


def write_reports(result: dict, run_dir: str | Path) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and ``eval.png`` into ``run_dir`` (each atomically)."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / EVAL_JSON, "md": run_dir / EVAL_MD, "png": run_dir / EVAL_PNG}
    try:
        write_json(paths["json"], result, indent=2)
        write_text(paths["md"], render_markdown(result))
        fig = plot_comparison(result)
        with atomic_file(paths["png"]) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
    except OSError as exc:
        raise OutputError(
            f"無法把評估結果寫入 {run_dir}：{exc.strerror or exc}", hint="請確認磁碟空間與資料夾寫入權限。"
        ) from None
    return paths
