"""Paired bootstrap intervals and the language checks, against known answers and a second method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu

from medgemma_lib.core import stats

HYPS_BASE = ["the cat sat on the mat", "a dog runs", "insulin lowers blood sugar", "take rest", "fever and cough"]
HYPS_TUNED = [
    "the cat is on the mat",
    "the dog barks loudly",
    "insulin lowers blood glucose levels",
    "rest and fluids",
    "fever cough and fatigue",
]
REFS = [
    "the cat is on the mat",
    "the dog barks",
    "insulin lowers blood glucose",
    "rest and drink fluids",
    "fever, cough and fatigue are common",
]


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_corpus_score_on_all_examples_is_sacrebleus_corpus_score(name):
    expected = (sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf)(HYPS_TUNED, [REFS]).score
    assert stats.corpus_score(name, HYPS_TUNED, REFS) == pytest.approx(expected, abs=1e-9)


def test_chinese_bleu_uses_the_zh_tokenizer():
    hyps, refs = ["高血壓要少吃鹽", "多喝水"], ["高血壓患者要少吃鹽", "要多喝水"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score
    assert stats.corpus_score("bleu", hyps, refs, chinese=True) == pytest.approx(expected, abs=1e-9)
    assert expected != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)  # 13a would differ


def test_difference_on_all_examples_and_interval_contains_it():
    score = stats.corpus_scorer("chrf", {"base": HYPS_BASE, "tuned": HYPS_TUNED}, REFS)
    out = stats.paired_difference(score, len(REFS), resamples=500, seed=1)
    expected = sacrebleu.corpus_chrf(HYPS_TUNED, [REFS]).score - sacrebleu.corpus_chrf(HYPS_BASE, [REFS]).score
    assert out["difference"] == pytest.approx(expected)
    low, high = out["ci95"]
    assert low <= out["difference"] <= high
    assert out["n"] == 5 and out["resamples"] == 500


def test_identical_systems_give_a_zero_width_interval():
    score = stats.corpus_scorer("bleu", {"base": HYPS_TUNED, "tuned": HYPS_TUNED}, REFS)
    out = stats.paired_difference(score, len(REFS), resamples=200)
    assert out["difference"] == 0.0 and out["ci95"] == [0.0, 0.0]


def test_constant_shift_gives_exactly_that_shift():
    base = np.random.default_rng(0).normal(20, 5, size=50)
    out = stats.paired_difference(stats.mean_scorer({"base": base, "tuned": base + 2.5}), 50, resamples=300)
    assert out["difference"] == pytest.approx(2.5)
    assert out["ci95"] == pytest.approx([2.5, 2.5])


def test_mean_interval_agrees_with_the_normal_approximation():
    """Second method: for a mean of 400 paired differences, percentile bootstrap ≈ mean ± 1.96·sd/√n."""
    rng = np.random.default_rng(7)
    base = rng.normal(15, 6, size=400)
    tuned = base + rng.normal(1.0, 4, size=400)
    out = stats.paired_difference(stats.mean_scorer({"base": base, "tuned": tuned}), 400, resamples=4000, seed=3)
    d = tuned - base
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert out["difference"] == pytest.approx(d.mean())
    assert out["ci95"][0] == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert out["ci95"][1] == pytest.approx(d.mean() + half, abs=0.08 * half)


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered = 0
    trials = 200
    for t in range(trials):
        base = rng.normal(10, 3, size=60)
        tuned = base + 0.5 + rng.normal(0, 2, size=60)  # true mean difference 0.5
        out = stats.paired_difference(stats.mean_scorer({"base": base, "tuned": tuned}), 60, resamples=400, seed=t)
        covered += out["ci95"][0] <= 0.5 <= out["ci95"][1]
    assert 0.88 <= covered / trials <= 0.99


def test_loss_is_token_weighted_on_every_resample():
    nll = {"base": [10.0, 30.0, 6.0], "tuned": [8.0, 21.0, 6.0]}
    tokens = [5, 10, 2]
    score = stats.loss_scorer(nll, tokens)
    assert score(np.arange(3), "base") == pytest.approx(46 / 17)
    assert score(np.array([1, 1, 2]), "tuned") == pytest.approx((21 + 21 + 6) / 22)
    out = stats.paired_difference(score, 3, resamples=300)
    assert out["difference"] == pytest.approx(35 / 17 - 46 / 17)
    assert out["ci95"][1] <= 0  # tuned never worse on any example


def test_resampling_is_seeded():
    a = stats.resample_indices(10, 5, seed=4)
    assert a.shape == (5, 10) and (a == stats.resample_indices(10, 5, seed=4)).all()
    assert not (a == stats.resample_indices(10, 5, seed=5)).all()


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("高血壓的症狀有哪些？", "zh"),
        ("What are the symptoms of high blood pressure?", "en"),
        ("糖尿病患者的 HbA1c 目標", "zh"),  # 6 CJK vs 4 Latin letters
        ("MRI 檢查", "en"),  # 3 Latin letters vs 2 CJK: counted as letters, stated in LANGUAGE_RULE
        ("", "none"),
        ("120/80 mmHg"[:6], "none"),
    ],
)
def test_text_language(text, language):
    assert stats.text_language(text) == language


def test_language_fidelity_counts():
    questions = ["什麼是氣喘？", "What is asthma?", "氣喘會遺傳嗎？", "Is it contagious?"]
    answers = ["氣喘是一種慢性呼吸道疾病。", "Asthma is a chronic disease.", "Asthma can run in families.", ""]
    out = stats.language_fidelity(questions, answers)
    assert out["same_language"] == 2 and out["answers"] == 4 and out["fidelity"] == 0.5
    assert out["answer_languages"] == {"en": 2, "none": 1, "zh": 1}


def test_simplified_share():
    assert stats.simplified_share("頭痛") == 0.0
    assert stats.simplified_share("头痛") == 0.5  # 头 is Simplified, 痛 is shared by both scripts
    assert stats.simplified_share("Headache") is None
