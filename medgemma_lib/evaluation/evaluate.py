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
import json
import math
import re
import statistics
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

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display, plots, stats
from medgemma_lib.core.atomic import atomic_file, write_json, write_text
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import ConfigError, DataError, ModelError, OutputError
from medgemma_lib.core.paths import REPO_ROOT, display_path, resolve_path
from medgemma_lib.data import (
    answer_of,
    chinese_converter,
    label_mask_example,
    prepare_from_config,
    question_of,
    read_table,
)
from medgemma_lib.models.generation import (
    THINKING_SYSTEM_PROMPT,
    fold_thought_markdown,
    generate_answers,
    load_before_answers,
    system_prompt_for,
)
from medgemma_lib.training.runs import (
    DATA_SPLIT_FILE,
    EVAL_JSON,
    EVAL_MD,
    EVAL_PNG,
    Run,
    changed_sources,
    find_adapter_dir,
    load_for_inference,
    open_run,
    read_data_split,
)
from medgemma_lib.training.stopping import stop_probability_at_end
from medgemma_lib.training.train import run_training

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
# The run (folder, adapter and loading: medgemma_lib.training.runs)


def find_or_train_run(run_dir: str | Path, config: str | Path = "configs/demo.yaml", verbose: bool = True) -> Path:
    """``run_dir`` when it holds an adapter; otherwise train it now with ``config`` (notebook 06 run alone).

    The training is the same :func:`medgemma_lib.training.train.run_training` that notebook 05 and the
    demo call, written to the same folder, so running 05 later simply replaces it.
    """
    run_dir = Path(run_dir)
    if find_adapter_dir(run_dir) is not None:
        return run_dir
    cfg_path = resolve_path(config)
    if verbose:
        print(
            f"找不到 {run_dir.name} 的訓練結果（通常由 notebook 05 產生）。現在用 {cfg_path.name} 快速訓練一次，"
            "CPU 上約需數分鐘；建議下次先執行 05_LoRA訓練.ipynb。",
            flush=True,
        )
    cfg = load_config(cfg_path, [f"train.output_dir={run_dir.parent.resolve()}", f"train.run_name={run_dir.name}"])
    run_training(cfg, verbose=verbose)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Data


def held_out_records(run: Run, verbose: bool = True) -> tuple[list[dict], list[dict], str | None]:
    """The run's held-out ``test`` split, the ``test_mix`` split of its data mix, and a note (None: nothing to say).

    Both splits are what training recorded in the run's ``data_split.json`` (:func:`~.runs.write_data_split`):
    when the recorded data has changed or is gone the note says so, and the recorded split is still what is
    scored. A run from before that record is split again from its config and seed, with a note. ``verbose``:
    print the note.
    """
    record = read_data_split(run.path)
    if record is None:
        splits, _ = prepare_from_config(run.config.data, output_dir=None, tokenizer=None)
        held = {name: [dict(r) for r in ds] for name, ds in splits.items() if name != "train"}
        note = (
            f"這個執行資料夾沒有訓練時的資料切分紀錄（{DATA_SPLIT_FILE}，較早的版本訓練），測試集依 config.yaml 的"
            "資料設定與種子重新切分；資料若在訓練後改過，測試題可能不是訓練時保留的那些。"
        )
    else:
        held = record["held_out"]
        note = changed_data_note(changed_sources(record), len(held.get("test") or []))
    if not held.get("test"):
        raise DataError(
            "這次執行的資料沒有測試集（test split 是空的）。",
            hint="請把 data.test_fraction 設為大於 0（例如 0.1）後重新訓練。",
        )
    if verbose and note:
        print(note, flush=True)
    return held["test"], held.get("test_mix") or [], note


def changed_data_note(changes: list[tuple[str, str]], n_test: int) -> str | None:
    """One Chinese sentence: which recorded data files changed or are gone, and that the recorded split is scored."""
    if not changes:
        return None
    what = {"changed": "已修改（SHA-256 與訓練時不同）", "missing": "已不在原處"}
    files = "、".join(f"{display_path(resolve_path(path))} {what[kind]}" for path, kind in changes)
    return f"注意：訓練時的資料 {files}；評估的仍是訓練時記錄的測試集（{n_test} 筆），沒有重新切分。"


def test_records(run: Run, tokenizer=None, limit: int | None = None, verbose: bool = True) -> list[dict]:
    """The held-out test split of the run (what training recorded; see :func:`held_out_records`)."""
    records = held_out_records(run, verbose=verbose)[0]
    return records[:limit] if limit else records


