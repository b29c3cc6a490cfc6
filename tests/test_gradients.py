"""Training computes the right gradients, on every CPU.

The product's training step (real Gemma 3 270M weights in NF4, one TRL-packed batch of real MedQuAD
rows, completion-only labels, the CPU label-only loss) is compared tensor by tensor with a plain
reference: each example alone, unpacked, full logits, standard cross-entropy, dequantised weights,
LoRA written out by hand (``medgemma_lib.checks.gradcheck``).

bitsandbytes 0.50 packs NF4 weights into an inference-only layout (no backward) on CPUs with
AVX512-BF16 after an eval-mode pass. The same code path is taken on any CPU when a layer's
``support_avx512bf16_for_cpu`` flag is on (on AVX2-only CPUs bnb's default kernel then reads the
packed weights wrongly), so the tests below switch that flag on to put every machine in the
AVX512-BF16 situation: the check must catch the fault when our protection is removed, and the
protection must hold on both kinds of CPU.
"""

from __future__ import annotations

import pytest
from cli_helpers import run_cli

from medgemma_lib.checks import gradcheck
from medgemma_lib.models.loading import cpu_inference_packing_state

pytestmark = pytest.mark.slow


def _force_cpu_packing_flags(model) -> None:
    """Put the model in the state bitsandbytes gives it on an AVX512-BF16 CPU."""
    from medgemma_lib.models.loading import _linear4bit_layers

    layers = _linear4bit_layers(model)
    assert layers, "the demo model must load with bitsandbytes 4-bit layers"
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True


@pytest.fixture(scope="module")
def trainer(demo_model_dir, tmp_path_factory):
    return gradcheck.build_trainer(gradcheck.check_config(), tmp_path_factory.mktemp("gradcheck"))


def _assert_matches_reference(result) -> None:
    assert result.n_examples >= 3, "the batch must pack several examples, or packing is not tested"
    assert result.n_label_tokens > 100
    # every decoder layer of the 270M model, first and last included, and (-1) the stop token's embedding row, which
    # the demo trains because its pretrained base never produces <end_of_turn> (medgemma_lib.training.stopping)
    assert set(result.per_layer) == set(range(18)) | {-1}, sorted(result.per_layer)
    assert abs(result.loss_product - result.loss_reference) < 1e-4 * result.loss_reference
    for layer, diff in result.per_layer.items():
        assert diff < gradcheck.TOLERANCE["float32"], (
            f"layer {layer}: LoRA gradients differ by {diff:.2e} from the reference"
        )
    assert result.ok


def test_training_step_gradients_equal_the_plain_reference(trainer):
    result = gradcheck.run_check(trainer=trainer)
    _assert_matches_reference(result)


def test_gradients_stay_right_after_an_evaluation_pass(trainer):
    """run_training evaluates before training; the next steps must still compute the same gradients."""
    _force_cpu_packing_flags(trainer.model)  # as on an AVX512-BF16 CPU, whatever this machine has
    result = gradcheck.run_check(trainer=trainer, evaluate_first=True)
    assert result.packing_state["packed"] == 0
    _assert_matches_reference(result)


def test_compiled_layers_are_a_cuda_lever_and_leave_cpu_training_as_it_was(demo_model_dir, tmp_path, capsys):
    """train.compile_layers on the CPU: no layer is compiled (inductor's AVX2 code gave NaN losses) and the
    gradients still equal the plain reference; on CUDA the same config compiles every decoder layer."""
    from medgemma_lib.training import trainer as trainer_parts

    cfg = gradcheck.check_config(["train.compile_layers=true"])
    kept = gradcheck.build_trainer(cfg, tmp_path)
    layers = [m for m in kept.model.modules() if type(m).__name__ == "Gemma3DecoderLayer"]
    assert len(layers) == 18 and all(getattr(m, "_compiled_call_impl", None) is None for m in layers)
    _assert_matches_reference(gradcheck.run_check(trainer=kept))
    # What CUDA would do with the same model: every decoder layer compiled (lazily: nothing runs here).
    try:
        assert trainer_parts.compile_decoder_layers(kept.model) == 18
        assert all(m._compiled_call_impl is not None for m in layers)
    finally:
        for m in layers:
            m._compiled_call_impl = None


