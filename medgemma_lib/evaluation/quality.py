"""The reference quality run: train, evaluate base vs fine-tuned with intervals, write ``docs/quality/``.

``python -m medgemma_lib quality --config configs/medquad-full.yaml --report docs/quality/medquad-full-gemma3-270m``
is one command on one GPU: it checks its input (config, data files, report folder) before it
writes anything, trains with :func:`medgemma_lib.training.train.run_training` (as ``train`` does), evaluates
with :func:`medgemma_lib.evaluation.evaluate.run_evaluation` (as ``evaluate`` does) and writes
``<report>.json`` and ``<report>.md``: the metrics of both models, paired-bootstrap 95 % intervals
of every difference, the breakdown by source and question type with counts, answer length, what
the token limit cuts, language fidelity, and the command, GPU, versions and date.

The JSON keys that notebook 06 and the tests rely on: ``n_test_loss``, ``n_generate``, ``base`` and
``tuned`` (``loss``, ``rougeL``, ``chrf``, ``bleu``, ...), ``diff`` and ``diff_ci95`` (``[low, high]``
per metric), ``chinese`` (the same for the held-out Chinese questions), ``language``, ``command``,
``hardware``, ``versions``, ``date``.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.atomic import write_json, write_text
from medgemma_lib.core.config import load_config
from medgemma_lib.core.display import markdown_table
from medgemma_lib.core.errors import ConfigError, DataError, OutputError
from medgemma_lib.core.machine import machine_facts, package_versions
from medgemma_lib.core.paths import display_path, resolve_path
from medgemma_lib.data import prepare_from_config
from medgemma_lib.evaluation.evaluate import run_evaluation
from medgemma_lib.evaluation.metrics import METRIC_NAMES
from medgemma_lib.evaluation.report import STOPPING_NOTE, decoding_rows, fmt_interval, language_rows, stopping_rows
from medgemma_lib.setup.env import KEY_PACKAGES
from medgemma_lib.training.train import run_training
from medgemma_lib.training.trainer import free_memory

METRICS = ("loss", "perplexity", "rougeL", "bleu", "chrf", "length")
PACKAGES = (*KEY_PACKAGES, *(p for p in ("liger-kernel", "rouge-score") if p not in KEY_PACKAGES))
ANSWER_CLIP = 400  # characters of an answer shown in the report's side-by-side
VERDICT_METRICS = {"loss": "測試集 loss", "rougeL": "ROUGE-L", "chrf": "chrF", "bleu": "BLEU"}


def report_paths(report: str | Path) -> tuple[Path, Path]:
    """``<report>.json`` and ``<report>.md`` (a given suffix is dropped)."""
    base = resolve_path(report)
    if base.suffix in (".json", ".md"):
        base = base.with_suffix("")
    return base.with_suffix(".json"), base.with_suffix(".md")


def check_inputs(cfg, report: str | Path) -> tuple[Path, Path]:
    """Refuse, before anything is written, a report folder that is missing or data files that are not there."""
    json_path, md_path = report_paths(report)
    if not json_path.parent.is_dir():
        raise OutputError(
            f"報告的資料夾 {display_path(json_path.parent)} 不存在。",
            hint="請先建立資料夾（例如 mkdir -p docs/quality），或以 --report 指向已存在的資料夾。",
        )
    inputs = [("data.input", cfg.data.input)] + [
        (f"data.mix[{i}].input", m.get("input") if isinstance(m, dict) else getattr(m, "input", None))
        for i, m in enumerate(getattr(cfg.data, "mix", None) or [])
    ]
    for key, value in inputs:
        if not value or not resolve_path(value).exists():
            raise DataError(
                f"{key} 指向的資料 {value} 不存在。",
                hint=f"完整訓練需要 ../shared/data/ 的 MedQuAD（與中文資料）；請確認路徑，或以 {key}=<路徑> 覆寫。",
            )
    if cfg.eval.bootstrap_resamples <= 0:
        raise ConfigError(
            "品質報告需要信賴區間，但 eval.bootstrap_resamples 是 0。",
            hint="請設 eval.bootstrap_resamples=2000（設定檔或命令列覆寫）。",
        )
    return json_path, md_path


def environment() -> dict:
    """GPU (or CPU), Python and the versions of the packages that decide the numbers."""
    facts = machine_facts()
    hardware = {"python": facts["python"], "cpu": facts["cpu"]}
    if facts["gpus"]:
        gpu = facts["gpus"][0]
        hardware.update(gpu=gpu["name"], gpu_memory_gib=gpu["memory_gib"], cuda=facts["cuda"])
    else:
        hardware["gpu"] = None
    return {"hardware": hardware, "versions": package_versions(PACKAGES)}


def _metrics(models: dict, name: str) -> dict:
    m = models.get(name) or {}
    return {k: m.get(k) for k in (*METRICS, "reference_length", "examples", "tokens") if k in m}


def _intervals(ci: dict) -> dict:
    return {k: v["ci95"] for k, v in ci.items()}


def build_report(result: dict, train_summary: dict, cfg, command: str, prepare_report: dict | None = None) -> dict:
    """The ``docs/quality`` JSON from an evaluation result (``eval.json``) and the run's training summary."""
    zh = result["chinese"]
    report = {
        "title": f"{cfg.model.profile}（{cfg.train.run_name or '—'}）：微調前後比較",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        **environment(),
        "model": {"profile": cfg.model.profile, "quantization": result.get("quantization")},
        "config": cfg.to_dict(),
        "training": {
            k: train_summary.get(k)
            for k in (
                "global_step",
                "train_seconds",
                "tokens_trained",
                "tokens_per_second",
                "initial_eval_loss",
                "final_eval_loss",
                "final_train_loss",
                "trainable_params",
                "micro_batch",
                "gradient_accumulation_steps",
                "stop_token",
            )
        },
        "data": _data_summary(prepare_report),
        "n_test": result["settings"]["test_examples"],
        "n_test_loss": result["settings"]["loss_examples"],
        "n_generate": result["settings"]["generated_english"],
        "n_generate_chinese": result["settings"]["generated_chinese"],
        "decoding": {"method": "greedy", **result.get("decoding", {})},
        "base": _metrics(result["models"], "base"),
        "tuned": _metrics(result["models"], "tuned"),
        "diff": {k: v for k, v in result["difference"].items() if v is not None},
        "diff_ci95": _intervals(result.get("ci95", {})),
        **_stopping(result, "english"),
        "stopping": result.get("stopping", {}),
        "bootstrap": {
            "resamples": result["settings"].get("bootstrap_resamples"),
            "method": "paired bootstrap over questions (loss: over test examples), percentile 95 % interval",
        },
        "by_source": result["by_source"],
        "by_qtype": result["by_qtype"],
        "language": result.get("language", {}),
        "chinese": {
            "questions": result["settings"].get("chinese_questions"),
            "n": result["settings"]["generated_chinese"],
            "base": _metrics(zh["models"], "base"),
            "tuned": _metrics(zh["models"], "tuned"),
            "diff": {k: v for k, v in zh["difference"].items() if v is not None},
            "diff_ci95": _intervals(zh.get("ci95", {})),
            **_stopping(result, "chinese"),
        },
        "answers": result["answers"][:5],
        "chinese_answers": zh["answers"][:5],
        "disclaimer": MEDICAL_DISCLAIMER,
        "evaluation_seconds": result.get("seconds"),
    }
    report["verdict"] = verdict(report)
    return report