def mix_chinese_set(mix_records: list[dict], limit: int) -> list[dict]:
    """Held-out Chinese questions of the data mix (``test_mix``), taken in turn from each source, at most ``limit``."""
    by_source: dict[str, list[dict]] = {}
    for rec in mix_records:
        if is_chinese(question_of(rec)):
            by_source.setdefault(rec.get("mix_source") or rec.get("source", ""), []).append(rec)
    picked: list[dict] = []
    queues = [list(v) for _, v in sorted(by_source.items())]
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return [
        {
            "question": question_of(r),
            "reference": answer_of(r),
            "source": r.get("mix_source") or r.get("source", ""),
            "record": r,
        }
        for r in picked
    ]


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

    Returns one row per record: ``id``, ``source``, ``qtype``, ``nll`` (sum), ``tokens``, ``stop_prob`` (the
    probability of ``<end_of_turn>`` right after the complete answer; None when ``max_length`` cut the answer).
    """

    device = model.device
    rows = []
    iterator = _progress(records, "計算測試集 loss", progress)
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
                "stop_prob": stop_probability_at_end(logits, targets),
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


def paired_intervals(
    loss_rows: dict[str, list[dict]],
    answers: dict[str, list[str]],
    references: list[str],
    start: int,
    stop: int,
    chinese: bool,
    resamples: int,
) -> dict:
    """95 % paired-bootstrap intervals of tuned − base for loss, ROUGE-L, BLEU, chrF and length.

    ``answers[model][start:stop]`` are the answers to ``references``; ``loss_rows`` are aligned
    per example (both models skip the same records). See :mod:`medgemma_lib.core.stats`.
    """
    out: dict[str, dict] = {}
    if loss_rows.get("base"):
        nll = {m: [r["nll"] for r in loss_rows[m]] for m in ("base", "tuned")}
        tokens = [r["tokens"] for r in loss_rows["base"]]
        out["loss"] = stats.paired_difference(stats.loss_scorer(nll, tokens), len(tokens), resamples)
    if stop > start:
        hyps = {m: answers[m][start:stop] for m in ("base", "tuned")}
        per = {m: text_metrics(hyps[m], references, chinese=chinese)["per_answer"] for m in hyps}
        n = len(references)
        for key in ("rougeL", "length"):
            values = {m: [row[key] for row in per[m]] for m in per}
            out[key] = stats.paired_difference(stats.mean_scorer(values), n, resamples)
        for key in ("bleu", "chrf"):
            out[key] = stats.paired_difference(stats.corpus_scorer(key, hyps, references, chinese), n, resamples)
    return out


def decoding_limits(tokenizer, references: list[str], lengths: dict[str, list[dict]], max_new_tokens: int) -> dict:
    """What the token limit cuts: reference answers' token lengths against it, and answers that hit it."""
    if not references:
        return {}
    ref_tokens = sorted(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references)

    def pct(q: float) -> int:
        return ref_tokens[min(len(ref_tokens) - 1, max(0, math.ceil(q / 100 * len(ref_tokens)) - 1))]

    return {
        "max_new_tokens": max_new_tokens,
        "reference_tokens": {"median": pct(50), "p75": pct(75), "p90": pct(90), "max": ref_tokens[-1]},
        "references_longer_than_limit": sum(1 for t in ref_tokens if t > max_new_tokens) / len(ref_tokens),
        "answers_cut_at_limit": {
            m: (sum(1 for x in rows if not x["stopped"]) / len(rows) if rows else None) for m, rows in lengths.items()
        },
        "answer_tokens_mean": {
            m: (sum(x["tokens"] for x in rows) / len(rows) if rows else None) for m, rows in lengths.items()
        },
    }