def test_fused_lora_layers_and_norms_give_the_reference_gradients(demo_model_dir, tmp_path, monkeypatch):
    """train.fused_lora and train.fused_rms_norm: every NF4 LoRA layer of the real model goes through
    lora_kernels.NF4LoRA, every RMSNorm through F.rms_norm (both counted), and the training step's gradients still
    equal the plain per-example reference (transformers' own norms, LoRA by hand), on this machine's CPU kernels.
    (Each alone against PEFT / transformers: tests/test_lora_kernels.py, tests/test_norm_kernels.py.)"""
    from medgemma_lib.models import lora_kernels, norm_kernels

    calls, norm_calls = [], []
    apply = lora_kernels.NF4LoRA.apply
    monkeypatch.setattr(lora_kernels.NF4LoRA, "apply", lambda *a: calls.append(1) or apply(*a))
    rms_norm = norm_kernels.F.rms_norm
    monkeypatch.setattr(norm_kernels.F, "rms_norm", lambda *a, **k: norm_calls.append(1) or rms_norm(*a, **k))
    cfg = gradcheck.check_config(["train.fused_lora=true", "train.fused_rms_norm=true"])
    fused = gradcheck.build_trainer(cfg, tmp_path)
    routed = [m for m in fused.model.modules() if hasattr(m, "_peft_forward")]
    assert len(routed) == 18 * 7  # q, k, v, o, gate, up, down of every layer
    norms = [m for m in fused.model.modules() if hasattr(m, "_hf_forward")]
    assert len(norms) == 18 * 6 + 1  # 4 around attention and MLP, q_norm, k_norm per layer; the final norm
    _assert_matches_reference(gradcheck.run_check(trainer=fused))
    assert len(calls) >= 18 * 7  # the fused function ran for every layer (forward of the product's step)
    assert len(norm_calls) >= 18 * 6 + 1  # and torch's norm for every norm
    # As on an AVX512-BF16 CPU, whatever this machine has: an evaluation pass first (as run_training does).
    _force_cpu_packing_flags(fused.model)
    result = gradcheck.run_check(trainer=fused, evaluate_first=True)
    assert result.packing_state["packed"] == 0
    _assert_matches_reference(result)


def test_check_detects_training_through_the_inference_layout(demo_model_dir, tmp_path, monkeypatch):
    """Without the protection (today's bug), the evaluation pass packs the weights and the check must fail."""
    import medgemma_lib.models.loading as models

    monkeypatch.setattr(models, "use_trainable_4bit_layout", lambda model: 0)
    broken = gradcheck.build_trainer(gradcheck.check_config(), tmp_path)
    _force_cpu_packing_flags(broken.model)
    result = gradcheck.run_check(trainer=broken, evaluate_first=True)
    assert result.packing_state["packed"] == result.packing_state["layers"] > 0
    assert not result.ok
    assert result.per_layer[0] > 0.1, "layer 0's gradients are the most wrong through gemv_4bit"


def test_check_detects_attention_across_packed_examples(trainer):
    """A second fault class the reference must see: a packed row read as one sequence (no position ids)."""
    inputs = gradcheck.first_packed_batch(trainer)
    examples = gradcheck.reference_examples(trainer, inputs)
    _, ref = gradcheck.reference_gradients(trainer.model, examples, "cpu")
    leaky = {k: v for k, v in inputs.items() if k != "position_ids"}
    leaky["position_ids"] = __import__("torch").arange(inputs["input_ids"].shape[1])[None]
    _, wrong = gradcheck.product_gradients(trainer, leaky)
    worst, per_layer, _ = gradcheck.compare(wrong, ref)
    assert worst > 100 * gradcheck.TOLERANCE["float32"]


