"""The tuned model must be able to end its answers: the stop token is measured before training, trained when the
base never learned it (and only then), with the right gradient, and measured again wherever answers are scored."""

from __future__ import annotations

import pytest

from medgemma_lib.core.config import RunConfig
from medgemma_lib.core.profiles import END_OF_TURN_ID, PROFILES
from medgemma_lib.training import stopping


def _record(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


RECORDS = [
    _record("What is glaucoma?", "Glaucoma is a group of diseases that damage the optic nerve."),
    _record("What causes anemia?", "Anemia is caused by too few healthy red blood cells."),
    _record("糖尿病的症狀是什麼？", "常見症狀包括口渴、多尿與疲倦。"),
]


def _tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_stop_probability_is_the_softmax_at_the_answer_end(tiny_model_dir, demo_tokenizer):
    """Known answer: a plain full forward of prompt + answer, softmax at the position before <end_of_turn>."""
    import torch

    from medgemma_lib.data import label_mask_example

    model = _tiny(tiny_model_dir)
    probs = stopping.stop_probabilities(model, demo_tokenizer, RECORDS)
    for rec, p in zip(RECORDS, probs):
        ex = label_mask_example(demo_tokenizer, rec)
        pos = ex["input_ids"].index(END_OF_TURN_ID, ex["prompt_tokens"])  # the answer's own <end_of_turn>
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, pos - 1]
        assert p == pytest.approx(float(torch.softmax(logits, -1)[END_OF_TURN_ID]), rel=1e-5)
    # an answer cut before its end has no end to measure
    assert stopping.stop_probabilities(model, demo_tokenizer, RECORDS[:1], max_length=20) == [None]


def test_the_check_trains_the_stop_row_only_when_the_base_cannot_stop(tiny_model_dir, demo_tokenizer, monkeypatch):
    model = _tiny(tiny_model_dir)
    low = stopping.check_stop_token(model, demo_tokenizer, RECORDS, mode="auto")
    assert low.median < stopping.STOP_PROBABILITY_FLOOR and low.base_can_stop is False  # a random model: ~1/262,144
    assert low.trained_token_ids == [END_OF_TURN_ID] and "<end_of_turn>" in low.message()
    assert stopping.check_stop_token(model, demo_tokenizer, RECORDS, mode="never").trained_token_ids == []
    assert stopping.check_stop_token(model, demo_tokenizer, RECORDS, mode="always").trained_token_ids == [106]
    # a base that already ends its answers (an instruction-tuned MedGemma): nothing changes
    monkeypatch.setattr(stopping, "stop_probabilities", lambda *a, **k: [0.4, 0.9, 0.7])
    high = stopping.check_stop_token(model, demo_tokenizer, RECORDS, mode="auto")
    assert high.base_can_stop is True and high.trained_token_ids == [] and "只訓練 LoRA" in high.message()
    assert stopping.StopTokenCheck.from_dict(high.to_dict()) == high


def test_the_stop_row_gets_the_gradient_of_the_full_tied_embedding(tiny_model_dir, demo_tokenizer):
    """PEFT's trainable row vs a plain model whose whole (tied) embedding trains: same loss, same row gradient,
    and nothing else of the embedding trains."""
    import torch

    from medgemma_lib.data import label_mask_example
    from medgemma_lib.training.trainer import prepare_model_for_training

    ex = label_mask_example(demo_tokenizer, RECORDS[0])
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    reference = _tiny(tiny_model_dir)
    assert reference.config.tie_word_embeddings
    reference.requires_grad_(False)
    emb = reference.get_input_embeddings().weight
    emb.requires_grad_(True)
    ref_loss = reference(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    cfg = RunConfig()
    cfg.lora.dropout = 0.0
    model = prepare_model_for_training(cfg, _tiny(tiny_model_dir), PROFILES["demo"], "cpu", False, [END_OF_TURN_ID])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = stopping.trainable_token_params(model)
    assert len(rows) == 1 and rows[0][1].shape == (1, emb.shape[1]) and rows[0][1].dtype == torch.float32
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    loss = model(input_ids=ids, labels=labels).loss
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)  # B = 0, the row equals the base row
    loss.backward()
    torch.testing.assert_close(rows[0][1].grad[0], emb.grad[END_OF_TURN_ID], rtol=1e-5, atol=1e-8)
    assert emb.grad[END_OF_TURN_ID].norm() > 0
    assert model.get_input_embeddings().token_adapter.base_layer.weight.grad is None  # the rest stays frozen


