"""Attention within each packed example (``medgemma_varlen``), shared by training and the benchmark.

:func:`register_varlen_attention` registers it with transformers; on CUDA it is flash attention over
each example through ``torch.nn.attention.varlen``, elsewhere an exact block-diagonal masked sdpa.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_ATTN = "medgemma_varlen"


@torch.compiler.disable  # per-example lengths are data: the compiled layer calls it as a function (no graph)
def varlen_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, sliding_window=None, **kwargs
):
    """Attention within each packed example, given ``cu_seq_lens_q`` (cumulative example lengths).

    On CUDA with ``torch.nn.attention.varlen`` it is flash attention over the examples (cost
    grows with each example's length, not the row's). Elsewhere, or where that API cannot do the
    sliding window or grouped KV heads, an exact block-diagonal masked sdpa. Without
    ``cu_seq_lens_q`` the examples are found where ``position_ids`` restart at 0 (TRL's padding-free
    collator); with a padding mask, or a KV cache, it is plain sdpa.
    """

    cu = kwargs.get("cu_seq_lens_q")
    b, h, s, d = query.shape
    hkv = key.shape[1]
    position_ids = kwargs.get("position_ids")
    if cu is None and attention_mask is None and position_ids is not None and key.shape[2] == s:
        # TRL's padding-free collator sends only position ids: each example starts where they restart.
        flat = position_ids.expand(b, s).reshape(-1)
        starts = torch.nonzero(flat == 0).view(-1)
        if starts.numel() and int(starts[0]) == 0:
            cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
            kwargs["max_length_q"] = int((cu[1:] - cu[:-1]).max())
    if cu is None or key.shape[2] != s:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_len = int(kwargs.get("max_length_q") or s)
    fn, params = _varlen_fn()
    if query.is_cuda and fn is not None:
        q = query.transpose(1, 2).reshape(b * s, h, d)
        k = key.transpose(1, 2).reshape(b * s, hkv, d)
        v = value.transpose(1, 2).reshape(b * s, hkv, d)
        kw: dict[str, Any] = {}
        if "scale" in params:
            kw["scale"] = scaling
        window_ok = "window_size" in params
        if window_ok:
            kw["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
        elif "is_causal" in params:
            kw["is_causal"] = True
        needs_window = bool(sliding_window) and max_len > sliding_window
        if hkv != h:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
        if window_ok or not needs_window:
            out = fn(q, k, v, cu, cu, max_len, max_len, **kw)
            if isinstance(out, tuple):
                out = out[0]
            return out.view(b, s, h, d), None
    # Exact fallback: a block-diagonal (and sliding-window) causal mask over the flattened rows.
    t = torch.arange(b * s, device=query.device)
    seg = torch.searchsorted(cu[1:].to(torch.long), t, right=True).view(b, s)
    pos = (t - cu.to(torch.long)[seg.view(-1)]).view(b, s)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
    if sliding_window:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    if hkv != h:
        key, value = key.repeat_interleave(h // hkv, dim=1), value.repeat_interleave(h // hkv, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_VARLEN_CACHE: dict[str, Any] = {}


def _varlen_fn():
    if "fn" not in _VARLEN_CACHE:
        try:
            from torch.nn.attention.varlen import varlen_attn

            _VARLEN_CACHE["fn"] = varlen_attn
            _VARLEN_CACHE["params"] = set(inspect.signature(varlen_attn).parameters)
        except (ImportError, AttributeError):
            _VARLEN_CACHE["fn"], _VARLEN_CACHE["params"] = None, set()
    return _VARLEN_CACHE["fn"], _VARLEN_CACHE["params"]


def varlen_support() -> dict:
    """What the installed torch offers for packed attention (recorded in the results)."""
    fn, params = _varlen_fn()
    return {
        "torch.nn.attention.varlen": fn is not None,
        "window_size": "window_size" in params,
        "enable_gqa": "enable_gqa" in params,
    }


def register_varlen_attention() -> str:
    """Register ``medgemma_varlen`` with transformers (attention and a no-op mask); returns the name."""

    def mask(*args, **kwargs):
        # Packed rows carry no padding mask: no mask at all (attention follows the examples). Padded
        # batches (evaluation) keep sdpa's mask, and the attention then falls back to sdpa.
        return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTN, mask)
    return VARLEN_ATTN
