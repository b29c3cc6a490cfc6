"""Gemma 3's RMSNorm through PyTorch's own fused kernel (``train.fused_rms_norm``).

transformers' ``Gemma3RMSNorm`` computes ``(x / rms(x)) * (1 + w)`` in fp32 and rounds once to the input's
dtype. Liger's Triton kernel computes the same in one launch on the GPU, but each call costs 0.2–0.5 ms of
Python on the host (Triton's launcher binds and specialises its dozen arguments every time): on the H200 the 4B's
409 forward and 205 backward norm calls of one checkpointed step took 170 ms of CPU time, in a step that is bound
by the host (docs/benchmarks.md, 2026-12-04). ``torch.nn.functional.rms_norm`` is one ATen call with a fused CUDA
kernel for the forward and the backward.

The formula stays Gemma's: statistics in fp32, the weight ``1 + w`` in fp32, one rounding at the end. On CUDA the
input goes in as it is (bf16), with the fp32 weight, when this torch's fused kernel takes that mix (checked once per
device, :func:`mixed_dtype_ok`); otherwise, and on the CPU, the input is computed in fp32 and the output cast
back, exactly as transformers does. Checked against transformers' own forward and backward in
``tests/test_norm_kernels.py`` and against the plain per-example gradient reference in ``tests/test_gradients.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medgemma_lib.models.lora_kernels import restore_forwards, route_forwards

_MIXED: dict[str, bool] = {}


def mixed_dtype_ok(device: torch.device) -> bool:
    """Whether ``F.rms_norm`` of a bf16 input with an fp32 weight runs here, forward and backward, giving the
    fp32 formula's result rounded once to bf16 (CUDA only; decided once per device type and index)."""
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _MIXED:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(8, 256, generator=gen) * 3).to(device=device, dtype=torch.bfloat16)
            w = (torch.randn(256, generator=gen) * 0.1).to(device)
            xr = x.detach().requires_grad_(True)
            y = F.rms_norm(xr, (256,), 1.0 + w, 1e-6)
            y.float().sum().backward()
            xf = x.float()
            want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w)).to(torch.bfloat16)
            ok = (
                y.dtype == torch.bfloat16
                and xr.grad is not None
                and bool(((y.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all())
            )
        except (RuntimeError, TypeError):
            ok = False
        _MIXED[key] = ok
    return _MIXED[key]


def _fused_forward(self, x):
    weight = 1.0 + self.weight.float()
    shape = (x.shape[-1],)
    if x.dtype != torch.float32 and mixed_dtype_ok(x.device):
        return F.rms_norm(x, shape, weight, self.eps).to(x.dtype)
    return F.rms_norm(x.float(), shape, weight, self.eps).type_as(x)


def _is_gemma3_rms_norm(module) -> bool:
    # Only the class whose formula this module repeats (1 + w, fp32, eps as given); Liger's patched copies and
    # other models' norms keep their own forward.
    cls = type(module)
    return cls.__name__ == "Gemma3RMSNorm" and cls.__module__.startswith("transformers.models.gemma3")


def fuse_rms_norms(model) -> int:
    """Route every Gemma 3 RMSNorm of ``model`` through ``F.rms_norm`` (once); the number routed.

    A norm whose forward someone else replaced (Liger's kernel, when ``train.fused_rms_norm`` is off) keeps it."""

    def wanted(module) -> bool:
        own = getattr(module.forward, "__func__", None) is type(module).forward
        return _is_gemma3_rms_norm(module) and own

    return route_forwards(model, wanted, "_hf_forward", _fused_forward)


def unfuse_rms_norms(model) -> int:
    """Give every routed norm of ``model`` transformers' forward back; the number restored."""
    return restore_forwards(model, "_hf_forward")
