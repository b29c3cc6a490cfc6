"""One autograd function per LoRA layer on an NF4 base (``train.fused_lora``).

PEFT's bitsandbytes ``Linear4bit`` computes ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``:
besides the three matrix products, a clone, a multiplication and an addition over the whole output, each
one more kernel and one more pass over memory (twice per step with gradient checkpointing), and a few
Python calls per layer. Here the LoRA product is added into the base output by the matrix product itself
(``addmm_`` with ``alpha = scaling``), and backward builds the input gradient the same way, dequantising the
NF4 weight once per pass as bitsandbytes does.

It is used only where it computes what PEFT computes: one active adapter, dropout 0, plain LoRA (no DoRA,
no LoRA bias), a base layer without bias, adapters not merged, the weight in bitsandbytes' trainable layout.
Any other call goes to PEFT's own forward. Checked against PEFT's forward and backward in
``tests/test_lora_kernels.py`` and against the plain per-example gradient reference in
``tests/test_gradients.py``.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class NF4LoRA(torch.autograd.Function):
    """``x W^T + scaling · (x A^T) B^T`` with W in NF4; gradients for x, A and B (W is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, quant_state, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        import bitsandbytes.functional as bnb_functional  # noqa: PLC0415 - optional at import time (GPU images)

        shape = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):  # explicit dtypes, as bitsandbytes uses
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            a = lora_a.to(dtype)
            b = lora_b.to(dtype)
            w = bnb_functional.dequantize_4bit(weight, quant_state).to(dtype)
            xa = x2 @ a.t()
            out = x2 @ w.t()
            out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.weight, ctx.quant_state, ctx.scaling = weight, quant_state, scaling
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        import bitsandbytes.functional as bnb_functional  # noqa: PLC0415

        x2, xa, a, b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        dy_b = dy @ b  # (tokens, r)
        dx = None
        if ctx.needs_input_grad[0]:
            w = bnb_functional.dequantize_4bit(ctx.weight, ctx.quant_state).to(x2.dtype)
            dx = dy @ w
            dx.addmm_(dy_b, a, alpha=s)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        da = (dy_b.t() @ x2).mul_(s).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[3] else None
        db = (dy.t() @ xa).mul_(s).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None, None


def _plain_lora_adapter(layer) -> str | None:
    """The one active adapter of ``layer`` if the fused function computes exactly PEFT's result, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "use_dora", {}).get(name) or getattr(layer, "lora_bias", {}).get(name):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if base.bias is not None or state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    name = None if args or kwargs else _plain_lora_adapter(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    dtype = base.compute_dtype or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return NF4LoRA.apply(
        x,
        base.weight,
        base.weight.quant_state,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        dtype,
    )


def route_forwards(model, wanted, saved: str, forward) -> int:
    """Give every module of ``model`` for which ``wanted(module)`` holds the forward ``forward`` (once), keeping its
    own in the attribute ``saved``; the number routed (already routed ones included)."""
    n = 0
    for module in model.modules():
        if hasattr(module, saved) or wanted(module):
            if not hasattr(module, saved):
                setattr(module, saved, module.forward)
                module.forward = types.MethodType(forward, module)
            n += 1
    return n


def restore_forwards(model, saved: str) -> int:
    """Undo :func:`route_forwards` for the attribute ``saved``; the number restored."""
    n = 0
    for module in model.modules():
        if hasattr(module, saved):
            module.forward = getattr(module, saved)
            delattr(module, saved)
            n += 1
    return n


def fuse_lora_layers(model) -> int:
    """Route every LoRA layer on an NF4 base of ``model`` through :class:`NF4LoRA` (once); the number routed."""
    from peft.tuners.lora.bnb import Linear4bit  # noqa: PLC0415 - PEFT's 4-bit LoRA layer (needs bitsandbytes)

    return route_forwards(model, lambda m: isinstance(m, Linear4bit), "_peft_forward", _fused_forward)


def unfuse_lora_layers(model) -> int:
    """Give every routed layer of ``model`` its PEFT forward back; the number restored."""
    return restore_forwards(model, "_peft_forward")
