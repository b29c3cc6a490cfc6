"""Paired bootstrap confidence intervals and the language of an answer (evaluation, ``docs/quality``).

**Paired bootstrap.** Base and fine-tuned model answer the *same* test questions, so the
uncertainty of their difference is estimated by resampling questions (with replacement) and
recomputing *both* scores on each resample: ``tuned(sample) - base(sample)``. The 95 % interval is
the 2.5th and 97.5th percentile of those differences (percentile method, Efron & Tibshirani 1993,
ch. 13; the same resampling as sacrebleu's ``--paired-bs``). Each metric is recomputed exactly as on
the whole set:

* **mean metrics** (ROUGE-L per answer, answer length): the mean over the resample;
* **corpus metrics** (BLEU, chrF): sacrebleu's own sufficient statistics per answer (n-gram
  matches and totals) are summed over the resample and turned into a score by sacrebleu, so the
  full set gives exactly ``sacrebleu.corpus_bleu`` / ``corpus_chrf``;
* **loss**: token-weighted, ``sum(nll) / sum(tokens)`` over the resampled examples.

**Language of an answer.** :func:`text_language` counts letters: CJK ideographs against Latin
letters. An answer is Chinese (``zh``) when CJK characters are at least half of those letters,
English (``en``) when Latin letters are, and ``none`` when it has neither (empty, only digits or
punctuation). Language fidelity is the share of answers in the language of their question.
:func:`simplified_share` says how many of an answer's CJK characters are Simplified forms (OpenCC).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 20261202
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")
LANGUAGE_RULE = (
    "以字母計：漢字（CJK）至少佔漢字＋拉丁字母的一半即為中文（zh），否則為英文（en）；"
    "兩者都沒有（空白、只有數字或標點）為 none"
)


# ----------------------------------------------------------------------------------------------
# Resampling


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """``resamples`` × ``n`` indices drawn with replacement (one row per bootstrap sample)."""
    if n <= 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """``[low, high]``: the central ``level`` part of the bootstrap distribution."""
    if samples.size == 0 or np.all(np.isnan(samples)):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_difference(
    score: Callable[[np.ndarray, str], float],
    n: int,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = 0.95,
) -> dict:
    """Bootstrap of ``score(idx, "tuned") - score(idx, "base")`` over resampled example indices.

    ``score(indices, model)`` recomputes a metric on the examples ``indices`` (a 1-D array).
    Returns ``difference`` (on all examples), ``ci95`` ``[low, high]``, ``resamples`` and ``n``.
    """
    everything = np.arange(n)
    diff = score(everything, "tuned") - score(everything, "base")
    idx = resample_indices(n, resamples, seed)
    samples = np.array([score(row, "tuned") - score(row, "base") for row in idx]) if n else np.array([])
    return {"difference": float(diff), "ci95": percentile_interval(samples, level), "resamples": resamples, "n": n}


def mean_scorer(values: dict[str, Sequence[float]]) -> Callable[[np.ndarray, str], float]:
    """A ``score`` for :func:`paired_difference`: the mean of per-example values of each model."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in values.items()}
    return lambda idx, model: float(arrays[model][idx].mean()) if len(idx) else float("nan")


def loss_scorer(nll: dict[str, Sequence[float]], tokens: Sequence[int]) -> Callable[[np.ndarray, str], float]:
    """A ``score``: the token-weighted loss ``sum(nll) / sum(tokens)`` (as the test loss is computed)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in nll.items()}
    tok = np.asarray(tokens, dtype=float)
    return lambda idx, model: float(arrays[model][idx].sum() / tok[idx].sum()) if len(idx) else float("nan")


def sacrebleu_metric(name: str, chinese: bool = False):
    """The sacrebleu metric object used for the corpus score (BLEU ``13a``/``zh``, chrF)."""
    if name == "bleu":
        return BLEU(tokenize="zh" if chinese else "13a")
    if name == "chrf":
        return CHRF()
    raise ValueError(f"unknown corpus metric {name!r}")


def corpus_scorer(
    name: str, hypotheses: dict[str, Sequence[str]], references: Sequence[str], chinese: bool = False
) -> Callable[[np.ndarray, str], float]:
    """A ``score``: corpus BLEU or chrF from sacrebleu's per-answer sufficient statistics, summed over ``idx``."""
    metric = sacrebleu_metric(name, chinese)
    stats = {
        model: np.asarray(metric._extract_corpus_statistics(list(hyps), [list(references)]), dtype=float)
        for model, hyps in hypotheses.items()
    }

    def score(idx: np.ndarray, model: str) -> float:
        if not len(idx):
            return float("nan")
        return float(metric._compute_score_from_stats(list(stats[model][idx].sum(axis=0))).score)

    return score


def corpus_score(name: str, hypotheses: Sequence[str], references: Sequence[str], chinese: bool = False) -> float:
    """Corpus BLEU/chrF of one system through the same statistics (equals sacrebleu.corpus_bleu/chrf)."""
    return corpus_scorer(name, {"x": hypotheses}, references, chinese)(np.arange(len(hypotheses)), "x")


# ----------------------------------------------------------------------------------------------
# Language


def text_language(text: str) -> str:
    """``zh``, ``en`` or ``none`` by letter counts (see :data:`LANGUAGE_RULE`)."""
    cjk = len(_CJK_RE.findall(text or ""))
    latin = len(_LATIN_RE.findall(text or ""))
    if cjk + latin == 0:
        return "none"
    return "zh" if cjk >= 0.5 * (cjk + latin) else "en"


def language_fidelity(questions: Sequence[str], answers: Sequence[str]) -> dict:
    """Share of answers in their question's language, with the counts per answer language."""
    pairs = [(text_language(q), text_language(a)) for q, a in zip(questions, answers)]
    same = sum(1 for q, a in pairs if q == a and q != "none")
    counts: dict[str, int] = {}
    for _, a in pairs:
        counts[a] = counts.get(a, 0) + 1
    return {
        "fidelity": same / len(pairs) if pairs else None,
        "same_language": same,
        "answers": len(pairs),
        "answer_languages": dict(sorted(counts.items())),
    }


@lru_cache(maxsize=1)
def _to_traditional():
    import opencc

    return opencc.OpenCC("s2t")


def simplified_share(text: str) -> float | None:
    """Share of the CJK characters of ``text`` that are Simplified forms (OpenCC s2t changes them).

    None when the text has no CJK character. Characters shared by both scripts count as not
    Simplified, so a Traditional text gives 0 and a typical Simplified one roughly 0.2–0.4.
    """
    chars = _CJK_RE.findall(text or "")
    if not chars:
        return None
    convert = _to_traditional().convert
    changed = sum(1 for c in chars if convert(c) != c)
    return changed / len(chars)
