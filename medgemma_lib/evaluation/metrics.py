"""What evaluation measures, as plain functions of model outputs: answer loss and stop probability, ROUGE-L / BLEU /
chrF, lengths, decoding limits, whether answers end, paired-bootstrap intervals, and per-source breakdowns.

* **loss / perplexity** on the test split, computed exactly where training computes it: the record is tokenized by
  :func:`medgemma_lib.data.label_mask_example` (TRL's own recipe), the prompt is masked, and logits are projected only
  at the answer positions (``logits_to_keep``). The loss is the token-weighted mean.
* **text metrics**: ROUGE-L F1, BLEU and chrF (sacrebleu), answer length. English is tokenized by words
  (rouge-score's tokenizer with the Porter stemmer; sacrebleu ``13a``); Chinese by **characters** (rouge-score drops
  CJK text, so CJK characters are split here; sacrebleu's ``zh`` tokenizer). chrF works on characters in both.

:mod:`.evaluate` runs the models and calls these; :mod:`.report` renders what they return.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from medgemma_lib.core import display, stats
from medgemma_lib.data import label_mask_example
from medgemma_lib.training.stopping import stop_probability_at_end

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


def mean_simplified_share(texts: list[str]) -> float | None:
    shares = [s for s in (stats.simplified_share(t) for t in texts) if s is not None]
    return sum(shares) / len(shares) if shares else None


def loss_examples(loss_rows: dict[str, list[dict]]) -> list[dict]:
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


def _progress(items, desc: str, enabled: bool):
    """A Chinese status line in a notebook (stored as its final line), a tqdm bar in a terminal."""
    return display.progress(items, desc, enabled=enabled) if enabled else items


def breakdown(loss_rows: dict[str, list[dict]], gen_rows: list[dict], key: str) -> dict:
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


def difference(base: dict, tuned: dict) -> dict:
    return {
        k: (tuned[k] - base[k])
        if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float))
        else None
        for k in METRIC_NAMES
    }
