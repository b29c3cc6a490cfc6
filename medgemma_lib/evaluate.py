"""Evaluation of a run: base vs fine-tuned on the held-out test split (notebook 06, ``evaluate``).

One base model is loaded, the run's LoRA adapter is attached, and every measurement is taken
twice: once inside ``with model.disable_adapter():`` (the base model) and once with the adapter on
(the fine-tuned model). There is never a second copy of the base in memory.

Measurements:

* **loss / perplexity** on the test split, computed exactly where training computes it: the
  record is tokenized by :func:`medgemma_lib.data.label_mask_example` (TRL's own recipe), the
  prompt is masked, and logits are projected only at the answer positions (``logits_to_keep``),
  which saves most of the 262,144-word output layer's cost. The loss is the token-weighted mean.
* **text metrics** on greedy answers to a few test questions: ROUGE-L F1, BLEU and chrF
  (sacrebleu), answer length. English is tokenized by words (rouge-score's tokenizer with the
  Porter stemmer; sacrebleu ``13a``); Chinese by **characters** (rouge-score drops CJK text, so
  we split CJK characters ourselves; sacrebleu's ``zh`` tokenizer). chrF works on characters in
  both languages.
* a breakdown per MedQuAD source and question type, a Chinese set (the original guide's three
  questions with short reference answers, plus a few pairs of the shipped Chinese sample), and a
  few answers side by side.

Results go to ``results/<run>/eval.json``, ``eval.md`` and ``eval.png``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from medgemma_lib import MEDICAL_DISCLAIMER, plots
from medgemma_lib.atomic import atomic_file, write_json, write_text
from medgemma_lib.config import load_config
from medgemma_lib.data import (
    answer_of,
    chinese_converter,
    label_mask_example,
    prepare_from_config,
    question_of,
    read_table,
)
from medgemma_lib.errors import ConfigError, DataError, ModelError, OutputError
from medgemma_lib.generation import generate_answers, load_before_answers
from medgemma_lib.paths import REPO_ROOT, display_path, resolve_path
from medgemma_lib.runs import EVAL_JSON, EVAL_MD, EVAL_PNG, Run, find_adapter_dir, load_for_inference, open_run
from medgemma_lib.train import run_training

CHINESE_SAMPLE = "data/zh_toyhom_sample_gb18030.csv"
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[a-z0-9]+")
METRIC_NAMES = {
    "loss": "測試集 loss",
    "perplexity": "困惑度 perplexity",
    "rougeL": "ROUGE-L F1",
    "bleu": "BLEU",
    "chrf": "chrF",
    "length": "答案長度",
}
LOWER_IS_BETTER = {"loss", "perplexity"}


# ----------------------------------------------------------------------------------------------
# The run (folder, adapter and loading: medgemma_lib.runs)


def find_or_train_run(run_dir: str | Path, config: str | Path = "configs/demo.yaml", verbose: bool = True) -> Path:
    """``run_dir`` when it holds an adapter; otherwise train it now with ``config`` (notebook 06 run alone).

    The training is the same :func:`medgemma_lib.train.run_training` that notebook 05 and the
    demo call, written to the same folder, so running 05 later simply replaces it.
    """
    run_dir = Path(run_dir)
    if find_adapter_dir(run_dir) is not None:
        return run_dir
    cfg_path = Path(config) if Path(config).is_file() else REPO_ROOT / config
    if verbose:
        print(
            f"找不到 {run_dir.name} 的訓練結果（通常由 notebook 05 產生）。現在用 {cfg_path.name} 快速訓練一次，"
            "CPU 上約需數分鐘；建議下次先執行 05_LoRA訓練.ipynb。",
            flush=True,
        )
    cfg = load_config(cfg_path, [f"train.output_dir={run_dir.parent.resolve()}", f"train.run_name={run_dir.name}"])
    cfg.data.input = str(resolve_path(cfg.data.input))
    run_training(cfg, verbose=verbose)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Data


def test_records(run: Run, tokenizer=None, limit: int | None = None) -> list[dict]:
    """The held-out test split of the run (same data config and seed as training)."""

    data_cfg = copy.deepcopy(run.config.data)
    data_cfg.input = str(resolve_path(data_cfg.input))
    if data_cfg.prepared_dir:
        data_cfg.prepared_dir = str(resolve_path(data_cfg.prepared_dir))
    splits, _ = prepare_from_config(data_cfg, output_dir=None, tokenizer=None)
    if "test" not in splits or len(splits["test"]) == 0:
        raise DataError(
            "這次執行的資料沒有測試集（test split 是空的）。",
            hint="請把 data.test_fraction 設為大於 0（例如 0.1）後重新訓練。",
        )
    records = [dict(r) for r in splits["test"]]
    return records[:limit] if limit else records


def chinese_eval_set(num_sample: int = 4) -> list[dict]:
    """The guide's three Chinese questions (with short references) + ``num_sample`` pairs of the
    shipped Chinese sample, converted to Traditional Chinese (OpenCC s2twp)."""
    spec = json.loads(
        resources.files("medgemma_lib").joinpath("resources/zh_eval_questions.json").read_text(encoding="utf-8")
    )
    items = [{"question": q["question"], "reference": q["reference"], "source": "guide"} for q in spec["questions"]]
    sample = REPO_ROOT / CHINESE_SAMPLE
    if num_sample > 0 and sample.is_file():
        convert = chinese_converter("s2twp")
        rows = [r for r in read_table(sample).rows if r.get("title", "").strip() and r.get("answer", "").strip()]
        for row in rows[:num_sample]:
            items.append(
                {
                    "question": convert(row["title"].strip()),
                    "reference": convert(row["answer"].strip()),
                    "source": "zh_toyhom_sample",
                }
            )
    return items


# ----------------------------------------------------------------------------------------------
# Loss


def answer_losses(
    model, tokenizer, records: list[dict], max_length: int | None = None, progress: bool = False
) -> list[dict]:
    """Summed negative log-likelihood of each record's answer tokens (prompt masked, as in training).

    Returns one row per record: ``id``, ``source``, ``qtype``, ``nll`` (sum), ``tokens``.
    """

    device = model.device
    rows = []
    iterator = _progress(records, "loss", progress)
    for rec in iterator:
        ex = label_mask_example(tokenizer, rec, max_length=max_length)
        ids = ex["input_ids"]
        n_label = sum(ex["trained"])
        if n_label == 0:
            continue
        targets = torch.tensor([t for t in ex["labels"] if t != -100], device=device)
        inputs = torch.tensor([ids[:-1]], device=device)  # the last token predicts nothing
        with torch.inference_mode():
            logits = model(input_ids=inputs, logits_to_keep=n_label).logits[0].float()
        nll = F.cross_entropy(logits, targets, reduction="sum").item()
        rows.append(
            {
                "id": rec.get("id"),
                "source": rec.get("source", ""),
                "qtype": rec.get("qtype", ""),
                "nll": nll,
                "tokens": n_label,
            }
        )
    return rows


def summarize_losses(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    loss = sum(r["nll"] for r in rows) / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 50 else float("nan"),
        "tokens": tokens,
        "examples": len(rows),
    }


# ----------------------------------------------------------------------------------------------
# Text metrics


def is_chinese(text: str) -> bool:
    """True when CJK characters make up at least 30 % of the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(1 for c in chars if _CJK_RE.match(c)) / len(chars) >= 0.3