def stop_metrics(
    tokenizer,
    references: list[str],
    lengths: dict[str, list[dict]],
    loss_rows: dict[str, list[dict]],
    resamples: int = 0,
) -> dict:
    """Does each model end its answers? Per model (``{"base": x, "tuned": y}``):

    * ``stop_rate``: share of generated answers that ended with a stop token before ``max_new_tokens``;
    * ``stop_probability``: mean teacher-forced probability of ``<end_of_turn>`` right after the complete
      reference answer (the loss examples);
    * ``length_ratio_median``: median of answer tokens / reference tokens (both counting the stop token).

    With ``resamples``, 95 % paired-bootstrap intervals of tuned − base for the rate and the probability.
    """
    out: dict[str, Any] = {}
    models_ = [m for m in ("base", "tuned") if m in lengths or m in loss_rows]
    if references and all(lengths.get(m) for m in models_):
        ref_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references]
        stopped = {m: [1.0 if x["stopped"] else 0.0 for x in lengths[m]] for m in models_}
        ratios = {m: [x["tokens"] / max(1, t) for x, t in zip(lengths[m], ref_tokens)] for m in models_}
        out["stop_rate"] = {m: sum(v) / len(v) for m, v in stopped.items()}
        out["length_ratio_median"] = {m: float(statistics.median(v)) for m, v in ratios.items()}
        out["n_generated"] = len(references)
    paired = [
        (b.get("stop_prob"), t.get("stop_prob"))
        for b, t in zip(loss_rows.get("base") or [], loss_rows.get("tuned") or [])
        if b.get("stop_prob") is not None and t.get("stop_prob") is not None
    ]
    if paired:
        probs = {"base": [b for b, _ in paired], "tuned": [t for _, t in paired]}
        out["stop_probability"] = {m: sum(v) / len(v) for m, v in probs.items()}
        out["stop_probability_median"] = {m: float(statistics.median(v)) for m, v in probs.items()}
        out["n_probability"] = len(paired)
    if resamples and len(models_) == 2:
        ci = {}
        if "stop_rate" in out:
            ci["stop_rate"] = stats.paired_difference(stats.mean_scorer(stopped), len(references), resamples)
        if paired:
            ci["stop_probability"] = stats.paired_difference(stats.mean_scorer(probs), len(paired), resamples)
        out["ci95"] = ci
    return out


def _mean_share(texts: list[str]) -> float | None:
    shares = [s for s in (stats.simplified_share(t) for t in texts) if s is not None]
    return sum(shares) / len(shares) if shares else None


