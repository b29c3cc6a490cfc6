"""Unsloth as a peer: its FastModel timed on the same random architecture and packed batches as our rows.

``python -m medgemma_lib bench --unsloth TOKENIZER_XZ`` (GPU only, Unsloth installed in its own environment) lands
here. Unsloth patches transformers when it is imported, so it runs in its own process (the CLI imports it first)
and loads its model from a folder: :func:`run_unsloth` writes the random weights of
:mod:`medgemma_lib.checks.random_models` as an NF4 checkpoint, then times each of :data:`UNSLOTH_VARIANTS` with
the benchmark's batches, accounting and report (:mod:`medgemma_lib.checks.bench`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import lzma
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medgemma_lib.checks.bench import (
    Variant,
    batch_tensors,
    environment,
    load_token_lengths,
    make_batches,
    make_optimizer,
    render_markdown,
    row_line,
    write_results,
)
from medgemma_lib.checks.random_models import save_prequantised, text_config
from medgemma_lib.core.machine import package_versions
from medgemma_lib.core.profiles import BENCH_EXTRA_FROZEN_PARAMS


def _unsloth(name: str, description: str, **shape) -> Variant:
    return Variant(name, description, attn="unsloth", optim="adamw_fused", role="peer", **shape)


UNSLOTH_VARIANTS = {
    v.name: v
    for v in [
        _unsloth("unsloth-8192", "Unsloth, 1×8192 rows, its offloaded checkpointing", row_length=8192),
        # the shape of the 27B 24 GB preset, and the 27B 141 GB preset's former one (1×4096 without checkpointing)
        _unsloth("unsloth-4096", "Unsloth, 1×4096 rows, its offloaded checkpointing", row_length=4096),
        _unsloth("unsloth-4096-nockpt", "Unsloth, 1×4096 rows, no checkpointing", row_length=4096, grad_ckpt=False),
        _unsloth(
            "unsloth-4x4096-nockpt",
            "Unsloth, 4×4096 rows, no checkpointing",
            micro_batch=4,
            row_length=4096,
            grad_ckpt=False,
        ),
    ]
}


def run_unsloth(
    arch: str, names: list[str] | None, tokenizer_xz: str, out_dir: str | os.PathLike, seed: int = 0, log=print
) -> dict:
    """Time Unsloth's FastModel (NF4, LoRA, its kernels) on the same random architecture and packed batches.

    Unsloth loads from a folder, so the random weights of ``arch`` are written first as an NF4 checkpoint
    (:func:`save_prequantised`, the format of Unsloth's own ``*-bnb-4bit`` models: 15 GiB for the 27B
    instead of 54 GB of bf16), with the Gemma 3 tokenizer from ``tokenizer_xz``. The 4B row holds the same
    frozen bf16 stand-in for the vision tower as our rows (``BENCH_EXTRA_FROZEN_PARAMS``), so memory compares.
    """
    import unsloth  # noqa: F401  optional, GPU only; the CLI imports it before transformers, as it asks
    from unsloth import FastModel

    device = "cuda"
    full, prompt = load_token_lengths(None)
    folder = tmp_model = Path(tempfile.mkdtemp(prefix=f"random-{arch}-"))  # a scratch model for Unsloth, removed below
    started = time.perf_counter()
    config = text_config(arch)
    saved = save_prequantised(arch, folder, device, seed=seed)
    (tmp_model / "tokenizer.json").write_bytes(lzma.decompress(Path(tokenizer_xz).read_bytes()))
    (tmp_model / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "backend": "tokenizers",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "mask_token": "<mask>",
                "tokenizer_class": "GemmaTokenizer",
            }
        ),
        encoding="utf-8",
    )
    save_s = time.perf_counter() - started
    log(f"[{arch}] NF4 checkpoint for Unsloth: {saved['gib']} GiB in {saved['shards']} shards, {save_s:.1f} s")
    results: dict[str, Any] = {
        "command": "python -m medgemma_lib bench --unsloth",
        "environment": environment(),
        "archs": {},
    }
    results["environment"]["versions"].update(package_versions(("unsloth", "unsloth_zoo", "xformers", "trl")))
    rows = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names or list(UNSLOTH_VARIANTS):
        v = UNSLOTH_VARIANTS[name]
        t0 = time.perf_counter()
        model, _tok = FastModel.from_pretrained(
            str(folder),
            use_safetensors=True,
            max_seq_length=v.row_length,
            load_in_4bit=True,
            dtype=torch.bfloat16,
            full_finetuning=False,
        )
        load_s = time.perf_counter() - t0
        extra = BENCH_EXTRA_FROZEN_PARAMS.get(arch, 0)
        if extra:  # the vision tower our 4B rows hold in bf16 (Gemma3ForConditionalGeneration keeps it so)
            model.register_buffer(
                "_vision_tower_placeholder", torch.empty(extra, dtype=torch.bfloat16, device=device), persistent=False
            )
        model = FastModel.get_peft_model(
            model,
            r=v.lora_r,
            lora_alpha=2 * v.lora_r,
            lora_dropout=0.0,
            target_modules=list(v.lora_targets),
            bias="none",
            use_gradient_checkpointing="unsloth" if v.grad_ckpt else False,
            random_state=seed,
        )
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, v.optim, device)
        batches = make_batches(v, full, prompt, v.warmup + v.steps, seed=seed)
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times, useful, losses = [], [], []
        row: dict[str, Any] = {
            "name": v.name,
            "variant": dataclasses.asdict(v),
            "summary": v.short().replace("unsloth", "Unsloth kernels"),
            "trainable_params": sum(p.numel() for p in params),
            "load_seconds": round(load_s, 1),
            "save_random_weights_seconds": round(save_s, 1),
            "checkpoint": {"format": "bitsandbytes NF4, uint8 storage, double quant", **saved},
            "vision_tower_placeholder_params": extra,
        }
        try:
            for i, batch in enumerate(batches):
                inputs = batch_tensors(batch, config.vocab_size, device, seed=seed * 100_003 + i)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                outp = model(**inputs)
                outp.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t1
                if i >= v.warmup:
                    times.append(dt)
                    useful.append(batch.useful_tokens)
                losses.append(float(outp.loss.detach()))
                del outp, inputs
            row["oom"] = False
        except torch.OutOfMemoryError:
            row["oom"] = True
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if not row["oom"]:
            tok_s = sum(useful) / sum(times)
            row.update(
                {
                    "steps_measured": len(times),
                    "warmup_steps": v.warmup,
                    "useful_tokens_per_step": round(sum(useful) / len(times), 1),
                    "padding_share": 0.0,
                    "useful_tokens_per_s": round(tok_s, 1),
                    "step_s_median": round(statistics.median(times), 4),
                    "loss_first": round(losses[0], 4),
                    "loss_last": round(losses[-1], 4),
                    "loss_finite": all(math.isfinite(x) for x in losses),
                    "share_of_ceiling": 0.0,
                    "epoch_hours": round(sum(min(n, v.max_length) for n in full) / tok_s / 3600, 2),
                }
            )
        rows.append(row)
        log(row_line(arch, row))
        results["archs"][arch] = {"model": {"arch": arch, "save_seconds": round(save_s, 1)}, "variants": rows}
        write_results(results, out)
        del model, optimizer, params
        gc.collect()
        torch.cuda.empty_cache()
    shutil.rmtree(folder, ignore_errors=True)
    log(render_markdown(results))
    return results