def test_the_lora_config_asks_peft_for_the_row_only_when_told(tiny_model_dir):
    from medgemma_lib.training.trainer import lora_config

    cfg = RunConfig()
    assert lora_config(cfg, PROFILES["demo"]).trainable_token_indices is None
    assert lora_config(cfg, PROFILES["demo"], [106]).trainable_token_indices == [106]


def test_eval_rows_report_the_same_stop_probability_as_the_check(tiny_model_dir, demo_tokenizer):
    """Two methods: the evaluation's loss pass (label-position logits) and the check's own one-position forward."""
    from medgemma_lib.evaluation.metrics import answer_losses

    model = _tiny(tiny_model_dir)
    rows = answer_losses(model, demo_tokenizer, RECORDS)
    direct = stopping.stop_probabilities(model, demo_tokenizer, RECORDS)
    for row, p in zip(rows, direct):
        assert row["stop_prob"] == pytest.approx(p, rel=1e-4)


def test_stop_metrics_count_stops_ratios_and_intervals(demo_tokenizer):
    from medgemma_lib.evaluation.metrics import stop_metrics
    from medgemma_lib.evaluation.report import stopping_rows

    refs = ["one two three", "four five six seven", "eight"]
    n_ref = [len(demo_tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs]
    lengths = {
        "base": [{"tokens": 48, "stopped": False}] * 3,
        "tuned": [
            {"tokens": n_ref[0], "stopped": True},
            {"tokens": 2 * n_ref[1], "stopped": True},
            {"tokens": 48, "stopped": False},
        ],
    }
    loss_rows = {
        "base": [{"stop_prob": 1e-14}, {"stop_prob": 2e-14}, {"stop_prob": None}],
        "tuned": [{"stop_prob": 0.9}, {"stop_prob": 0.5}, {"stop_prob": 0.99}],
    }
    st = stop_metrics(demo_tokenizer, refs, lengths, loss_rows, resamples=200)
    assert st["stop_rate"] == {"base": 0.0, "tuned": pytest.approx(2 / 3)}
    assert st["length_ratio_median"]["tuned"] == pytest.approx(2.0)  # ratios 1, 2, 48/n
    assert st["stop_probability"]["tuned"] == pytest.approx(0.7) and st["n_probability"] == 2  # the unmeasured dropped
    low, high = st["ci95"]["stop_rate"]["ci95"]
    assert 0 <= low <= 2 / 3 <= high <= 1
    shown = stopping_rows({"stopping": {"english": st}})
    assert [r["指標"].split("（")[0] for r in shown] == ["停止率", "停止機率", "長度比"]
    assert shown[0]["微調後"] == "66.7%" and shown[1]["基礎模型"] == "1.5e-14"


@pytest.mark.slow
def test_run_training_records_the_check_and_trains_the_row_with_its_own_rate(tiny_model_dir, demo_tokenizer, tmp_path):
    """run_training on a base that cannot stop: stop_token.json, the row in its own optimizer group at
    lora.stop_token_learning_rate under the same schedule, the row moves, and the adapter loads with plain PEFT
    (same logits as the trained model). A resumed run keeps the decision; `never` trains LoRA only."""
    import json

    import torch
    from peft import PeftModel
    from train_helpers import small_splits, tiny_overrides
    from transformers import TrainerCallback

    from medgemma_lib.core.config import load_config
    from medgemma_lib.models.loading import load_model, use_trainable_4bit_layout
    from medgemma_lib.training.train import run_training

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([(len(g["params"]), g["lr"]) for g in optimizer.param_groups])

    splits = small_splits(tokenizer=demo_tokenizer)
    over = tiny_overrides(tiny_model_dir, tmp_path, "rows", max_steps=4, eval_steps=2, save_steps=2)
    cfg = load_config(None, [*over, "train.lr_scheduler_type=constant", "lora.stop_token_learning_rate=0.01"])
    result = run_training(cfg, datasets=splits, callbacks=[Watch()], verbose=False)
    run = tmp_path / "rows"
    check = json.loads((run / "stop_token.json").read_text())
    assert check["trained_token_ids"] == [106] and check["base_can_stop"] is False and check["examples"] == 4
    assert result.stop_token == check
    assert all(groups[-1] == (1, 0.01) for groups in seen[1:])  # after warm-up: the row at its own rate
    assert all(lr == pytest.approx(1e-3) for groups in seen[1:] for _, lr in groups[:-1])
    model = result.trainer.model
    delta = stopping.trainable_token_params(model)[0][1]
    original = model.get_input_embeddings().token_adapter.trainable_tokens_original["default"]
    assert (delta.detach()[0] - original[0].float()).abs().max() > 1e-3  # the row moved

    base = load_model(str(tiny_model_dir), "nf4", "cpu")  # the same NF4 weights the run trained on
    plain = PeftModel.from_pretrained(base, str(run / "adapter")).eval()  # plain PEFT loads the adapter
    ids = torch.tensor([[2, 105, 2364, 107, 3689, 106, 107]])
    model.eval()
    use_trainable_4bit_layout(plain), use_trainable_4bit_layout(model)  # one CPU layout on both sides
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # the row PEFT loaded is the trained one (the tied output layer reads it)
        torch.testing.assert_close(plain.get_output_embeddings().weight[106], delta.detach()[0], rtol=0, atol=1e-6)

    # resume: the checkpoint holds the row, so the decision is read back, not measured again
    (run / "stop_token.json").write_text(json.dumps({**check, "median": 0.5}), encoding="utf-8")
    resumed = run_training(load_config(None, [*over, "train.max_steps=6"]), datasets=splits, resume=True, verbose=False)
    assert resumed.stop_token["median"] == 0.5 and resumed.stop_token["trained_token_ids"] == [106]

    never = load_config(
        None, [*tiny_overrides(tiny_model_dir, tmp_path, "never", max_steps=2), "lora.train_stop_token=never"]
    )
    plain_run = run_training(never, datasets=splits, verbose=False)
    assert plain_run.stop_token["trained_token_ids"] == [] and not stopping.trainable_token_params(
        plain_run.trainer.model
    )


def test_liger_module_patches_are_undone_so_a_later_model_is_transformers_own(tiny_model_dir, monkeypatch):
    """Liger replaces transformers' Gemma 3 RoPE function and RMSNorm/MLP classes module-wide; a model built later
    in the process (quality's evaluation after training) was then built from Liger's classes (on an H100: 1 of 16
    greedy answers stopped instead of 5 of 16). apply_liger records what it replaced; restore puts it back."""
    import sys
    import types

    from transformers.models.gemma3 import modeling_gemma3

    from medgemma_lib.training import trainer

    originals = (modeling_gemma3.apply_rotary_pos_emb, modeling_gemma3.Gemma3RMSNorm, modeling_gemma3.Gemma3MLP)

    def fake_apply(model=None, **kernels):  # what liger_kernel 0.8.5's monkey_patch does at module level
        modeling_gemma3.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_gemma3.Gemma3RMSNorm = type("LigerRMSNormForGemma3", (), {})
        modeling_gemma3.Gemma3MLP = type("LigerGEGLUMLP", (), {})

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_gemma3_text = fake.apply_liger_kernel_to_gemma3 = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = _tiny(tiny_model_dir)
    try:
        trainer.apply_liger(model)
        assert modeling_gemma3.Gemma3RMSNorm.__name__ == "LigerRMSNormForGemma3"
        assert trainer.restore_liger_globals() == 3
        assert (
            modeling_gemma3.apply_rotary_pos_emb,
            modeling_gemma3.Gemma3RMSNorm,
            modeling_gemma3.Gemma3MLP,
        ) == originals
        assert trainer.restore_liger_globals() == 0  # nothing left to undo
    finally:
        modeling_gemma3.apply_rotary_pos_emb, modeling_gemma3.Gemma3RMSNorm, modeling_gemma3.Gemma3MLP = originals


def test_the_check_never_packs_nf4_weights_into_the_inference_layout(tiny_model_dir, demo_tokenizer):
    """The check runs before training: on an AVX512-BF16 CPU an eval-mode pass would repack the NF4 weights into
    bitsandbytes' inference-only layout (no backward). Forced flags put every CPU in that situation."""
    from medgemma_lib.models.loading import _linear4bit_layers, cpu_inference_packing_state, load_model

    model = load_model(str(tiny_model_dir), "nf4", "cpu")
    model.eval()
    for layer in _linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    stopping.check_stop_token(model, demo_tokenizer, RECORDS)
    state = cpu_inference_packing_state(model)
    assert state["layers"] > 0 and state["packed"] == 0, state
    assert model.training is False  # the caller's mode is given back