def _stopping(result: dict, part: str) -> dict:
    """``stop_rate``, ``stop_probability`` (each ``{"base": x, "tuned": y}``), the median length ratio and
    their intervals, for one language section."""
    st = (result.get("stopping") or {}).get(part) or {}
    out = {k: st[k] for k in ("stop_rate", "stop_probability", "length_ratio_median") if k in st}
    out["stop_ci95"] = _intervals(st.get("ci95", {}))
    return out


def _data_summary(prep: dict | None) -> dict:
    if not prep:
        return {}
    counts = prep.get("counts", {})
    out = {
        "input": prep.get("input", {}).get("path"),
        "sha256": prep.get("input", {}).get("sha256"),
        "rows_in": counts.get("rows_in"),
        "kept": counts.get("kept"),
        "dropped": counts.get("dropped"),
        "cleaned": counts.get("cleaned"),
        "answers_truncated": counts.get("answers_truncated"),
        "splits": counts.get("final"),
    }
    if prep.get("mix"):
        out["mix"] = prep["mix"]
    return out


def verdict(report: dict) -> list[str]:
    """One Chinese sentence per headline metric, read off its interval (not written by hand)."""
    lines = []
    for part, label in ((report, "英文測試題"), (report["chinese"], "中文題")):
        for key, name in VERDICT_METRICS.items():
            ci = part["diff_ci95"].get(key)
            if not ci or ci[0] is None:
                continue
            low, high = ci
            lower_better = key == "loss"
            if (high < 0) if lower_better else (low > 0):
                word = "確實變好"
            elif (low > 0) if lower_better else (high < 0):
                word = "確實變差"
            else:
                word = "看不出差異（區間含 0）"
            d = 4 if key == "loss" else 2
            diff = part["diff"][key]
            lines.append(
                f"{label} {name}：微調後 − 基礎模型 = {diff:+.{d}f}，95% 區間 [{low:+.{d}f}, {high:+.{d}f}]，{word}"
            )
        rate, prob = part.get("stop_rate"), part.get("stop_probability")
        if rate:
            lines.append(
                f"{label} 說完就停：停止率 {rate['base']:.1%} → {rate['tuned']:.1%}"
                + (f"，停止機率平均 {prob['base']:.2g} → {prob['tuned']:.2g}" if prob else "")
            )
    return lines