def chinese_tokens(text: str) -> list[str]:
    """One token per CJK character; Latin words and numbers kept whole (lower-cased)."""
    return _TOKEN_RE.findall(text.lower())


class _CharTokenizer:
    """rouge-score tokenizer for Chinese: its default one keeps only [a-z0-9] and drops CJK."""

    def tokenize(self, text: str) -> list[str]:
        return chinese_tokens(text)


def answer_length(text: str, chinese: bool) -> int:
    """Characters (Chinese: CJK characters + Latin words) or words (English)."""
    return len(chinese_tokens(text)) if chinese else len(text.split())


def text_metrics(predictions: list[str], references: list[str], chinese: bool = False) -> dict:
    """ROUGE-L F1 (mean over answers), corpus BLEU and chrF (sacrebleu), mean length; all ×100 except length.

    Also returns the per-answer ROUGE-L and chrF lists (``per_answer``) for breakdowns.
    """

    if not predictions:
        return {"rougeL": None, "bleu": None, "chrf": None, "length": None, "reference_length": None, "per_answer": []}
    scorer = rouge_scorer.RougeScorer(
        ["rougeL"], use_stemmer=not chinese, tokenizer=_CharTokenizer() if chinese else None
    )
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure * 100 for pred, ref in zip(predictions, references)]
    tokenize = "zh" if chinese else "13a"
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score
    chrf = sacrebleu.corpus_chrf(predictions, [references]).score
    chrf_each = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references)]
    lengths = [answer_length(p, chinese) for p in predictions]
    return {
        "rougeL": sum(rouge) / len(rouge),
        "bleu": bleu,
        "chrf": chrf,
        "length": sum(lengths) / len(lengths),
        "reference_length": sum(answer_length(r, chinese) for r in references) / len(references),
        "per_answer": [{"rougeL": r, "chrf": c, "length": n} for r, c, n in zip(rouge, chrf_each, lengths)],
    }


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        return tqdm(items, desc=desc, leave=False)
    except ImportError:
        return items


