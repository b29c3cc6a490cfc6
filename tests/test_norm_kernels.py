"""norm_kernels (train.fused_rms_norm) against transformers' own Gemma3RMSNorm: same outputs, same gradients for
the input and for the norm weights (tiny random Gemma 3, CPU, fp32), bf16 rounded as transformers rounds it,
Liger's norms left alone, and a comparison that fails when the routed formula is wrong."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from train_helpers import assert_same_step, rel, step_grads
from transformers import Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from medgemma_lib.checks import random_models
from medgemma_lib.models import norm_kernels

N_NORMS = 2 * 6 + 1  # tiny: 2 decoder layers × (4 around attention and MLP + q_norm + k_norm) + the final norm


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(random_models.text_config("tiny")).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Gemma3RMSNorm):  # zeros at init would hide a wrong "1 + w"
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
    return model


def _step(model, ids):
    return step_grads(model, ids, lambda n, p: "norm" in n)


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))


def test_routed_norms_compute_what_transformers_computes(ids, monkeypatch):
    plain = _model()
    fused = copy.deepcopy(plain)
    assert norm_kernels.fuse_rms_norms(fused) == N_NORMS
    assert norm_kernels.fuse_rms_norms(fused) == N_NORMS  # routing twice changes nothing
    assert norm_kernels.unfuse_rms_norms(fused) == N_NORMS and norm_kernels.unfuse_rms_norms(fused) == 0
    assert norm_kernels.fuse_rms_norms(fused) == N_NORMS
    calls = []
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(norm_kernels.F, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    want = _step(plain, ids)
    assert not calls  # transformers' own norms never call it
    got = _step(fused, ids)
    assert len(calls) == N_NORMS
    assert_same_step(want, got, N_NORMS, tol_out=1e-6)


def test_the_comparison_fails_when_the_routed_formula_is_wrong(ids, monkeypatch):
    """A norm that forgets Gemma's offset (w instead of 1 + w): logits and gradients must differ clearly."""
    plain = _model()
    fused = copy.deepcopy(plain)
    norm_kernels.fuse_rms_norms(fused)

    def without_offset(self, x):
        return norm_kernels.F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    monkeypatch.setattr(norm_kernels, "_fused_forward", without_offset)
    for m in fused.modules():
        if hasattr(m, "_hf_forward"):
            m.forward = types.MethodType(norm_kernels._fused_forward, m)
    want_logits, want_dx, _ = _step(plain, ids)
    got_logits, got_dx, _ = _step(fused, ids)
    assert rel(got_logits, want_logits) > 0.1
    assert rel(got_dx, want_dx) > 0.1


def test_bf16_is_rounded_once_as_transformers_rounds_it():
    """On the CPU (no fused mixed-dtype kernel) a bf16 input is computed in fp32 and cast back once, as
    transformers' forward does, for the hidden size and for the heads' size."""
    gen = torch.Generator().manual_seed(5)
    assert not norm_kernels.mixed_dtype_ok(torch.device("cpu"))
    for dim in (640, 256):
        norm = Gemma3RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim, generator=gen) * 0.3)
        x = (torch.randn(3, 11, dim, generator=gen) * 4).to(torch.bfloat16)
        want = norm(x)
        norm_kernels.fuse_rms_norms(norm)
        got = norm(x)
        assert got.dtype == torch.bfloat16
        # One rounding of the same fp32 value: equal, except where the two reductions' last fp32 bit (their
        # summation order differs between CPU kernels, AVX2 or AVX-512) tips a value across a bf16 rounding edge.
        g, w = got.float(), want.float()
        assert bool(((g - w).abs() <= w.abs() * 2**-8 + 1e-30).all()), dim  # at most one bf16 step
        assert float((g == w).float().mean()) > 0.99, dim


def test_norms_another_library_patched_keep_their_forward():
    """Liger replaces a norm's forward on the instance; those norms are not routed (with train.fused_rms_norm
    apply_liger leaves the norms alone instead)."""
    model = _model()
    patched = [m for m in model.modules() if isinstance(m, Gemma3RMSNorm)][:3]
    for m in patched:
        m.forward = types.MethodType(lambda self, x: x, m)
    assert norm_kernels.fuse_rms_norms(model) == N_NORMS - 3
    assert all(not hasattr(m, "_hf_forward") for m in patched)


@pytest.mark.parametrize("fused", [True, False])
def test_run_training_routes_the_norms_and_keeps_liger_off_them_only_when_asked(fused, monkeypatch):
    """prepare_model_for_training as on CUDA: with train.fused_rms_norm Liger is applied without its RMSNorm and
    every norm is routed; without it Liger keeps its RMSNorm and no norm is routed."""
    from medgemma_lib.core.config import load_config
    from medgemma_lib.core.profiles import PROFILES
    from medgemma_lib.training import trainer

    liger_calls = []
    monkeypatch.setattr(trainer, "apply_liger", lambda model, rms_norm=True: liger_calls.append(rms_norm))
    monkeypatch.setattr(trainer, "use_varlen_attention", lambda model, verbose=True: "sdpa")
    cfg = load_config(
        "configs/medgemma-4b-8gb.yaml", [f"train.fused_rms_norm={str(fused).lower()}", "train.fused_lora=false"]
    )
    model, _ = random_models.build_model("tiny", "cpu", seed=0, storage=torch.uint8)
    model = trainer.prepare_model_for_training(cfg, model, PROFILES["demo"], "cuda", verbose=False)
    assert liger_calls == [not fused]
    routed = [m for m in model.modules() if hasattr(m, "_hf_forward")]
    assert len(routed) == (N_NORMS if fused else 0)