def test_reference_examples_are_the_records_own_tokenisation(trainer, demo_tokenizer):
    """The packed row holds whole examples whose labels are exactly the completion (answer + <end_of_turn>)."""
    from medgemma_lib.models.loading import END_OF_TURN_ID

    inputs = gradcheck.first_packed_batch(trainer)
    examples = gradcheck.reference_examples(trainer, inputs)
    assert sum(len(ids) for ids, _ in examples) == inputs["input_ids"].shape[1]
    packed_labels = inputs["labels"][0].tolist()
    assert packed_labels == [t for _, labels in examples for t in labels]
    for _ids, labels in examples:
        trained = [t for t in labels if t != -100]
        assert END_OF_TURN_ID in trained
        text = demo_tokenizer.decode(trained)
        assert "<start_of_turn>" not in text  # no prompt token is trained
        assert text.rstrip().endswith("<end_of_turn>")


def test_run_training_keeps_every_layer_trainable_at_every_step(tiny_model_dir, demo_tokenizer, tmp_path):
    """The mechanism, on any CPU: a model handed to run_training with repacking switched on (as bnb does on
    AVX512-BF16) trains with the flag off and no packed layer, before training, at every step and after
    every evaluation pass."""
    from train_helpers import small_splits, tiny_overrides
    from transformers import TrainerCallback

    from medgemma_lib.core.config import load_config
    from medgemma_lib.models.loading import load_model
    from medgemma_lib.training.train import run_training

    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(("step", cpu_inference_packing_state(model)))

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            seen.append(("eval", cpu_inference_packing_state(model)))

    model = load_model(str(tiny_model_dir), "nf4", "cpu")
    assert cpu_inference_packing_state(model)["may_pack"] == 0, "load_model switches repacking off"
    _force_cpu_packing_flags(model)
    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, "flags", max_steps=4, eval_steps=2, save_steps=2))
    run_training(cfg, datasets=small_splits(tokenizer=demo_tokenizer), model=model, callbacks=[Watch()], verbose=False)
    assert [k for k, _ in seen].count("step") == 4 and "eval" in [k for k, _ in seen]
    for kind, state in seen:
        assert state["layers"] > 0 and state["may_pack"] == 0 and state["packed"] == 0, (kind, state)


def test_a_packed_layer_is_restored_to_the_trainable_layout(demo_model_dir):
    """A model that already went through an inference pass on an AVX512-BF16 CPU (packed) is unpacked."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    from medgemma_lib.models.loading import _linear4bit_layers, load_model, use_trainable_4bit_layout

    model = load_model("demo", "nf4", "cpu")
    layers = _linear4bit_layers(model)[:3]
    before = [dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone() for layer in layers]
    for layer in layers:  # bitsandbytes' own repacking, as its forward does on those CPUs
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
    assert cpu_inference_packing_state(model)["packed"] == 3
    assert use_trainable_4bit_layout(model) == 3
    assert cpu_inference_packing_state(model) == {"layers": len(_linear4bit_layers(model)), "may_pack": 0, "packed": 0}
    for layer, w in zip(layers, before):
        after = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert after.shape == w.shape
        # the round trip keeps the 4-bit codes and rounds the block scales to bf16 (8 significant bits)
        assert ((after - w).norm() / w.norm()).item() < 1e-2
    assert use_trainable_4bit_layout(model) == 0


def test_gradcheck_cli_prints_a_table_and_writes_json(tmp_path):
    """``python -m medgemma_lib gradcheck`` is the command behind docs/correctness.md."""
    import json

    out = tmp_path / "gc.json"
    proc = run_cli("gradcheck", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after an evaluation pass" in proc.stdout and "WRONG" not in proc.stdout
    assert "gemv_4bit" not in proc.stderr  # torch's "no autograd kernel" warning
    info = json.loads(out.read_text())
    assert [r["ok"] for r in info["results"]] == [True, True]
    assert info["results"][1]["after_eval_pass"] and info["results"][1]["packing_state"]["packed"] == 0
