"""Evaluation: bad run folders, metric tokenization (Chinese by characters), the masked test loss,
base vs fine-tuned on one base model, and the files a run gets (eval.json / eval.md / eval.png)."""

from __future__ import annotations

import json
import math

import pytest
from _lora_runs import make_run

from medgemma_lib import MEDICAL_DISCLAIMER, cli
from medgemma_lib.core.errors import EXIT_USER_ERROR, ModelError
from medgemma_lib.evaluation import evaluate as ev
from medgemma_lib.evaluation import metrics
from medgemma_lib.training import runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A run folder whose adapter (random non-zero LoRA) sits on the tiny random Gemma 3."""
    root = tmp_path_factory.mktemp("eval-runs")
    return make_run(
        root / "tiny-run",
        str(tiny_model_dir),
        str(tiny_model_dir),
        "none",
        max_eval_examples=4,
        num_generate=2,
        max_new_tokens=6,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def tiny_pair(tiny_run):
    return runs.load_for_inference(tiny_run, verbose=False)


# ----------------------------------------------------------------------------------------------
# Bad input: Chinese message, exit code 2


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_missing_run_folder(tmp_path, capsys):
    with pytest.raises(ModelError, match="找不到執行資料夾"):
        runs.open_run(tmp_path / "no-such-run")
    code, err = _cli(["evaluate", "--run", str(tmp_path / "no-such-run")], capsys)
    assert code == EXIT_USER_ERROR
    assert "找不到執行資料夾" in err and "Traceback" not in err


def test_existing_run_is_not_retrained(tiny_run):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert ev.find_or_train_run(tiny_run, verbose=False) == tiny_run
    assert sorted(p.name for p in tiny_run.rglob("*")) == before


def test_folder_without_adapter(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model:\n  profile: demo\n", encoding="utf-8")
    with pytest.raises(ModelError, match="沒有 LoRA 轉接器"):
        runs.open_run(tmp_path / "run")
    code, err = _cli(["evaluate", "--run", str(tmp_path / "run")], capsys)
    assert code == EXIT_USER_ERROR and "沒有 LoRA 轉接器" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-config"])
def test_corrupted_adapter(tmp_path, tiny_run, capsys, damage):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(tiny_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 10)
    else:
        (run / "adapter" / "adapter_config.json").write_text("{ broken", encoding="utf-8")
    with pytest.raises(ModelError, match="損毀"):
        runs.open_run(run)
    code, err = _cli(["evaluate", "--run", str(run)], capsys)
    assert code == EXIT_USER_ERROR and "損毀" in err and "解決方法" in err


# ----------------------------------------------------------------------------------------------
# Text metrics


def test_rouge_score_drops_chinese_so_we_split_characters():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"]).score("糖尿病的症狀", "糖尿病的症狀")["rougeL"].fmeasure
    assert default == 0.0  # rouge-score's own tokenizer keeps only [a-z0-9]: why we tokenize Chinese ourselves
    assert metrics.chinese_tokens("糖尿病 Type 2") == ["糖", "尿", "病", "type", "2"]
    same = metrics.text_metrics(["糖尿病的症狀是口渴"], ["糖尿病的症狀是口渴"], chinese=True)
    assert same["rougeL"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    half = metrics.text_metrics(["糖尿病會口渴"], ["糖尿病的症狀是口渴與多尿"], chinese=True)
    # LCS 糖尿病…口渴 = 5 chars; precision 5/6, recall 5/12
    assert half["rougeL"] == pytest.approx(100 * 2 * (5 / 6) * (5 / 12) / (5 / 6 + 5 / 12))
    assert half["length"] == 6 and half["reference_length"] == 12


def test_english_metrics_by_words():
    good = metrics.text_metrics(
        ["Diabetes causes thirst and frequent urination."], ["Diabetes causes thirst and frequent urination."]
    )
    bad = metrics.text_metrics(
        ["Glaucoma damages the optic nerve."], ["Diabetes causes thirst and frequent urination."]
    )
    assert good["rougeL"] == pytest.approx(100.0) and good["chrf"] == pytest.approx(100.0)
    assert bad["rougeL"] < 20 and bad["chrf"] < good["chrf"]
    assert good["length"] == 6  # words
    assert metrics.is_chinese("糖尿病的症狀是什麼?") and not metrics.is_chinese("What is diabetes?")


def test_chinese_set_has_guide_questions_and_sample():
    items = ev.chinese_eval_set(num_sample=2)
    questions = [i["question"] for i in items]
    assert questions[:3] == ["糖尿病的症狀是什麼?", "高血壓如何治療?", "心臟病的原因是什麼?"]
    assert len(items) == 5 and all(i["reference"] for i in items)
    assert items[3]["source"] == "zh_toyhom_sample"
    assert "压" not in "".join(i["question"] + i["reference"] for i in items[3:])  # converted to Traditional (s2twp)


# ----------------------------------------------------------------------------------------------
# Loss: the same masking as training


@pytest.mark.slow
def test_answer_loss_equals_masked_full_loss(tiny_pair):
    """Projecting logits only at answer positions gives exactly the loss over all positions with the prompt masked."""
    import torch

    from medgemma_lib.data import label_mask_example

    model, tok, run = tiny_pair
    recs = ev.test_records(run, limit=2)
    rows = metrics.answer_losses(model, tok, recs, max_length=64)  # 64 also exercises truncation
    for rec, row in zip(recs, rows):
        ex = label_mask_example(tok, rec, max_length=64)
        with torch.inference_mode():
            full = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
        assert row["tokens"] == sum(ex["trained"]) and row["tokens"] < len(ex["input_ids"])
        assert row["nll"] / row["tokens"] == pytest.approx(full, rel=1e-5)


def test_test_split_is_disjoint_from_training(tiny_pair):
    from medgemma_lib.data import prepare_from_config

    _, _, run = tiny_pair
    splits, _ = prepare_from_config(run.config.data)
    train_areas = {r["focus_area"].casefold() for r in splits["train"]}
    test = ev.test_records(run)
    assert [r["id"] for r in test] == [r["id"] for r in splits["test"]]
    assert not {r["focus_area"].casefold() for r in test} & train_areas


# ----------------------------------------------------------------------------------------------
# The whole evaluation


@pytest.mark.slow
def test_run_evaluation_writes_reports_and_uses_one_base(tiny_run, monkeypatch):
    from medgemma_lib.models import loading as models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    result = ev.run_evaluation(tiny_run, num_chinese_samples=1, verbose=False)
    assert len(loads) == 1  # one base model: "base" is the same weights with the adapter disabled

    base, tuned = result["models"]["base"], result["models"]["tuned"]
    assert base["examples"] == tuned["examples"] == 4 and base["tokens"] == tuned["tokens"] > 0
    assert base["loss"] != tuned["loss"]  # the adapter is really on for "tuned" ...
    assert result["difference"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert math.isclose(base["perplexity"], math.exp(base["loss"]), rel_tol=1e-9)
    for m in (base, tuned):
        assert {"rougeL", "bleu", "chrf", "length"} <= set(m)
    assert result["settings"]["generated_english"] == 2 and len(result["answers"]) == 2
    assert all(set(a["answers"]) == {"base", "tuned"} for a in result["answers"])
    assert len(result["chinese"]["answers"]) == 4 and result["chinese"]["models"]["tuned"]["chrf"] is not None
    assert "字" in result["tokenization"]["chinese"]
    assert set(result["by_source"]) and set(result["by_qtype"])

    # ... and "base" really is the base model: same loss as the plain model loaded on its own.
    from medgemma_lib.models.loading import load_tokenizer

    run = runs.open_run(tiny_run)
    plain = real_load(run.config.model.profile, "none")
    tok = load_tokenizer(run.config.model.profile)
    plain_rows = metrics.answer_losses(
        plain, tok, ev.test_records(run, limit=4), max_length=run.config.train.max_length
    )
    assert metrics.summarize_losses(plain_rows)["loss"] == pytest.approx(base["loss"], rel=1e-5)

    saved = json.loads((tiny_run / "eval.json").read_text(encoding="utf-8"))
    assert saved["models"]["tuned"]["loss"] == pytest.approx(tuned["loss"])
    md = (tiny_run / "eval.md").read_text(encoding="utf-8")
    assert MEDICAL_DISCLAIMER in md and "基礎模型" in md and "微調後" in md and "糖尿病的症狀是什麼?" in md
    assert (tiny_run / "eval.png").stat().st_size > 5000
    assert ev.load_evaluation(tiny_run)["run"] == tiny_run.name


@pytest.mark.slow
def test_cli_evaluate_prints_table(tiny_run, capsys):
    code = cli.main(
        ["evaluate", "--run", str(tiny_run), "--num-generate", "1", "--no-chinese", "--max-new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "測試集 loss" in out and MEDICAL_DISCLAIMER in out
    assert json.loads((tiny_run / "eval.json").read_text(encoding="utf-8"))["settings"]["generated_chinese"] == 0