def _breakdown(loss_rows: dict[str, list[dict]], gen_rows: list[dict], key: str) -> dict:
    """Per ``key`` (source or qtype): loss of base and tuned, and ROUGE-L/chrF where generated."""
    out: dict[str, dict] = {}
    keys = sorted({r.get(key) or "（無）" for r in loss_rows["base"]} | {r.get(key) or "（無）" for r in gen_rows})
    for k in keys:
        entry: dict[str, Any] = {}
        for model_name in ("base", "tuned"):
            lr = [r for r in loss_rows[model_name] if (r.get(key) or "（無）") == k]
            gr = [r for r in gen_rows if (r.get(key) or "（無）") == k]
            s = summarize_losses(lr) if lr else {"loss": None, "examples": 0}
            entry[model_name] = {
                "loss": s["loss"],
                "rougeL": sum(g["scores"][model_name]["rougeL"] for g in gr) / len(gr) if gr else None,
                "chrf": sum(g["scores"][model_name]["chrf"] for g in gr) / len(gr) if gr else None,
            }
        entry["loss_examples"] = len([r for r in loss_rows["base"] if (r.get(key) or "（無）") == k])
        entry["generated"] = len([r for r in gen_rows if (r.get(key) or "（無）") == k])
        out[k] = entry
    return out


def _difference(base: dict, tuned: dict) -> dict:
    return {
        k: (tuned[k] - base[k])
        if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float))
        else None
        for k in METRIC_NAMES
    }


