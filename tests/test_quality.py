"""The quality report: intervals recomputed from the evaluation's own per-example data, the verdict
read off the intervals, input checked before anything is written, and the shipped reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _lora_runs import make_run

from medgemma_lib import MEDICAL_DISCLAIMER, cli
from medgemma_lib.core import stats
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import EXIT_USER_ERROR
from medgemma_lib.evaluation import evaluate as ev
from medgemma_lib.evaluation import quality

REPO = Path(__file__).resolve().parents[1]
QUALITY = REPO / "docs" / "quality"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    run = make_run(
        tmp_path_factory.mktemp("quality-runs") / "tiny",
        str(tiny_model_dir),
        str(tiny_model_dir),
        "none",
        max_eval_examples=6,
        num_generate=4,
        max_new_tokens=6,
        batch_size=4,
    )
    result = ev.run_evaluation(run, num_chinese_samples=2, bootstrap_resamples=300, verbose=False)
    return run, result


@pytest.mark.slow
def test_intervals_are_recomputed_from_the_per_example_data(evaluated):
    _, result = evaluated
    rows = result["loss_examples"]
    assert len(rows) == result["settings"]["loss_examples"] == 6
    nll = {m: [r["nll"][m] for r in rows] for m in ("base", "tuned")}
    tokens = [r["tokens"] for r in rows]
    # Second computation of the loss difference and its interval, from the stored rows alone.
    again = stats.paired_difference(stats.loss_scorer(nll, tokens), len(rows), resamples=300)
    assert again["difference"] == pytest.approx(result["difference"]["loss"], rel=1e-9)
    assert again["ci95"] == pytest.approx(result["ci95"]["loss"]["ci95"], rel=1e-9)
    hyps = {m: [a["answers"][m] for a in result["answers"]] for m in ("base", "tuned")}
    refs = [a["reference"] for a in result["answers"]]
    chrf = stats.paired_difference(stats.corpus_scorer("chrf", hyps, refs), len(refs), resamples=300)
    assert chrf["difference"] == pytest.approx(result["difference"]["chrf"], abs=1e-9)
    assert chrf["ci95"] == pytest.approx(result["ci95"]["chrf"]["ci95"], abs=1e-9)
    for key in ("loss", "rougeL", "bleu", "chrf", "length"):
        low, high = result["ci95"][key]["ci95"]
        assert low <= result["difference"][key] + 1e-9 and result["difference"][key] <= high + 1e-9


def test_language_and_decoding_sections(evaluated):
    _, result = evaluated
    lang = result["language"]
    assert lang["english"]["base"]["answers"] == 4
    assert lang["chinese"]["tuned"]["answers"] == len(result["chinese"]["answers"]) == 5
    dec = result["decoding"]["english"]
    assert dec["max_new_tokens"] == 6
    assert dec["references_longer_than_limit"] == 1.0  # every reference is longer than 6 tokens
    # a random tiny model never emits <end_of_turn> within 6 tokens: every answer is cut by the limit
    assert dec["answers_cut_at_limit"] == {"base": 1.0, "tuned": 1.0}
    assert dec["answer_tokens_mean"] == {"base": 6.0, "tuned": 6.0}


def test_report_from_the_evaluation(evaluated, tmp_path):
    run, result = evaluated
    cfg = load_config(run / "config.yaml")
    summary = {"global_step": 3, "train_seconds": 1.5, "tokens_trained": 900, "tokens_per_second": 600.0}
    report = quality.build_report(result, summary, cfg, "python -m medgemma_lib quality ...")
    for key in ("n_test_loss", "n_generate", "base", "tuned", "diff", "diff_ci95", "command", "hardware", "date"):
        assert key in report
    for metric in ("loss", "rougeL", "chrf", "bleu"):
        assert report["diff"][metric] == pytest.approx(report["tuned"][metric] - report["base"][metric])
        assert len(report["diff_ci95"][metric]) == 2
    assert report["versions"]["transformers"] and report["versions"]["torch"]
    json_path, md_path = quality.write_report(report, tmp_path / "tiny-report")
    saved = json.loads(json_path.read_text(encoding="utf-8"))
    assert saved["name"] == "tiny-report" and saved["diff_ci95"]["loss"] == pytest.approx(report["diff_ci95"]["loss"])
    md = md_path.read_text(encoding="utf-8")
    assert MEDICAL_DISCLAIMER in md
    low, high = report["diff_ci95"]["loss"]
    assert f"[{low:+.4f}, {high:+.4f}]" in md  # the Markdown shows the JSON's numbers


@pytest.mark.parametrize(
    ("interval", "word"),
    [([-0.9, -0.7], "確實變好"), ([0.1, 0.3], "確實變差"), ([-0.1, 0.2], "看不出差異")],
)
def test_verdict_is_read_off_the_interval(interval, word):
    part = {"diff": {"loss": sum(interval) / 2}, "diff_ci95": {"loss": interval}}
    lines = quality.verdict({**part, "chinese": {"diff": {}, "diff_ci95": {}}})
    assert len(lines) == 1 and word in lines[0]
    rouge = quality.verdict(
        {"diff": {"rougeL": 1.0}, "diff_ci95": {"rougeL": [-x for x in interval[::-1]]}, "chinese": part}
    )
    assert word in rouge[0]  # higher is better for ROUGE-L: the mirrored interval reads the same


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["quality", "--config", str(REPO / "configs/demo.yaml"), "--report", "no-such-dir/report"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "不存在" in err and "Traceback" not in err
    code = cli.main(
        [
            "quality",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--report",
            str(tmp_path / "r"),
            "data.input=missing.csv",
            "eval.bootstrap_resamples=100",
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "data.input" in err and "missing.csv" in err
    code = cli.main(["quality", "--config", str(REPO / "configs/demo.yaml"), "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "bootstrap_resamples" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no report


def test_mix_chinese_set_takes_sources_in_turn():
    def rec(q, src):
        return {"prompt": [{"role": "user", "content": q}], "completion": [{"content": "答"}], "mix_source": src}

    records = [rec("甲一？", "a"), rec("甲二？", "a"), rec("甲三？", "a"), rec("乙一？", "b"), rec("English?", "b")]
    picked = ev.mix_chinese_set(records, 4)
    assert [p["question"] for p in picked] == ["甲一？", "乙一？", "甲二？", "甲三？"]
    assert all(p["record"]["mix_source"] == p["source"] for p in picked)


# ----------------------------------------------------------------------------------------------
# The shipped reports (docs/quality), made on the H200 by the documented command


def _shipped(name: str) -> dict:
    path = QUALITY / f"{name}.json"
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["medquad-full-gemma3-270m", "medquad-bilingual-gemma3-270m"])
def test_shipped_report_is_complete_and_consistent(name):
    report = _shipped(name)
    assert report["hardware"]["gpu"] and any(g in report["hardware"]["gpu"] for g in ("H100", "H200"))
    assert report["command"].startswith("python -m medgemma_lib quality --config configs/")
    assert report["versions"]["transformers"] == "5.23.0"
    assert report["n_test_loss"] >= 400 and report["n_generate"] >= 200
    for part in (report, report["chinese"]):
        for metric, (low, high) in part["diff_ci95"].items():
            assert low <= part["diff"][metric] + 1e-9 <= high + 2e-9, metric
        for metric in ("rougeL", "chrf", "bleu"):
            assert part["diff"][metric] == pytest.approx(part["tuned"][metric] - part["base"][metric])
    assert report["verdict"] == quality.verdict(report)  # the conclusions are the intervals, not prose
    md = (QUALITY / f"{name}.md").read_text(encoding="utf-8")
    assert MEDICAL_DISCLAIMER in md
    for line in report["verdict"]:
        assert line in md


def test_full_run_improves_english_with_intervals_above_zero():
    report = _shipped("medquad-full-gemma3-270m")
    assert report["diff_ci95"]["loss"][1] < 0
    assert report["diff_ci95"]["rougeL"][0] > 0 and report["diff_ci95"]["chrf"][0] > 0


def test_full_run_reports_whether_answers_end_per_language():
    """stop_rate and stop_probability, each {"base": x, "tuned": y}, in the English and the Chinese section; the
    stop token was trained (the pretrained base never produces it) and its probability rose, interval above zero."""
    report = _shipped("medquad-full-gemma3-270m")
    for part in (report, report["chinese"]):
        for key in ("stop_rate", "stop_probability"):
            assert set(part[key]) == {"base", "tuned"} and all(0 <= v <= 1 for v in part[key].values()), key
    assert report["training"]["stop_token"]["trained_token_ids"] == [106]
    assert report["stop_probability"]["base"] < 1e-9 < 0.3 < report["stop_probability"]["tuned"]
    assert report["stop_ci95"]["stop_probability"][0] > 0
    st = report["stopping"]["english"]
    assert st["n_probability"] == report["n_test_loss"] and st["n_generated"] == report["n_generate"]
    md = (QUALITY / "medquad-full-gemma3-270m.md").read_text(encoding="utf-8")
    assert "## 答案有沒有說完就停" in md


def test_bilingual_mix_keeps_english_and_answers_chinese_in_chinese():
    plain, mixed = _shipped("medquad-full-gemma3-270m"), _shipped("medquad-bilingual-gemma3-270m")
    # same held-out questions for both runs
    assert plain["n_generate"] == mixed["n_generate"] and plain["n_generate_chinese"] == mixed["n_generate_chinese"]
    assert plain["chinese"]["n"] >= 50
    assert mixed["tuned"]["rougeL"] > plain["tuned"]["rougeL"] - 2.0  # no large English regression
    fid = {r: x["language"]["chinese"]["tuned"]["fidelity"] for r, x in (("plain", plain), ("mixed", mixed))}
    assert fid["mixed"] >= fid["plain"]
    assert mixed["chinese"]["tuned"]["loss"] < plain["chinese"]["tuned"]["loss"]
    assert np.isfinite(mixed["chinese"]["tuned"]["chrf"])


def test_readme_numbers_are_the_reports():
    """The README's reference table is the JSON's numbers, formatted, not numbers typed by hand."""
    readme = (REPO / "README_中文.md").read_text(encoding="utf-8")
    plain, mixed = _shipped("medquad-full-gemma3-270m"), _shipped("medquad-bilingual-gemma3-270m")
    for key, digits in (("loss", 3), ("rougeL", 2), ("chrf", 2), ("bleu", 2)):
        low, high = plain["diff_ci95"][key]
        values = f"| {plain['base'][key]:.{digits}f} | {plain['tuned'][key]:.{digits}f} |"
        assert f"{values} [{low:+.{digits}f}, {high:+.{digits}f}]" in readme
        assert f"| {mixed['tuned'][key]:.{digits}f} |" in readme
    assert plain["hardware"]["gpu"] in readme and plain["date"] in readme
