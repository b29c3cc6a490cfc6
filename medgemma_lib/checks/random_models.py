"""Random-weight models of the real architectures, quantised as loading quantises a checkpoint.

:func:`build_model` builds the architecture of a benchmark profile (``27b``: medgemma-27b-text-it, ``4b``: the
language model of medgemma-4b-it, ``tiny``: a small stand-in for CPU tests; the registry's
``BENCH_ARCHITECTURES``) with random weights and every decoder linear layer in NF4 exactly as
:func:`medgemma_lib.models.loading.quantization_config` would quantise it; :func:`save_prequantised` writes such a
model as a bitsandbytes NF4 checkpoint (the Hub's ``*-bnb-4bit`` format). The throughput benchmark
(:mod:`medgemma_lib.checks.bench`), the Unsloth peer (:mod:`medgemma_lib.checks.unsloth`) and the preset timings
(:mod:`medgemma_lib.checks.trainbench`) train these models, so no run needs the gated weights.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from medgemma_lib.core.atomic import write_json
from medgemma_lib.core.errors import ConfigError
from medgemma_lib.core.profiles import (
    BENCH_ALIASES,
    BENCH_ARCHITECTURES,
    BENCH_EXTRA_FROZEN_PARAMS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
)
from medgemma_lib.models.loading import compute_dtype, quantization_config


def text_config(arch: str) -> Gemma3TextConfig:
    """The text config of ``arch`` (a key of the registry's ``BENCH_ARCHITECTURES``): sdpa attention, no cache."""
    if arch not in BENCH_ARCHITECTURES:
        raise ConfigError(
            f"不認識的架構 {arch!r}。",
            hint=f"可用：{', '.join(BENCH_ARCHITECTURES)}（或設定檔名稱 {', '.join(BENCH_ALIASES)}）",
        )
    cfg = Gemma3TextConfig(
        **BENCH_ARCHITECTURES[arch].text_config_kwargs(),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(arch: str, device: str, quantize: bool = True, seed: int = 0, storage: torch.dtype | None = None):
    """A Gemma3ForCausalLM of ``arch`` with random weights, decoder linears in NF4 (double quant).

    Built on the meta device and materialised one decoder layer at a time, each quantised right
    away, so the 27B model never holds more than one layer in bf16. ``storage`` overrides the packed
    weights' dtype (loading's choice: bf16 on CUDA, uint8 on CPU). Returns (model, info).
    """

    started = time.perf_counter()
    torch.manual_seed(seed)
    dtype = compute_dtype(device)
    config = text_config(arch)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(config)
    qcfg = quantization_config("nf4", device) if quantize else None
    if qcfg is not None and storage is not None:
        qcfg.bnb_4bit_quant_storage = storage
    if qcfg is not None:
        import bitsandbytes as bnb

    def materialise(module: nn.Module) -> None:
        module.to_empty(device=device, recurse=True)
        for _name, p in module.named_parameters(recurse=True):
            with torch.no_grad():
                if p.dim() >= 2:
                    p.normal_(0.0, config.initializer_range)
                else:
                    p.normal_(0.0, 0.1)  # Gemma norms scale by (1 + w)

    model.model.embed_tokens.to_empty(device=device)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, config.initializer_range)
    model.model.embed_tokens.to(dtype)
    for layer in model.model.layers:
        materialise(layer)
        layer.to(dtype)
        if qcfg is None:
            continue
        for parent in [layer.self_attn, layer.mlp]:
            for cname, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=qcfg.bnb_4bit_compute_dtype,
                    compress_statistics=qcfg.bnb_4bit_use_double_quant,
                    quant_type=qcfg.bnb_4bit_quant_type,
                    quant_storage=qcfg.bnb_4bit_quant_storage,
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=qcfg.bnb_4bit_use_double_quant,
                    quant_type=qcfg.bnb_4bit_quant_type,
                    quant_storage=qcfg.bnb_4bit_quant_storage,
                    module=q,
                ).to(device)
                setattr(parent, cname, q)
                del child
    materialise(model.model.norm)
    model.model.norm.to(dtype)
    _rebuild_computed_buffers(model, config, device)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in the checkpoints
    extra = BENCH_EXTRA_FROZEN_PARAMS.get(arch, 0)
    if extra:
        # Frozen stand-in for the vision tower + projector that Gemma3ForConditionalGeneration keeps in bf16.
        model.register_buffer(
            "_vision_tower_placeholder", torch.empty(extra, dtype=dtype, device=device), persistent=False
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if qcfg is not None:
        model.is_loaded_in_4bit = True
    model.config.use_cache = False
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    leftovers = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"parameters left on meta: {leftovers[:3]}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    matmul_params = sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, nn.Linear) or m.__class__.__name__ == "Linear4bit"
    )
    info = {
        "arch": arch,
        "config": BENCH_ARCHITECTURES[arch].text_config_kwargs(),
        "build_seconds": round(time.perf_counter() - started, 2),
        "weights_gib": round(weight_bytes / 2**30, 2),
        "matmul_params": matmul_params,  # decoder linears + lm_head
        "extra_frozen_params": extra,
        "quantization": "nf4 double-quant (medgemma_lib.models.loading.quantization_config)"
        if qcfg is not None
        else "none",
    }
    return model, info


def save_prequantised(arch: str, folder: str | os.PathLike, device: str, seed: int = 0, shard_gib: float = 4.0) -> dict:
    """Random weights of ``arch`` written as a bitsandbytes NF4 checkpoint (the Hub's ``*-bnb-4bit`` format).

    The model is built as :func:`build_model` builds it (one decoder layer in bf16 at a time), its
    packed weights stored as uint8 (bitsandbytes' default, that of published 4-bit checkpoints), each
    saved with its quantisation state (``weight.absmax``, ``weight.quant_map``, …) and the config's
    ``quantization_config``; ``from_pretrained`` then loads it without quantising again. For the 27B
    this writes 15 GiB instead of 54 GB of bf16. The tied ``lm_head`` is not written (the config ties
    it). Returns {"seconds", "gib", "shards"}."""
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, _info = build_model(arch, device, seed=seed, storage=torch.uint8)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    limit = int(shard_gib * 2**30)
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        # clone: bitsandbytes' quantisation states share their code tables, which safetensors refuses to save twice
        shard = {k: state[k].detach().to("cpu").contiguous().clone() for k in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = model.config.to_dict()
    config.update(
        architectures=["Gemma3ForCausalLM"],
        dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),  # bf16 on CUDA, fp32 on CPU
        tie_word_embeddings=True,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(device),
            bnb_4bit_quant_storage=torch.uint8,
        ).to_dict(),
    )
    write_json(folder / "config.json", config)
    del model, state
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": round(time.perf_counter() - started, 1), "gib": round(total / 2**30, 2), "shards": len(groups)}


def _rebuild_computed_buffers(model, config, device: str) -> None:
    """Recreate the non-persistent buffers (rotary frequencies, embedding scale) that meta init left empty."""

    for name, module in list(model.named_modules()):
        if "Rotary" in type(module).__name__:
            parent_name, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, attr, type(module)(config=config).to(device)
            )
        elif hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
    meta = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if meta:
        raise RuntimeError(f"buffers left on meta: {meta[:3]}")
