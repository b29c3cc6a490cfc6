"""The shipped reference adapter (full MedQuAD on one H200): complete, licensed, held out from both runs,
and on CPU it gives the losses the GPU run recorded for the same questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.checks import reference
from medgemma_lib.data import read_table
from medgemma_lib.training.checkpoints import verify_adapter

REPO = Path(__file__).resolve().parents[1]
REF = reference.REFERENCE_DIR


def _key(text: str) -> str:
    return " ".join((text or "").casefold().split())


def test_folder_is_complete_and_carries_the_gemma_notice():
    for name in (*reference.SHIPPED_FILES, "README.md", "GEMMA_TERMS.html", "NOTICE.md", "report.json"):
        assert (REF / name).is_file(), name
    verify_adapter(REF)  # every file's size and sha256 as written
    with safe_open(str(REF / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_tensor(k).dtype) for k in keys[:5]} == {"torch.bfloat16"}
    assert len(keys) == 18 * 7 * 2 + 1  # 18 layers x q,k,v,o,gate,up,down x (A, B), and the stop token's row
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    config = json.loads((REF / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["trainable_token_indices"] == [106]
    assert json.loads((REF / "stop_token.json").read_text(encoding="utf-8"))["trained_token_ids"] == [106]
    assert (REF / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    card = (REF / "README.md").read_text(encoding="utf-8")
    assert "Gemma Terms of Use" in card and "ai.google.dev/gemma/terms" in card and MEDICAL_DISCLAIMER in card
    assert "Gemma Terms of Use" in (REF / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    assert "CC BY 4.0" in card


def test_report_is_the_one_in_docs_quality():
    shipped = json.loads((REF / "report.json").read_text(encoding="utf-8"))
    docs = json.loads((REPO / "docs/quality/medquad-full-gemma3-270m.json").read_text(encoding="utf-8"))
    for key in ("base", "tuned", "diff_ci95", "command", "date", "n_test_loss", "n_generate"):
        assert shipped[key] == docs[key], key


def test_heldout_questions_are_unseen_by_the_short_run():
    held = reference.load_heldout()
    assert len(held) == 16
    sample = read_table(REPO / "data/medquad_sample.csv").rows
    questions = {_key(r["question"]) for r in sample}
    focus = {_key(r["focus_area"]) for r in sample if r.get("focus_area")}
    for rec in held:
        assert _key(rec["prompt"][-1]["content"]) not in questions
        assert _key(rec["focus_area"]) not in focus
        assert len(rec["completion"][0]["content"]) <= 400
    # the library's count (notebook 06) agrees with the plain check above, and sees a planted leak
    assert reference.overlap(held, sample) == {"questions": 0, "focus_areas": 0}
    leaked = [dict(sample[0], question=held[0]["prompt"][-1]["content"].upper()), dict(sample[1], focus_area="")]
    leaked[1]["focus_area"] = held[1]["focus_area"] + "  "
    assert reference.overlap(held, sample + leaked) == {"questions": 1, "focus_areas": 1}


@pytest.mark.slow
def test_heldout_questions_are_in_the_full_runs_test_split(shared_data):
    from medgemma_lib.core.config import load_config
    from medgemma_lib.data import prepare_from_config

    cfg = load_config(REPO / "configs/medquad-full.yaml")
    cfg.data.input = str(shared_data / "medquad" / "medquad.csv")
    cfg.data.mix = []
    splits, _ = prepare_from_config(cfg.data)
    test_ids = [r["id"] for r in splits["test"]]
    train_focus = {_key(r["focus_area"]) for r in splits["train"]}
    held = reference.load_heldout()
    assert all(r["id"] in set(test_ids) for r in held)
    assert not any(_key(r["focus_area"]) in train_focus for r in held)
    # and they are exactly what heldout_records picks (not chosen by hand)
    sample = read_table(REPO / "data/medquad_sample.csv").rows
    again = reference.heldout_records([dict(r) for r in splits["test"]], sample, 16)
    assert [r["id"] for r in again] == [r["id"] for r in held]


def test_every_heldout_question_has_its_gpu_loss_recorded():
    evaluation = json.loads((REF / "eval.json").read_text(encoding="utf-8"))
    recorded = {r["id"] for r in evaluation["loss_examples"]}
    assert {r["id"] for r in reference.load_heldout()} <= recorded


@pytest.mark.slow
def test_cpu_losses_match_the_gpu_run(demo_model_dir):
    """Second machine, second kernel set: NF4 on CPU vs NF4 on the H200, same adapter, same questions."""
    evaluation = json.loads((REF / "eval.json").read_text(encoding="utf-8"))
    gpu = {r["id"]: r for r in evaluation["loss_examples"]}
    held = reference.load_heldout()[:6]
    out = reference.compare_adapters({"full": REF}, held, num_generate=0, resamples=10, verbose=False)
    for row in out["loss_examples"]:
        ref = gpu[row["id"]]
        assert row["tokens"] == ref["tokens"]
        for model in ("base", "full"):
            gpu_nll = ref["nll"]["base" if model == "base" else "tuned"]
            # 3 %, or 0.01 nats a token for answers the tuned model nearly knows by heart (57 tokens, 4.85 vs 5.13)
            assert row["nll"][model] == pytest.approx(gpu_nll, rel=0.03, abs=0.01 * row["tokens"]), (row["id"], model)
        # the stop token's probability after the reference answer: the GPU's figure, within the kernels' spread
        gpu_stop, cpu_stop = ref["stop_prob"]["tuned"], row["stop_prob"]["full"]
        assert abs(cpu_stop - gpu_stop) < 0.1 + 0.2 * gpu_stop, (row["id"], cpu_stop, gpu_stop)
        assert row["stop_prob"]["base"] < 1e-9
    assert out["models"]["full"]["loss"] < out["models"]["base"]["loss"]
    assert out["models"]["full"]["stop_probability"] > 0.1


@pytest.mark.slow
def test_a_base_that_already_stops_trains_lora_only(demo_model_dir):
    """The check's other branch on a real model: the demo base with the shipped adapter merged in has learned
    <end_of_turn> (as an instruction-tuned MedGemma has), so a run on it would train LoRA only."""
    from peft import PeftModel

    from medgemma_lib.models import loading as models
    from medgemma_lib.training import stopping

    base = models.load_model("demo", "none", "cpu")
    merged = PeftModel.from_pretrained(base, str(REF)).merge_and_unload().eval()
    tokenizer = models.load_tokenizer("demo")
    check = stopping.check_stop_token(merged, tokenizer, reference.load_heldout(), mode="auto")
    assert check.base_can_stop is True and check.trained_token_ids == [], check
    assert check.median > 10 * stopping.STOP_PROBABILITY_FLOOR  # measured 0.05 (fp32 merge of an NF4-trained adapter)