def run_evaluation(
    run_dir: str | Path,
    *,
    max_loss_examples: int | None = None,
    num_generate: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    num_chinese_samples: int = 4,
    chinese: bool = True,
    num_side_by_side: int = 3,
    quantization: str | None = None,
    device: str | None = None,
    model=None,
    tokenizer=None,
    write: bool = True,
    verbose: bool = True,
) -> dict:
    """Evaluate ``run_dir`` (base vs fine-tuned) and write ``eval.json``, ``eval.md``, ``eval.png`` there.

    Limits default to the run's ``eval`` config section: ``max_loss_examples`` test records for
    loss (``eval.max_eval_examples``; None = the whole test split), ``num_generate`` test questions
    answered greedily (``eval.num_generate``) with ``max_new_tokens`` each. ``model``/``tokenizer``:
    an already loaded :func:`medgemma_lib.runs.load_for_inference` pair (a notebook reuses it for the chat box).
    Returns the metrics dict that is written to ``eval.json``.
    """

    started = time.time()
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    ev = run.config.eval
    max_loss_examples = max_loss_examples if max_loss_examples is not None else ev.max_eval_examples
    num_generate = num_generate if num_generate is not None else ev.num_generate
    max_new_tokens = max_new_tokens or ev.max_new_tokens
    batch_size = batch_size or ev.batch_size
    for name, value in (("max_loss_examples", max_loss_examples), ("num_generate", num_generate)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} 不能是負數（收到 {value}）。", hint="請給 0 或正整數。")
    if model is None or tokenizer is None:
        model, tokenizer, run = load_for_inference(run, quantization=quantization, device=device, verbose=verbose)
    if not hasattr(model, "disable_adapter"):
        raise ModelError(
            "評估需要掛著 LoRA 轉接器的模型（PeftModel），才能以同一份基礎模型比較微調前後。",
            hint="請用 runs.load_for_inference(執行資料夾) 載入模型。",
        )

    records = test_records(run, tokenizer)
    loss_set = records[:max_loss_examples] if max_loss_examples else records
    gen_set = records[:num_generate]
    zh_set = chinese_eval_set(num_chinese_samples) if chinese else []
    if verbose:
        print(
            f"測試集 {len(records)} 筆：{len(loss_set)} 筆計算 loss，{len(gen_set)} 題英文與 {len(zh_set)} 題中文"
            f"產生答案（每題最多 {max_new_tokens} 個 token）。",
            flush=True,
        )

    questions = [question_of(r) for r in gen_set] + [z["question"] for z in zh_set]

    if model.device.type == "cpu":  # one batch: NF4 de-quantises every weight at each step, whatever the batch size
        batch_size = max(batch_size, len(questions))
    system_prompt = run.config.data.system_prompt
    max_length = run.config.train.max_length
    loss_rows: dict[str, list[dict]] = {}
    answers: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    for name in ("base", "tuned"):
        t0 = time.time()
        ctx = model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with ctx:
            loss_rows[name] = answer_losses(model, tokenizer, loss_set, max_length=max_length, progress=verbose)
            t1 = time.time()
            answers[name] = (
                generate_answers(
                    model,
                    tokenizer,
                    questions,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    batch_size=batch_size,
                    system_prompt=system_prompt,
                )
                if questions
                else []
            )
        timings[f"{name}_loss_seconds"] = round(t1 - t0, 1)
        timings[f"{name}_generate_seconds"] = round(time.time() - t1, 1)
        if verbose:
            s = summarize_losses(loss_rows[name])
            label = "基礎模型" if name == "base" else "微調後模型"
            print(
                f"{label}：測試 loss {s['loss']:.4f}（{timings[f'{name}_loss_seconds']:.0f} 秒），"
                f"產生答案 {timings[f'{name}_generate_seconds']:.0f} 秒",
                flush=True,
            )

    n_en = len(gen_set)
    refs_en = [answer_of(r) for r in gen_set]
    result_models: dict[str, dict] = {}
    chinese_models: dict[str, dict] = {}
    gen_rows = [
        {
            "id": r.get("id"),
            "source": r.get("source", ""),
            "qtype": r.get("qtype", ""),
            "question": q,
            "reference": ref,
            "answers": {},
            "scores": {},
        }
        for r, q, ref in zip(gen_set, questions[:n_en], refs_en)
    ]
    zh_rows = [
        {"source": z["source"], "question": z["question"], "reference": z["reference"], "answers": {}, "scores": {}}
        for z in zh_set
    ]
    for name in ("base", "tuned"):
        en = text_metrics(answers[name][:n_en], refs_en, chinese=False)
        zh = text_metrics(answers[name][n_en:], [z["reference"] for z in zh_set], chinese=True)
        for row, ans, per in zip(gen_rows, answers[name][:n_en], en["per_answer"]):
            row["answers"][name], row["scores"][name] = ans, per
        for row, ans, per in zip(zh_rows, answers[name][n_en:], zh["per_answer"]):
            row["answers"][name], row["scores"][name] = ans, per
        result_models[name] = {
            **summarize_losses(loss_rows[name]),
            **{k: v for k, v in en.items() if k != "per_answer"},
        }
        chinese_models[name] = {k: v for k, v in zh.items() if k != "per_answer"}

    result = {
        "run": run.name,
        "profile": run.config.model.profile,
        "quantization": quantization or run.config.model.quantization,
        "adapter": f"{run.name}/{run.adapter_dir.name}" if run.adapter_dir != run.path else run.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "test_examples": len(records),
            "loss_examples": len(loss_set),
            "generated_english": n_en,
            "generated_chinese": len(zh_rows),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "batch_size": batch_size,
            "max_length": max_length,
        },
        "tokenization": {
            "loss": "與訓練相同：提示遮蔽，只在答案 token（含 <end_of_turn>）上計算，依 token 數加權平均",
            "english": "ROUGE-L 以英文單字計（rouge-score 斷詞 + Porter 詞幹）；BLEU 用 sacrebleu 13a；chrF 以字元計",
            "chinese": "ROUGE-L 以中文「字」計（每個漢字一個單位，英文單字整個算一個）；"
            "BLEU 用 sacrebleu zh；chrF 以字元計",
            "length": "英文：單字數；中文：字數",
        },
        "models": result_models,
        "difference": _difference(result_models["base"], result_models["tuned"]),
        "by_source": _breakdown(loss_rows, gen_rows, "source"),
        "by_qtype": _breakdown(loss_rows, gen_rows, "qtype"),
        "chinese": {
            "models": chinese_models,
            "difference": _difference(chinese_models["base"], chinese_models["tuned"]),
            "answers": zh_rows,
        },
        "answers": gen_rows,
        "num_side_by_side": num_side_by_side,
        "disclaimer": MEDICAL_DISCLAIMER,
        "timings": timings,
    }
    result["seconds"] = round(time.time() - started, 1)
    if write:
        write_reports(result, run.path)
        if verbose:
            print(
                f"評估結果已寫入 {display_path(run.path)}/：{EVAL_JSON}、{EVAL_MD}、{EVAL_PNG}"
                f"（共 {result['seconds']:.0f} 秒）。",
                flush=True,
            )
    return result