def render_markdown(report: dict, compare: list[dict] | None = None) -> str:
    """The Markdown beside the JSON: everything a reader needs, from the JSON alone."""

    hw, tr = report["hardware"], report["training"]
    versions = "、".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines = [
        f"# {report['title']}\n",
        f"> {MEDICAL_DISCLAIMER}\n",
        f"- 指令：`{report['command']}`",
        f"- 硬體：{hw.get('gpu') or 'CPU'}（{hw.get('gpu_memory_gib', '—')} GiB），Python {hw['python']}；{versions}",
        f"- 日期：{report['date']}",
        f"- 訓練：{tr['global_step']} 步，{_num(tr['tokens_trained'])} 個 token，{_num(tr['train_seconds'], 1)} 秒"
        f"（{_num(tr['tokens_per_second'])} token/秒）；驗證 loss {_num(tr['initial_eval_loss'], 4)} → "
        f"{_num(tr['final_eval_loss'], 4)}",
        f"- 測試：loss 用 {report['n_test_loss']} 筆（整個測試集 {report['n_test']} 筆），"
        f"英文產生 {report['n_generate']} 題、中文 {report['n_generate_chinese']} 題，"
        f"貪婪解碼，每題最多 {report['config']['eval']['max_new_tokens']} 個 token",
        f"- 信賴區間：{report['bootstrap']['method']}，{report['bootstrap']['resamples']} 次重抽\n",
        "## 結論（由區間讀出）\n",
        *[f"- {line}" for line in report["verdict"]],
        "",
        "## 英文測試題：基礎模型 vs 微調後\n",
        markdown_table(_rows(report, fmt_interval)).data + "\n",
        "## 中文題\n",
        f"題目：{report['chinese']['questions']}\n",
        markdown_table(_rows(report["chinese"], fmt_interval)).data + "\n",
    ]
    lang = language_rows({"language": report.get("language")})
    if lang:
        lines += [
            "## 答案的語言\n",
            markdown_table(lang).data + "\n",
            f"判定方式：{report['language'].get('rule', '')}。\n",
        ]
    stop = stopping_rows({"stopping": report.get("stopping")})
    if stop:
        lines += ["## 答案有沒有說完就停\n", markdown_table(stop).data + "\n", STOPPING_NOTE]
    dec = decoding_rows({"decoding": report.get("decoding")})
    if dec:
        lines += ["## 解碼上限截掉了什麼\n", markdown_table(dec).data + "\n"]
    for key, label in (("by_source", "依來源"), ("by_qtype", "依問題類型")):
        lines += [f"## {label}\n", markdown_table(_breakdown_rows(report[key])).data + "\n"]
    if compare:
        lines += ["## 與其他完整訓練比較\n", markdown_table(compare_rows([*compare, report])).data + "\n"]
    lines += ["## 答案並排（前幾題）\n", f"> {MEDICAL_DISCLAIMER}\n"]
    for row in report["answers"][:3] + report["chinese_answers"][:3]:
        lines.append(f"**問：{display.clip(row['question'], 300, markdown=True)}**\n")
        lines.append(f"- 參考答案：{display.clip(row['reference'], ANSWER_CLIP, markdown=True)}")
        for name, label in (("base", "基礎模型"), ("tuned", "微調後")):
            lines.append(
                f"- {label}：{display.clip(row['answers'].get(name, ''), ANSWER_CLIP, markdown=True) or '（空白）'}"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def metric_rows(part: dict) -> list[dict]:
    """Rows ``指標 / 基礎模型 / 微調後 / 差異 / 95% 信賴區間`` of a report (or its ``chinese`` part)."""
    return _rows(part, fmt_interval)


def _rows(part: dict, fmt_interval) -> list[dict]:

    rows = []
    for key in METRICS:
        b, t = part["base"].get(key), part["tuned"].get(key)
        if b is None or t is None:
            continue
        digits = 4 if key == "loss" else 2
        rows.append(
            {
                "指標": METRIC_NAMES.get(key, key),
                "基礎模型": f"{b:.{digits}f}",
                "微調後": f"{t:.{digits}f}",
                "差異": f"{t - b:+.{digits}f}",
                "95% 信賴區間": fmt_interval(key, part["diff_ci95"].get(key)),
            }
        )
    return rows


def _breakdown_rows(breakdown: dict) -> list[dict]:
    rows = []
    for key, e in breakdown.items():
        rows.append(
            {
                "類別": key,
                "loss 筆數": e["loss_examples"],
                "loss 基礎 → 微調後": f"{_num(e['base']['loss'], 3)} → {_num(e['tuned']['loss'], 3)}",
                "生成題數": e["generated"],
                "ROUGE-L 基礎 → 微調後": f"{_num(e['base']['rougeL'], 1)} → {_num(e['tuned']['rougeL'], 1)}",
            }
        )
    return rows


def compare_rows(reports: list[dict]) -> list[dict]:
    """One row per report: English and Chinese headline metrics and language fidelity of the tuned model."""
    rows = []
    for r in reports:
        zh_lang = (r.get("language") or {}).get("chinese", {}).get("tuned", {})
        rows.append(
            {
                "訓練": r.get("name") or r["title"],
                "英文 loss": _num(r["tuned"].get("loss"), 4),
                "英文 ROUGE-L": _num(r["tuned"].get("rougeL"), 2),
                "英文 chrF": _num(r["tuned"].get("chrf"), 2),
                "中文 loss": _num(r["chinese"]["tuned"].get("loss"), 4),
                "中文 ROUGE-L": _num(r["chinese"]["tuned"].get("rougeL"), 2),
                "中文 chrF": _num(r["chinese"]["tuned"].get("chrf"), 2),
                "中文題以中文回答": "—" if zh_lang.get("fidelity") is None else f"{zh_lang['fidelity'] * 100:.1f}%",
            }
        )
    return rows


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def write_report(report: dict, report_path: str | Path, compare: list[dict] | None = None) -> tuple[Path, Path]:
    json_path, md_path = report_paths(report_path)
    report = {**report, "name": json_path.stem}
    write_json(json_path, report, indent=2)
    write_text(md_path, render_markdown(report, compare))
    return json_path, md_path


def load_report(path: str | Path, hint: str = "請確認路徑（docs/quality/*.json）。") -> dict:
    """A quality report's JSON (``docs/quality/*.json``, or the copy beside the shipped reference adapter)."""
    json_path, _ = report_paths(path)
    if not json_path.is_file():
        raise OutputError(f"找不到品質報告 {display_path(json_path)}。", hint=hint)
    return json.loads(json_path.read_text(encoding="utf-8"))


def run_quality(
    config: str | Path, overrides: list[str] | None, report: str | Path, compare: list[str] | None = None
) -> dict:
    """Check everything, train, evaluate, write the report; returns the report dict."""

    cfg = load_config(resolve_path(config), overrides)
    check_inputs(cfg, report)
    others = [load_report(p) for p in compare or []]
    command = "python -m medgemma_lib quality --config " + shlex.quote(str(config))
    command += "".join(" " + shlex.quote(o) for o in overrides or [])
    command += " --report " + shlex.quote(str(report))
    command += "".join(" --compare " + shlex.quote(str(c)) for c in compare or [])
    splits, prep = prepare_from_config(cfg.data)
    result = run_training(cfg, datasets=splits, data_report=prep)
    # Evaluate what was saved, loaded afresh (as `evaluate` and notebook 06 do), not the training-time model
    # (Liger kernels, packed attention): the report then describes the shipped adapter.
    result.trainer = None
    free_memory()
    evaluation = run_evaluation(result.run_dir)
    out = build_report(evaluation, result.to_dict(), cfg, command, prep)
    json_path, md_path = write_report(out, report, others)
    print(f"品質報告已寫入 {display_path(json_path)} 與 {display_path(md_path)}。", flush=True)
    for line in out["verdict"]:
        print("  " + line, flush=True)
    return out
