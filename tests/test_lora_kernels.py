"""lora_kernels.NF4LoRA against PEFT's own bitsandbytes LoRA layer: same outputs, same gradients for the input
and for every LoRA matrix (tiny random Gemma 3 in NF4, CPU, fp32), used only where it computes the same thing, and
a comparison that fails when the fused function is wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from train_helpers import assert_same_step, rel, step_grads

from medgemma_lib.checks import random_models
from medgemma_lib.models import lora_kernels


def _lora_model(dropout: float = 0.0, seed: int = 0):
    base, _ = random_models.build_model("tiny", "cpu", seed=seed, storage=torch.uint8)
    for p in base.parameters():
        p.requires_grad_(False)
    for m in base.modules():  # the state bitsandbytes gives the layers on an AVX512-BF16 CPU, on every machine
        if m.__class__.__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = True
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0, which would make every A gradient 0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _step(model, ids):
    return step_grads(model, ids, lambda n, p: p.requires_grad)


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(7))


def test_fused_layers_compute_what_peft_computes(ids, monkeypatch):
    peft_model = _lora_model()
    fused = copy.deepcopy(peft_model)
    n = lora_kernels.fuse_lora_layers(fused)
    assert n == 2 * 7  # tiny: 2 decoder layers × 7 linears
    assert lora_kernels.fuse_lora_layers(fused) == n  # routing twice changes nothing
    assert lora_kernels.unfuse_lora_layers(fused) == n and lora_kernels.unfuse_lora_layers(fused) == 0
    assert lora_kernels.fuse_lora_layers(fused) == n
    calls = []
    apply = lora_kernels.NF4LoRA.apply
    monkeypatch.setattr(lora_kernels.NF4LoRA, "apply", lambda *a: calls.append(1) or apply(*a))
    want = _step(peft_model, ids)
    assert not calls  # PEFT's model never goes through the fused function
    got = _step(fused, ids)
    assert len(calls) == n
    assert_same_step(want, got, 2 * n, tol_out=1e-5)


def test_the_comparison_fails_when_the_fused_function_is_wrong(ids, monkeypatch):
    """A fused function that scales the LoRA product twice: logits and LoRA gradients must differ clearly."""
    peft_model = _lora_model()
    fused = copy.deepcopy(peft_model)
    lora_kernels.fuse_lora_layers(fused)
    apply = lora_kernels.NF4LoRA.apply
    monkeypatch.setattr(lora_kernels.NF4LoRA, "apply", lambda x, w, q, a, b, s, d: apply(x, w, q, a, b, 2 * s, d))
    want_logits, _, want = _step(peft_model, ids)
    got_logits, _, got = _step(fused, ids)
    assert rel(got_logits, want_logits) > 1e-3
    assert max(rel(got[k], want[k]) for k in want if "lora_A" in k) > 1e-2


def test_layers_the_fused_function_would_get_wrong_keep_pefts_forward(ids, monkeypatch):
    """Dropout, a disabled or merged adapter, or extra arguments: PEFT's own forward, the same result as before."""
    calls = []
    apply = lora_kernels.NF4LoRA.apply
    monkeypatch.setattr(lora_kernels.NF4LoRA, "apply", lambda *a: calls.append(1) or apply(*a))
    dropped = _lora_model(dropout=0.1)
    lora_kernels.fuse_lora_layers(dropped)
    dropped.train()
    dropped(input_ids=ids)
    assert not calls
    plain = _lora_model()
    lora_kernels.fuse_lora_layers(plain)
    with plain.disable_adapter():
        off = plain(input_ids=ids).logits
    assert not calls
    base, _ = random_models.build_model("tiny", "cpu", seed=0, storage=torch.uint8)
    assert torch.equal(off, base(input_ids=ids).logits)


def test_an_evaluation_pass_never_repacks_the_weights_the_fused_function_reads(ids):
    """On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit layer into its inference-only layout at an eval-mode
    forward through its own Linear4bit (run_training evaluates before training). The fused function reads the
    weights itself, so an eval pass leaves them trainable, and training after it gives the same gradients."""
    model = _lora_model()
    fresh = copy.deepcopy(model)
    lora_kernels.fuse_lora_layers(model)
    lora_kernels.fuse_lora_layers(fresh)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    layers = [m for m in model.modules() if m.__class__.__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    _, want_dx, want = _step(fresh, ids)
    _, got_dx, got = _step(model, ids)
    assert rel(got_dx, want_dx) < 1e-6
    assert all(rel(got[k], want[k]) < 1e-6 for k in want)