def _loss_examples(loss_rows: dict[str, list[dict]]) -> list[dict]:
    """Per-example answer NLL of both models (for intervals and breakdowns recomputed later)."""
    if not loss_rows.get("base"):
        return []
    return [
        {
            "id": b.get("id"),
            "source": b["source"],
            "qtype": b["qtype"],
            "tokens": b["tokens"],
            "nll": {"base": b["nll"], "tuned": t["nll"]},
            "stop_prob": {"base": b.get("stop_prob"), "tuned": t.get("stop_prob")},
        }
        for b, t in zip(loss_rows["base"], loss_rows["tuned"])
    ]


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def _progress(items, desc: str, enabled: bool):
    """A Chinese status line in a notebook (stored as its final line), a tqdm bar in a terminal."""
    return display.progress(items, desc, enabled=enabled) if enabled else items


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
    num_generate_chinese: int | None = None,
    bootstrap_resamples: int | None = None,
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
    an already loaded :func:`~.runs.load_for_inference` pair (a notebook reuses it for the chat box).
    ``num_generate_chinese``: held-out Chinese questions of the data mix (``test_mix``) to answer
    instead of the guide's set (``eval.num_generate_chinese``; 0 = the guide's set).
    ``bootstrap_resamples``: paired bootstrap resamples for the 95 % intervals of every difference
    (``eval.bootstrap_resamples``; 0 = none). Returns the metrics dict that is written to ``eval.json``.
    """

    started = time.time()
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    ev = run.config.eval
    max_loss_examples = max_loss_examples if max_loss_examples is not None else ev.max_eval_examples
    num_generate = num_generate if num_generate is not None else ev.num_generate
    max_new_tokens = max_new_tokens or ev.max_new_tokens
    batch_size = batch_size or ev.batch_size
    num_generate_chinese = ev.num_generate_chinese if num_generate_chinese is None else num_generate_chinese
    resamples = ev.bootstrap_resamples if bootstrap_resamples is None else bootstrap_resamples
    for name, value in (
        ("max_loss_examples", max_loss_examples),
        ("num_generate", num_generate),
        ("num_generate_chinese", num_generate_chinese),
        ("bootstrap_resamples", resamples),
    ):
        if value is not None and value < 0:
            raise ConfigError(f"{name} 不能是負數（收到 {value}）。", hint="請給 0 或正整數。")
    if model is None or tokenizer is None:
        model, tokenizer, run = load_for_inference(run, quantization=quantization, device=device, verbose=verbose)
    if not hasattr(model, "disable_adapter"):
        raise ModelError(
            "評估需要掛著 LoRA 轉接器的模型（PeftModel），才能以同一份基礎模型比較微調前後。",
            hint="請用 runs.load_for_inference(執行資料夾) 載入模型。",
        )

    records, mix_records, split_note = held_out_records(run, verbose=verbose)
    loss_set = records[:max_loss_examples] if max_loss_examples else records
    gen_set = records[:num_generate]
    zh_from_mix = bool(chinese and num_generate_chinese and mix_chinese_set(mix_records, 1))
    if zh_from_mix:
        zh_set = mix_chinese_set(mix_records, num_generate_chinese)
    else:
        zh_set = chinese_eval_set(num_chinese_samples) if chinese else []
    zh_loss_set = [z["record"] for z in zh_set] if zh_from_mix else []
    if verbose:
        print(
            f"測試集 {len(records)} 筆：{len(loss_set)} 筆計算 loss，{len(gen_set)} 題英文與 {len(zh_set)} 題中文"
            f"產生答案（每題最多 {max_new_tokens} 個 token）。",
            flush=True,
        )

    questions = [question_of(r) for r in gen_set] + [z["question"] for z in zh_set]

    if model.device.type == "cpu":  # one batch: NF4 de-quantises every weight at each step, whatever the batch size
        batch_size = max(batch_size, len(questions))
    thinking = bool(getattr(ev, "thinking", False))
    system_prompt = system_prompt_for(run.config.data.system_prompt, thinking)
    max_length = run.config.train.max_length
    loss_rows: dict[str, list[dict]] = {}
    zh_loss_rows: dict[str, list[dict]] = {}
    answers: dict[str, list[str]] = {}
    lengths: dict[str, list[dict]] = {}
    thoughts: dict[str, list[str | None]] = {}
    timings: dict[str, float] = {}
    for name in ("base", "tuned"):
        t0 = time.time()
        ctx = model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with ctx:
            loss_rows[name] = answer_losses(model, tokenizer, loss_set, max_length=max_length, progress=verbose)
            zh_loss_rows[name] = answer_losses(model, tokenizer, zh_loss_set, max_length=max_length)
            t1 = time.time()
            lengths[name] = []
            thoughts[name] = []
            answers[name] = (
                generate_answers(
                    model,
                    tokenizer,
                    questions,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    batch_size=batch_size,
                    system_prompt=system_prompt,
                    lengths=lengths[name],
                    thoughts=thoughts[name],
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
            "thoughts": {},
            "scores": {},
        }
        for r, q, ref in zip(gen_set, questions[:n_en], refs_en)
    ]
    zh_rows = [
        {
            "id": (z.get("record") or {}).get("id"),
            "source": z["source"],
            "question": z["question"],
            "reference": z["reference"],
            "answers": {},
            "thoughts": {},
            "scores": {},
        }
        for z in zh_set
    ]
    for name in ("base", "tuned"):
        en = text_metrics(answers[name][:n_en], refs_en, chinese=False)
        zh = text_metrics(answers[name][n_en:], [z["reference"] for z in zh_set], chinese=True)
        for row, ans, thought, per in zip(gen_rows, answers[name][:n_en], thoughts[name][:n_en], en["per_answer"]):
            row["answers"][name], row["thoughts"][name], row["scores"][name] = ans, thought, per
        for row, ans, thought, per in zip(zh_rows, answers[name][n_en:], thoughts[name][n_en:], zh["per_answer"]):
            row["answers"][name], row["thoughts"][name], row["scores"][name] = ans, thought, per
        result_models[name] = {
            **summarize_losses(loss_rows[name]),
            **{k: v for k, v in en.items() if k != "per_answer"},
        }
        chinese_models[name] = {k: v for k, v in zh.items() if k != "per_answer"}
        if zh_loss_rows[name]:
            chinese_models[name].update(summarize_losses(zh_loss_rows[name]))
    refs_zh = [z["reference"] for z in zh_set]
    intervals = {}
    if resamples:
        intervals = {
            "english": paired_intervals(loss_rows, answers, refs_en, 0, n_en, False, resamples),
            "chinese": paired_intervals(zh_loss_rows, answers, refs_zh, n_en, len(questions), True, resamples),
        }

    result = {
        "run": run.name,
        "profile": run.config.model.profile,
        "quantization": quantization or run.config.model.quantization,
        "adapter": f"{run.name}/{run.adapter_dir.name}" if run.adapter_dir != run.path else run.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "test_examples": len(records),
            "test_split": split_note or f"訓練時記錄的測試集（{DATA_SPLIT_FILE}）",
            "loss_examples": len(loss_set),
            "generated_english": n_en,
            "generated_chinese": len(zh_rows),
            "max_new_tokens": max_new_tokens,
            "chinese_questions": "data.mix 的 test_mix（保留的中文測試題）"
            if zh_from_mix
            else "原始指南的三題＋隨附中文樣本",
            "bootstrap_resamples": resamples,
            "thinking": thinking,
            "thinking_system_prompt": THINKING_SYSTEM_PROMPT if thinking else None,
            "answers_with_thought": {n: sum(1 for t in thoughts.get(n, []) if t) for n in ("base", "tuned")},
            "scored_text": "只有答案：<unused94>…<unused95> 之間的思考過程不計分，另存於 answers[].thoughts",
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
        "ci95": intervals.get("english", {}),
        "language": {
            "rule": stats.LANGUAGE_RULE,
            "english": {n: stats.language_fidelity(questions[:n_en], answers[n][:n_en]) for n in ("base", "tuned")},
            "chinese": {n: stats.language_fidelity(questions[n_en:], answers[n][n_en:]) for n in ("base", "tuned")},
            "simplified_share": {n: _mean_share(answers[n][n_en:]) for n in ("base", "tuned")},
            "simplified_share_reference": _mean_share(refs_zh),
        },
        "decoding": {
            "english": decoding_limits(tokenizer, refs_en, {n: lengths[n][:n_en] for n in lengths}, max_new_tokens),
            "chinese": decoding_limits(tokenizer, refs_zh, {n: lengths[n][n_en:] for n in lengths}, max_new_tokens),
        },
        "stopping": {
            "english": stop_metrics(tokenizer, refs_en, {n: lengths[n][:n_en] for n in lengths}, loss_rows, resamples),
            "chinese": stop_metrics(
                tokenizer, refs_zh, {n: lengths[n][n_en:] for n in lengths}, zh_loss_rows, resamples
            ),
        },
        "loss_examples": _loss_examples(loss_rows),
        "by_source": _breakdown(loss_rows, gen_rows, "source"),
        "by_qtype": _breakdown(loss_rows, gen_rows, "qtype"),
        "chinese": {
            "models": chinese_models,
            "difference": _difference(chinese_models["base"], chinese_models["tuned"]),
            "ci95": intervals.get("chinese", {}),
            "loss_examples": _loss_examples(zh_loss_rows),
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
            thought = (row.get("thoughts") or {}).get(name)
            parts.append(
                f"**{label}**（ROUGE-L {_fmt(s.get('rougeL'))}，chrF {_fmt(s.get('chrf'))}）："
                + (fold_thought_markdown("", thought) if thought else "")
                + f"{_clip(row['answers'].get(name, '')) or '（空白）'}\n"
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
    """Model or reference text inside Markdown: repeats collapsed, whitespace joined, clipped, escaped."""
    return display.md_escape(display.clip(text, limit))


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
        markdown_table(comparison_rows(result)),
        "✓ 表示微調後較好（loss、困惑度越低越好；ROUGE-L、BLEU、chrF 越高越好）。"
        "答案長度受 max_new_tokens 限制，參考答案平均長度："
        f"{_fmt(result['models']['base'].get('reference_length'), 0)} 個單字。\n",
        *(
            ["## 答案的語言（語言一致率）\n", markdown_table(language_rows(result)), f"判定方式：{lang_rule}。\n"]
            if language_rows(result)
            else []
        ),
        *(
            ["## 答案有沒有說完就停\n", markdown_table(stopping_rows(result)), STOPPING_NOTE]
            if stopping_rows(result)
            else []
        ),
        *(["## 解碼上限截掉了什麼\n", markdown_table(decoding_rows(result))] if decoding_rows(result) else []),
        "## 依來源\n",
        markdown_table(breakdown_table(result, "source").to_dict("records")),
        "## 依問題類型\n",
        markdown_table(breakdown_table(result, "qtype").to_dict("records")),
    ]
    if result["chinese"]["answers"]:
        lines += [
            f"## 中文問題（{result['settings'].get('chinese_questions', '原始指南的三題＋隨附中文樣本')}）\n",
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