# ----------------------------------------------------------------------------------------------
# Reports


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
    return rows


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


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "（無資料）\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[h]).replace("|", "\\|").replace("\n", " ") for h in head) + " |")
    return "\n".join(lines) + "\n"


def side_by_side_markdown(result: dict, n: int | None = None, chinese: bool = False) -> str:
    """A few questions with the reference, base and fine-tuned answers, under the medical disclaimer."""
    rows = result["chinese"]["answers"] if chinese else result["answers"]
    n = result.get("num_side_by_side", 3) if n is None else n
    parts = [f"> {MEDICAL_DISCLAIMER}\n"]
    for i, row in enumerate(rows[:n], 1):
        where = f"（{row.get('source', '')}{'，' + row['qtype'] if row.get('qtype') else ''}）"
        parts.append(f"### {i}. {row['question']} {where}\n")
        parts.append(f"**參考答案**：{_clip(row['reference'])}\n")
        for name, label in (("base", "基礎模型"), ("tuned", "微調後")):
            s = row["scores"].get(name, {})
            parts.append(
                f"**{label}**（ROUGE-L {_fmt(s.get('rougeL'))}，chrF {_fmt(s.get('chrf'))}）："
                f"{_clip(row['answers'].get(name, '')) or '（空白）'}\n"
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
            parts.append(f"- 微調前（notebook 04）：{_clip(item['answer']) or '（空白）'}")
            parts.append(f"- 微調後：{_clip(tuned[item['question']]) or '（空白）'}\n")
    return "\n".join(parts) if len(parts) > 1 else "（沒有相同的問題可以比較）"


def before_after_section(result: dict, results_dir: str | Path | None = None) -> str:
    """Markdown of the answers saved before fine-tuning next to the fine-tuned ones (notebook 06), or, when notebook 04
    has not saved them yet, a Chinese note saying how to get them (the lesson goes on either way)."""
    try:
        before = load_before_answers(result["profile"], results_dir)
    except OutputError as err:
        return f"> {err.format()}"
    return before_after_markdown(result, before)


def _clip(text: str, limit: int = 600) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit] + "…"


def render_markdown(result: dict) -> str:
    s = result["settings"]
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
        f"- 產生時間：{result['created']}，共 {result['seconds']:.0f} 秒\n",
        "## 基礎模型 vs 微調後（英文測試集）\n",
        markdown_table(comparison_rows(result)),
        "✓ 表示微調後較好（loss、困惑度越低越好；ROUGE-L、BLEU、chrF 越高越好）。"
        "答案長度受 max_new_tokens 限制，參考答案平均長度："
        f"{_fmt(result['models']['base'].get('reference_length'), 0)} 個單字。\n",
        "## 依來源\n",
        markdown_table(breakdown_table(result, "source").to_dict("records")),
        "## 依問題類型\n",
        markdown_table(breakdown_table(result, "qtype").to_dict("records")),
    ]
    if result["chinese"]["answers"]:
        lines += [
            "## 中文問題（原始指南的三題＋隨附中文樣本）\n",
            markdown_table(comparison_rows(result, "chinese")),
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


def load_evaluation(run_dir: str | Path) -> dict:
    """Read a run's ``eval.json``."""
    path = Path(run_dir) / EVAL_JSON
    if not path.is_file():
        raise OutputError(f"找不到 {path}。", hint=f"請先執行 python -m medgemma_lib evaluate --run {run_dir}。")
    return json.loads(path.read_text(encoding="utf-8"))
