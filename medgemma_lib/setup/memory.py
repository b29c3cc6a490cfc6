"""GPU memory: footprint of a loaded model, and a training-memory estimator checked against measurement.

Estimator (:func:`estimate_training_memory`)
--------------------------------------------
Peak *allocated* memory of one QLoRA training step (what ``torch.cuda.max_memory_allocated``
reports), counted tensor by tensor from the architecture. Notation: H hidden size, I MLP width,
q = heads·head_dim, kv = kv_heads·head_dim, L layers, N = rows × row length tokens, s row length.
Byte counts are for bf16 compute (2 bytes an element).

* **weights**: decoder linears in NF4 with double quantisation (0.5 byte per weight + an 8-bit
  absmax per 64 weights + an fp32 absmax per 256 blocks = 0.5159 byte), embeddings (tied with the
  output layer), norms and the vision tower in bf16: 27B 14.93 GiB (15.05 measured), 4B language
  model 2.79 GiB (2.80 measured), +0.78 GiB vision tower for ``medgemma-4b-it``.
* **LoRA and optimizer**: r·(in+out) fp32 parameters per adapted linear (4 bytes) plus the
  optimizer's state: AdamW (plain or fused) two fp32 moments, 8 bytes; bitsandbytes 8-bit AdamW
  2 bytes. The peak comes before the LoRA gradients exist, so they are not counted.
* **activations of one decoder layer**, per token (:func:`layer_saved_bytes`):

  - norms: Liger's RMSNorm keeps its bf16 input: 2H for each of the 4 layer norms, 2(q+kv) for the
    q/k norms. transformers' Gemma3RMSNorm keeps the fp32 upcast instead: 4H each, 4(q+kv).
  - MLP: Liger's fused GEGLU keeps gate and up (4I); the unfused one also GELU(gate) (6I).
  - attention: q and k after RoPE, v and the output, 4q + 4kv bytes (flash / varlen, or sdpa
    without a mask). sdpa on packed rows gets a block-diagonal mask: transformers then repeats k and v
    to all query heads (+4(q−kv)) and sdpa turns the bool mask into a bf16 one every call, kept for
    backward: ``SDPA_MASK_BYTES``·s² per row and layer. varlen attention has neither.
  - LoRA inputs: without dropout lora_A keeps its input, which is already alive except for the
    q/k/v input (2H), the gate/up input (2H) and, with down_proj adapted, the GEGLU product (2I).
    With dropout every adapted linear gets its own dropped copy (bf16) and mask (bool):
    ``DROPOUT_BYTES_PER_ELEMENT`` = 3 bytes per input element, i.e. 3(5H + q + I) for all-linear,
    which replaces the 4H + 2I above. This is what made the dropout-0.05 rows without
    checkpointing need 62 instead of 45 bytes·H per token and layer (27B and 4B alike).
  - ``LAYER_EXTRA_BYTES_PER_H``·H: small tensors not counted above (fitted, ~1 bf16 H-vector).

  With gradient checkpointing each layer keeps only its bf16 input (2H per token and layer); at the
  peak one layer has been recomputed (its activations as above) and runs backward. Without
  checkpointing every layer keeps its activations. Either way backward adds its gradients: Liger's
  GEGLU writes its gradients into the saved gate/up buffers, so only the gradient of the down
  projection's input is new (2I); the unfused MLP allocates four I-wide gradients (8I); plus
  ``BACKWARD_EXTRA_BYTES_PER_H``·H (fitted).
* **logits and loss**: without Liger, transformers materialises the 262,208-word logits and the
  loss: ``LOGITS_BYTES`` per token and vocabulary entry (bf16 logits 2, their fp32 upcast 4, fp32
  log-probabilities 4, fp32 gradient 4 = 14). Liger's fused linear cross-entropy computes them in
  chunks and never holds them (≈0). The peak is the larger of "all activations + logits" (the loss)
  and "all activations + one layer's backward".

Constants (everything not listed is counted from the architecture; with the two fitted per-H
constants set to 0 every row still agrees within −4.2 %..+0.6 %):

==================================  =====  ==================================================
constant                            value  what it stands for / which rows fix it
==================================  =====  ==================================================
``LOGITS_BYTES``                    14.1   bytes per token × vocabulary entry without Liger;
                                           physical count 14; non-Liger rows of both files
``DROPOUT_BYTES_PER_ELEMENT``       3      physical (bf16 copy + bool mask); confirmed by the
                                           bench's packed-liger vs -nodrop rows and the
                                           reference file's no-checkpointing rows
``SDPA_MASK_BYTES``                 2      physical (bf16 additive mask per layer); reference
                                           file's packed rows without checkpointing
``EAGER_SCORE_BYTES``               10     per head·s² per layer for eager attention; NOT
                                           calibrated (the one eager row is logits-bound)
``OPTIMIZER_STATE_BYTES``           8 / 2  AdamW fp32 moments / 8-bit AdamW; the bench's 8-bit
                                           row is 0.63 GiB = 6 bytes × 113.5 M below fused AdamW
``LAYER_EXTRA_BYTES_PER_H``         2.0    fitted: residual per layer and token (least squares
                                           over the 46 rows; rows without checkpointing fix it)
``BACKWARD_EXTRA_BYTES_PER_H``      4.0    fitted: residual of one layer's backward
                                           (checkpointed Liger rows fix it)
``FIXED_OVERHEAD_GIB``              0.1    cuBLAS workspace, RoPE tables
``RESERVED_FACTOR`` / ``_LOGITS``   1.04 / 0.37   default allocator: reserved ≈ 1.04·allocated
                                           + 0.37·logits (reference file)
``EXPANDABLE_RESERVED_*``           1.01 / 0.2 GiB  ``expandable_segments:True``: reserved ≈
                                           1.01·allocated + 0.2 GiB (bench file)
==================================  =====  ==================================================

Inputs that change the count: ``lora_dropout`` (0 or not), ``attn_implementation`` (sdpa, varlen /
flash_attention_2, eager), ``optim`` (adamw, adamw_fused, adamw_8bit and Hugging Face's names),
``liger`` and ``liger_layers`` (Liger's layer kernels patched in, or only its loss), gradient
checkpointing, packing, rows × row length, ``expandable_segments`` (reserved only).

The reference file ``../shared/benchmarks`` rows marked Liger are modelled with Liger's loss only
(``liger_layers=False``): their memory matches transformers' own RMSNorm and MLP to within 1 %
(27B and 4B, with and without checkpointing), and is 1 GiB above the project's bench for the same
settings, where ``apply_liger_kernel_to_gemma3_text(model=...)`` patches the built model. With the
layer kernels assumed, five of their rows would be 16–20 % low. This is an inference from memory,
recorded in ``medgemma_lib/resources/h200_reference.json``.

Architectures: the model registry, :mod:`medgemma_lib.core.profiles`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from medgemma_lib.core import display
from medgemma_lib.core.errors import ConfigError
from medgemma_lib.core.profiles import BENCH_ARCHITECTURES, LORA_LINEAR_LAYERS, PROFILES, Architecture

GIB = 1024**3

# --- constants fitted to measurements (see module docstring) ---------------------------------
LOGITS_BYTES = 14.1
LAYER_EXTRA_BYTES_PER_H = 2.0
BACKWARD_EXTRA_BYTES_PER_H = 4.0
FIXED_OVERHEAD_GIB = 0.1
RESERVED_FACTOR = 1.04
RESERVED_LOGITS_FACTOR = 0.37
EXPANDABLE_RESERVED_FACTOR = 1.01
EXPANDABLE_RESERVED_GIB = 0.2
OFFLOAD_KEPT_LAYERS = 6  # TRL's forward stash (5 layer inputs) + one prefetched in backward (2026-12-03, H200)
# --- physical constants -----------------------------------------------------------------------
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4 bits + 8-bit absmax/64 + fp32 absmax/(64·256)
INT8_BYTES_PER_WEIGHT = 1 + 4 / 4096  # int8 + an fp32 scale per row (rows ~4k wide)
LORA_PARAM_BYTES = 4  # LoRA weights are fp32; their gradients appear only during backward, after the peak
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw_8bit": 2, "sgd": 0}  # per LoRA parameter
DROPOUT_BYTES_PER_ELEMENT = 3  # bf16 dropped copy (2) + bool mask (1) kept per LoRA input element
SDPA_MASK_BYTES = 2  # per (row length)² and layer: sdpa turns the bool block mask into a bf16 additive one each call
EAGER_SCORE_BYTES = 10  # per head·(row length)² and layer: scores, fp32 softmax, bf16 probabilities (uncalibrated)
CUDA_CONTEXT_GIB = 0.5  # not in "allocated": CUDA context and kernels, per process
LORA_LINEARS = LORA_LINEAR_LAYERS
ATTENTION_KINDS = ("sdpa", "varlen", "eager")


# Every profile of the registry, plus the benchmark's names ("27b", "4b": the 4B language model alone, "tiny").
ARCHITECTURES: dict[str, Architecture] = {**{n: p.architecture for n, p in PROFILES.items()}, **BENCH_ARCHITECTURES}


def architecture(profile: str) -> Architecture:
    if profile in ARCHITECTURES:
        return ARCHITECTURES[profile]
    raise ConfigError(
        f"記憶體估算不認識設定檔 {profile!r}。",
        hint=f"可用：{'、'.join(k for k in ARCHITECTURES if '-' in k or k == 'demo')}",
    )


@dataclass
class TrainingSetup:
    """What decides training memory. ``seq_len`` is the padded length, or the packed row length.

    The defaults are the settings of the original reference rows (LoRA dropout 0.05, sdpa, AdamW with
    fp32 states, no expandable segments); the project's presets use dropout 0, varlen attention and
    fused AdamW (see :data:`PRESETS`).
    """

    profile: str = "medgemma-27b-text-it"
    quantization: str = "nf4"
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    micro_batch: int = 4
    seq_len: int = 512
    gradient_checkpointing: bool = True
    liger: bool = False  # Liger's fused linear cross-entropy: no full logits
    packing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | varlen (flash attention per example; also flash_attention_2) | eager
    compute_bytes: int = 2  # bf16 on GPU; 4 for fp32 (CPU demo)
    lora_dropout: float = 0.05
    optim: str = (
        "adamw"  # adamw | adamw_fused | adamw_8bit (HF names such as adamw_torch_fused, paged_adamw_8bit work too)
    )
    liger_layers: bool = True  # with liger: its RMSNorm / GEGLU / RoPE kernels are in the model too, not only the loss
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (reserved ≈ allocated)
    activation_offloading: bool = False  # checkpointed layer inputs held in CPU memory (TRL), all but a few layers
    compile_layers: bool = False  # torch.compile per decoder layer: fused norms / MLP, saved like Liger's kernels

    def label(self) -> str:
        targets = (
            "all-linear"
            if self.lora_targets == "all-linear"
            else "+".join(t.removesuffix("_proj") for t in self.lora_targets)
        )
        parts = [
            f"{targets} r{self.lora_r}",
            f"{self.micro_batch}×{self.seq_len}{'（packing）' if self.packing else ''}",
        ]
        parts.append(("Liger" if self.liger_layers else "Liger（僅 loss）") if self.liger else "無 Liger")
        parts.append("梯度檢查點" if self.gradient_checkpointing else "無梯度檢查點")
        attn = attention_kind(self.attn_implementation)
        if attn != "sdpa":
            parts.append("varlen 注意力" if attn == "varlen" else "eager 注意力")
        if self.lora_dropout == 0:
            parts.append("LoRA dropout 0")
        if self.compile_layers:
            parts.append("逐層編譯")
        if self.activation_offloading and self.gradient_checkpointing:
            parts.append("檢查點輸入移到 CPU")
        opt = optimizer_kind(self.optim)
        if opt != "adamw":
            parts.append("8-bit AdamW" if opt == "adamw_8bit" else "fused AdamW")
        return "，".join(parts)


@dataclass
class MemoryEstimate:
    setup: TrainingSetup
    weights_gib: float
    lora_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    lora_params: int
    breakdown: dict = field(default_factory=dict)

    def needs_card_gib(self) -> float:
        """Smallest card (as the driver reports it) this run fits on: reserved + CUDA context."""
        return self.peak_reserved_gib + CUDA_CONTEXT_GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.needs_card_gib() <= gpu_gib

    def to_dict(self) -> dict:
        d = asdict(self)
        d["needs_card_gib"] = round(self.needs_card_gib(), 2)
        return d


def setup_for_run(cfg, device: str = "cuda", micro_batch: int | None = None) -> TrainingSetup:
    """The estimator's input for a run config (``RunConfig``) as ``run_training`` would train it on ``device``:
    fp32 on CPU, bf16 on CUDA, where packed rows use varlen attention and Liger runs when configured."""
    t, cuda = cfg.train, device.startswith("cuda")
    targets = cfg.lora.target_modules
    return TrainingSetup(
        profile=cfg.model.profile,
        quantization=cfg.model.quantization,
        lora_r=cfg.lora.r,
        lora_targets=targets if targets == "all-linear" else tuple(targets),
        lora_dropout=cfg.lora.dropout,
        micro_batch=micro_batch or t.per_device_train_batch_size,
        seq_len=t.max_length,
        gradient_checkpointing=t.gradient_checkpointing,
        # On CUDA the loss is TRL's chunked LM head (no full logits) with or without Liger's layer kernels.
        liger=cuda,
        liger_layers=bool(t.use_liger_kernel),
        packing=t.packing,
        attn_implementation="varlen"
        if cuda and (t.packing or t.padding_free)
        else cfg.model.attn_implementation or "sdpa",
        compute_bytes=2 if cuda else 4,
        optim=t.optim,
        activation_offloading=bool(t.activation_offloading and cuda),
        compile_layers=bool(t.compile_layers and cuda),
    )


def lora_param_count(arch: Architecture, r: int, targets) -> int:
    names = _target_names(targets)
    shapes = arch.linear_shapes()
    return arch.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def _target_names(targets) -> tuple[str, ...]:
    names = LORA_LINEARS if targets == "all-linear" else tuple(targets)
    unknown = [n for n in names if n not in LORA_LINEARS]
    if unknown:
        raise ConfigError(
            f"LoRA 目標 {unknown} 不是 Gemma 3 的線性層。", hint=f"可用：all-linear 或 {', '.join(LORA_LINEARS)}"
        )
    return names


def attention_kind(name: str) -> str:
    """sdpa | varlen | eager; flash-attention implementations count as varlen (no mask, no S² scores)."""
    n = str(name or "sdpa").lower()
    if n.startswith("varlen") or "flash" in n:
        return "varlen"
    if n in ("sdpa", "eager"):
        return n
    raise ConfigError(f"記憶體估算不認識注意力實作 {name!r}。", hint="可用：sdpa、varlen（flash_attention_2）、eager")


def optimizer_kind(name: str) -> str:
    """adamw | adamw_fused | adamw_8bit, from our names or Hugging Face's (adamw_torch_fused, paged_adamw_8bit, ...)."""
    n = str(name or "adamw").lower()
    if "8bit" in n:
        return "adamw_8bit"
    return "adamw_fused" if "fused" in n else "adamw"


def weight_bytes(arch: Architecture, quantization: str = "nf4") -> float:
    per = {"nf4": NF4_BYTES_PER_WEIGHT, "int8": INT8_BYTES_PER_WEIGHT, "none": 2.0}[quantization]
    return arch.linear_params() * per + (arch.other_params() + arch.vision_params) * 2


def layer_saved_bytes(arch: Architecture, setup: TrainingSetup) -> tuple[float, float]:
    """Bytes one decoder layer keeps for its backward in bf16: (per token, per packed row).

    Counted tensor by tensor (module docstring, "activations"); the per-row part is what grows with
    the square of the row length (sdpa's block mask on packed rows, eager's scores).
    """
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    targets = set(_target_names(setup.lora_targets))
    if (setup.liger and setup.liger_layers) or setup.compile_layers:  # compiled layers fuse the same way
        norms = 4 * 2 * h + 2 * (q + kv)  # Liger RMSNorm keeps its bf16 input (4 layer norms + q/k norms)
        mlp = 4 * i  # fused GEGLU keeps gate and up, recomputes the activation
    else:
        norms = 4 * 4 * h + 4 * (q + kv)  # Gemma3RMSNorm keeps the fp32 upcast of its input
        mlp = 6 * i  # gate (for GELU), GELU(gate) and up (for the product)
    attn = 4 * q + 4 * kv  # q, k after RoPE, v, output (flash / varlen / sdpa without mask)
    kind, s = attention_kind(setup.attn_implementation), setup.seq_len
    per_row = 0.0
    if (kind == "sdpa" and setup.packing) or kind == "eager":
        attn += 4 * (q - kv)  # with a mask, transformers repeats k and v to every query head before attention
    if kind == "sdpa" and setup.packing:
        per_row = SDPA_MASK_BYTES * s * s
    elif kind == "eager":
        per_row = EAGER_SCORE_BYTES * arch.heads * s * s
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    if setup.lora_dropout > 0:
        lora_inputs = DROPOUT_BYTES_PER_ELEMENT * sum(widths[t] for t in targets)
    else:  # lora_A keeps its input itself; o_proj's input is the attention output, kept anyway
        lora_inputs = 2 * (
            h * bool(targets & {"q_proj", "k_proj", "v_proj"})
            + h * bool(targets & {"gate_proj", "up_proj"})
            + i * ("down_proj" in targets)
        )
    return norms + mlp + attn + lora_inputs + LAYER_EXTRA_BYTES_PER_H * h, per_row


def backward_temporary_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Per token: gradients alive while one layer runs backward (on top of its saved activations)."""
    fused = (setup.liger and setup.liger_layers) or setup.compile_layers
    return (2 if fused else 8) * arch.intermediate + BACKWARD_EXTRA_BYTES_PER_H * arch.hidden


def estimate_training_memory(setup: TrainingSetup | None = None, **kwargs) -> MemoryEstimate:
    """Predict peak allocated (and reserved) GPU memory of one QLoRA step; see the module docstring."""
    setup = replace(setup or TrainingSetup(), **kwargs)
    arch = architecture(setup.profile)
    h, L, b, s = arch.hidden, arch.layers, setup.micro_batch, setup.seq_len
    tokens = b * s
    scale = setup.compute_bytes / 2  # activation byte counts are for bf16

    weights = weight_bytes(arch, setup.quantization)
    n_lora = lora_param_count(arch, setup.lora_r, setup.lora_targets)
    lora = n_lora * (LORA_PARAM_BYTES + OPTIMIZER_STATE_BYTES[optimizer_kind(setup.optim)])
    per_token, per_row = layer_saved_bytes(arch, setup)
    layer = per_token * tokens + per_row * b
    temporaries = backward_temporary_bytes(arch, setup) * tokens
    if setup.gradient_checkpointing:
        stored = 2 * h * tokens * L * scale  # each layer's bf16 input
        if setup.activation_offloading:  # on the GPU only the forward stash and the layers being brought back
            stored *= min(1.0, OFFLOAD_KEPT_LAYERS / L)
        working = (layer + temporaries) * scale  # one layer recomputed, then its backward
    else:
        stored = layer * L * scale
        working = temporaries * scale
    logits = 0.0 if setup.liger else LOGITS_BYTES * tokens * arch.vocab
    overhead = FIXED_OVERHEAD_GIB * GIB
    # Two candidate peaks: the loss (all logits alive) and the first backward layer.
    loss_phase = stored + logits
    backward_phase = stored + working
    activations = stored + (working if backward_phase >= loss_phase else 0.0)
    logits_at_peak = logits if loss_phase > backward_phase else 0.0
    peak = weights + lora + activations + logits_at_peak + overhead
    if setup.expandable_segments:
        reserved = EXPANDABLE_RESERVED_FACTOR * peak + EXPANDABLE_RESERVED_GIB * GIB
    else:
        reserved = RESERVED_FACTOR * peak + RESERVED_LOGITS_FACTOR * logits_at_peak
    g = lambda x: round(x / GIB, 2)  # noqa: E731
    return MemoryEstimate(
        setup=setup,
        weights_gib=g(weights),
        lora_gib=g(lora),
        activations_gib=g(activations),
        logits_gib=g(logits_at_peak),
        overhead_gib=g(overhead),
        peak_allocated_gib=g(peak),
        peak_reserved_gib=g(reserved),
        lora_params=n_lora,
        breakdown={
            "checkpointed_inputs_gib" if setup.gradient_checkpointing else "saved_activations_gib": g(stored),
            "layer_backward_gib": g(working),
            "saved_bytes_per_token_and_layer": round(per_token * scale),
            "logits_if_not_liger_gib": g(LOGITS_BYTES * tokens * arch.vocab),
        },
    )


# ----------------------------------------------------------------------------------------------
# Advice


# Presets measured on the H200 (docs/benchmarks.md, "Presets that follow from this"), fastest first:
# (card they are for, rows, row length, gradient checkpointing, optimizer).
_PRESET_COMMON = dict(
    packing=True, liger=True, attn_implementation="varlen", lora_dropout=0.0, expandable_segments=True
)
# The rows follow the run_training measurements of 2026-12-03 and 2026-12-04 (python -m medgemma_lib trainbench).
PRESETS: dict[str, list[tuple[str, int, int, bool, str, dict]]] = {
    "27b": [
        ("141 GB", 1, 6144, False, "adamw_fused", {}),  # 101 GiB; 1×4096 (72.9 GiB) was 12 % slower
        # 74.1 GiB reserved under a 79 GiB cap (trainbench --card-gib 80, H200, 2026-12-06): 1.53× the checkpointed row
        ("80 GB", 1, 4096, False, "adamw_fused", {}),
        # Also the one for 20 GB cards: leaner (17.7 GiB) and faster than the former "≤ 20 GB" row (1×2048, AdamW8bit).
        ("24 GB", 1, 4096, True, "adamw_fused", {"activation_offloading": True}),
    ],
    "4b": [
        ("141 GB", 4, 4096, False, "adamw_fused", {}),
        # Offloading: 5.3 GiB at the speed of the plain step; compiled layers: -10 ... +18 % (median step), +1.5 GiB.
        ("8 GB", 1, 8192, True, "adamw_fused", {"activation_offloading": True}),
    ],
}


def preset_setups(profile: str, lora_r: int = 16, lora_targets="all-linear") -> list[tuple[str, TrainingSetup]]:
    """The measured presets for a profile's model size, fastest first (empty for the demo)."""
    family = "27b" if "27b" in profile else "4b" if "4b" in profile else None
    return [
        (
            card,
            TrainingSetup(
                profile=profile,
                lora_r=lora_r,
                lora_targets=lora_targets,
                micro_batch=rows,
                seq_len=length,
                gradient_checkpointing=ckpt,
                optim=optim,
                **_PRESET_COMMON,
                **extra,
            ),
        )
        for card, rows, length, ckpt, optim, extra in PRESETS.get(family, [])
    ]


def candidate_setups(profile: str, lora_r: int = 16, lora_targets="all-linear") -> list[TrainingSetup]:
    """Other settings worth trying when no preset fits, roughly from fastest to slowest."""
    base = dict(profile=profile, lora_r=lora_r, lora_targets=lora_targets)
    lean = dict(
        base, liger=True, attn_implementation="varlen", lora_dropout=0.0, optim="adamw_fused", expandable_segments=True
    )
    out = []
    for ckpt in (False, True):
        for mb in (8, 4, 2, 1):
            out.append(TrainingSetup(**lean, micro_batch=mb, seq_len=4096, packing=True, gradient_checkpointing=ckpt))
    for length in (2048, 1024, 512):
        out.append(TrainingSetup(**lean, micro_batch=1, seq_len=length, packing=True, gradient_checkpointing=True))
        out.append(
            TrainingSetup(
                **dict(lean, optim="adamw_8bit"),
                micro_batch=1,
                seq_len=length,
                packing=True,
                gradient_checkpointing=True,
            )
        )
    out.append(
        TrainingSetup(**base, micro_batch=1, seq_len=4096, packing=True, liger=False, gradient_checkpointing=True)
    )
    out.append(TrainingSetup(**base, micro_batch=4, seq_len=512, liger=False, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=512, liger=False, gradient_checkpointing=True))
    return out


def _speed_rank(s: TrainingSetup) -> tuple:
    # Measured on H200: no checkpointing > checkpointing (~1.5×); Liger+packing > padding;
    # longer steps > shorter (fixed per-step costs); fused AdamW > 8-bit AdamW. Larger key = faster.
    return (
        not s.gradient_checkpointing,
        s.liger and s.packing,
        s.liger,
        s.micro_batch * s.seq_len,
        optimizer_kind(s.optim) != "adamw_8bit",
    )


def advise(profile: str, gpu_gib: float, **kwargs) -> dict:
    """The setting to use on a card of ``gpu_gib`` (as reported by the driver), in Chinese.

    The measured presets come first (the fastest that fits); other candidates only when none fits.
    """
    presets = [(card, estimate_training_memory(s, **kwargs)) for card, s in preset_setups(profile)]
    chosen = next(((card, e) for card, e in presets if e.fits(gpu_gib)), None)
    if chosen is None:
        ests = [estimate_training_memory(s, **kwargs) for s in candidate_setups(profile)]
        fitting = [e for e in ests if e.fits(gpu_gib)]
        if not fitting:
            smallest = min(ests + [e for _, e in presets], key=lambda e: e.needs_card_gib())
            return {
                "profile": profile,
                "gpu_gib": gpu_gib,
                "fits": False,
                "setting": None,
                "preset": None,
                "peak_allocated_gib": None,
                "advice": f"放不下：{profile} 最省記憶體的設定（{smallest.setup.label()}）"
                f"也需要約 {smallest.needs_card_gib():.0f} GiB。"
                + ("請改用 medgemma-4b-it 或 demo。" if "27b" in profile else "請改用 demo 設定檔（CPU 也可）。"),
            }
        chosen = (None, max(fitting, key=lambda e: _speed_rank(e.setup)))
    card, best = chosen
    text = (
        f"可以：{best.setup.label()}，預估峰值 {best.peak_allocated_gib:.1f} GiB"
        f"（含保留約 {best.needs_card_gib():.1f} GiB）。"
    )
    if card:
        text += f"這是 H200 實測的 {card} 預設（docs/benchmarks.md）。"
    if not best.setup.liger:
        text += "安裝 liger-kernel 可再省下 logits 的記憶體。"
    return {
        "profile": profile,
        "gpu_gib": gpu_gib,
        "fits": True,
        "setting": best.setup.label(),
        "preset": card,
        "peak_allocated_gib": best.peak_allocated_gib,
        "advice": text,
    }


def advice_table(
    profile: str | list[str] = ("medgemma-4b-it", "medgemma-27b-text-it"), gpu_sizes=(8, 12, 16, 24, 40, 80, 141)
):
    """A pandas table: rows = GPU sizes (GB), one advice column per profile (for notebook 04)."""
    profiles = [profile] if isinstance(profile, str) else list(profile)
    rows = []
    for size in gpu_sizes:
        row = {"GPU 記憶體": f"{size} GB"}
        for p in profiles:
            row[p] = advise(p, usable_gib(size))["advice"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("GPU 記憶體")


def advice_markdown(
    profile: str | list[str] = ("medgemma-4b-it", "medgemma-27b-text-it"), gpu_sizes=(8, 12, 16, 24, 40, 80, 141)
):
    """:func:`advice_table` as a Markdown list, one entry per card size (notebook 04): long advice reads as
    left-aligned sentences instead of right-aligned table cells."""
    table = advice_table(profile, gpu_sizes)
    lines = []
    for size, row in table.iterrows():
        lines.append(f"- **{size}**")
        lines += [f"  - `{name}`：{display.md_escape(str(advice))}" for name, advice in row.items()]
    return display.Markdown("\n".join(lines))


def breakdown_markdown(setups: list[TrainingSetup]):
    """:func:`breakdown_table` for people (notebook 04): settings numbered under the table, one column each."""
    table = breakdown_table(setups)
    names = [f"設定 {i}" for i in range(1, len(setups) + 1)]
    rows = []
    for col in table.columns[1:]:
        rows.append({"GiB": col, **{n: f"{v:.2f}" for n, v in zip(names, table[col])}})
    legend = "\n".join(f"- 設定 {i}：{label}" for i, label in enumerate(table["設定"], 1))
    return display.Markdown(display.markdown_table(rows, ["GiB", *names]).data + "\n\n" + legend)


def usable_gib(nominal_gb: float) -> float:
    """What the driver reports for a card sold as ``nominal_gb`` (80 GB → 79.2, 24 GB → 23.6)."""
    return nominal_gb * 0.985


def breakdown_table(setups: list[TrainingSetup]):
    rows = []
    for s in setups:
        e = estimate_training_memory(s)
        rows.append(
            {
                "設定": s.label(),
                "權重": e.weights_gib,
                "LoRA＋AdamW": e.lora_gib,
                "啟動值": e.activations_gib,
                "logits＋loss": e.logits_gib,
                "其他": e.overhead_gib,
                "峰值（allocated）": e.peak_allocated_gib,
                "需要的顯示卡": round(e.needs_card_gib(), 1),
            }
        )
    return pd.DataFrame(rows)


def format_estimate(e: MemoryEstimate, gpu_gib: float | None = None) -> str:
    s = e.setup
    lines = [
        f"== 訓練記憶體估算：{s.profile}（{s.quantization}）==",
        f"設定：{s.label()}",
        f"  量化後權重          {e.weights_gib:7.2f} GiB",
        f"  LoRA 參數＋AdamW    {e.lora_gib:7.2f} GiB（{e.lora_params / 1e6:.1f} M 個可訓練參數）",
        f"  啟動值              {e.activations_gib:7.2f} GiB",
        f"  logits＋loss        {e.logits_gib:7.2f} GiB{'（Liger 分塊計算，不需保存）' if s.liger else ''}",
        f"  其他                {e.overhead_gib:7.2f} GiB",
        f"  峰值（allocated）   {e.peak_allocated_gib:7.2f} GiB",
        f"  需要的顯示卡        {e.needs_card_gib():7.1f} GiB 以上（含記憶體碎片與 CUDA context）",
        "（依 H200 實測驗證：peak allocated 誤差在 ±15% 內，"
        "見 medgemma_lib/resources/ 的 h200_reference.json、h200_bench_2026-11-29.json、"
        "h200_trainbench_2026-12-03.json、h200_trainbench_2026-12-04.json）",
    ]
    if gpu_gib is not None:
        lines.append(
            ("✓ " if e.fits(gpu_gib) else "✗ ") + f"{gpu_gib:g} GiB 的 GPU：{'放得下' if e.fits(gpu_gib) else '放不下'}"
        )
        lines.append("建議：" + advise(s.profile, gpu_gib)["advice"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Footprint of a loaded model


def footprint(model) -> dict:
    """Parameters and bytes by dtype of a loaded model, before (as bf16) and after quantisation.

    4-bit weights are counted with their logical size (``quant_state.shape``) and with their real
    storage: packed bytes plus the quantisation statistics (absmax, code tables).
    """
    rows: dict[str, dict] = {}
    total_params = total_bytes = 0
    seen: set[int] = set()  # code tables may be shared between weights: count storage once
    for _name, p in list(model.named_parameters()) + list(model.named_buffers()):
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            n = int(torch.Size(qs.shape).numel())
            nbytes = p.numel() * p.element_size() + _quant_state_bytes(qs, seen)
            kind = str(getattr(qs, "quant_type", None) or "4 位元")
        elif p.dtype == torch.int8 and hasattr(p, "SCB"):
            n, nbytes, kind = p.numel(), p.numel() + (p.SCB.numel() * 4 if p.SCB is not None else 0), "int8"
        else:
            n, nbytes, kind = p.numel(), p.numel() * p.element_size(), str(p.dtype).removeprefix("torch.")
        r = rows.setdefault(kind, {"dtype": kind, "params": 0, "bytes": 0})
        r["params"] += n
        r["bytes"] += nbytes
        total_params += n
        total_bytes += nbytes
    # Tied output layer shares the embedding's storage: named_parameters already deduplicates it.
    return {
        "rows": sorted(rows.values(), key=lambda r: -r["bytes"]),
        "params": total_params,
        "bytes": total_bytes,
        "bf16_bytes": total_params * 2,
        "fp32_bytes": total_params * 4,
    }


def _quant_state_bytes(qs, seen: set[int]) -> int:
    total = 0
    for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    inner = getattr(qs, "state2", None)
    if inner is not None:
        total += _quant_state_bytes(inner, seen)
    return total


def footprint_table(fp: dict):
    """Footprint as a small pandas table (MiB), with the bf16 / fp32 sizes for comparison."""
    mib = 1024**2
    rows = [
        {
            "資料型別": r["dtype"],
            "參數量（百萬）": round(r["params"] / 1e6, 1),
            "大小（MiB）": round(r["bytes"] / mib, 1),
        }
        for r in fp["rows"]
    ]
    rows.append(
        {"資料型別": "合計", "參數量（百萬）": round(fp["params"] / 1e6, 1), "大小（MiB）": round(fp["bytes"] / mib, 1)}
    )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Reference measurements


REFERENCE_FILES = (
    "h200_reference.json",
    "h200_bench_2026-11-29.json",
    "h200_trainbench_2026-12-03.json",
    "h200_trainbench_2026-12-04.json",
)


def reference_rows(path: str | Path | None = None) -> list[dict]:
    """Measured rows of one file (medgemma_lib/resources/h200_reference.json by default), each with its source.

    A group's ``row_defaults`` fill fields its rows leave out; ``vision_tower_placeholder_gib`` marks
    4B rows that carry the vision tower's memory; an allocator set to expandable segments (named in the
    file's units or the group's ``alloc_conf``) sets ``expandable_segments``.
    """
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("medgemma_lib").joinpath(f"resources/{REFERENCE_FILES[0]}").read_text(encoding="utf-8")
    data = json.loads(text)
    rows = []
    for group in data["sources"]:
        defaults = dict(group.get("row_defaults", {}))
        if "expandable_segments:True" in json.dumps(data.get("units", {})) + group.get("alloc_conf", ""):
            defaults.setdefault("expandable_segments", True)
        vision = group.get("vision_tower_placeholder_gib", {})
        for row in group["rows"]:
            rows.append({**defaults, **row, "source": group["source"], "vision_gib": vision.get(row["arch"], 0.0)})
    return rows


def setup_from_row(row: dict) -> TrainingSetup:
    """The estimator's input for one measured row (fields absent from a row keep TrainingSetup's defaults)."""
    targets = row["lora_targets"]
    profile = row["arch"]
    if profile == "4b" and row.get("vision_gib"):  # the bench keeps a bf16 stand-in for the vision tower
        profile = "medgemma-4b-it"
    keys = ("lora_dropout", "optim", "liger_layers", "expandable_segments", "activation_offloading", "compile_layers")
    extra = {k: row[k] for k in keys if k in row}
    return TrainingSetup(
        profile=profile,
        lora_r=row.get("lora_r", 16),
        lora_targets=targets if targets == "all-linear" else tuple(targets),
        micro_batch=row["batch"],
        seq_len=row["seq"],
        gradient_checkpointing=row["grad_ckpt"],
        liger=row["liger"],
        packing=row.get("packing", False),
        attn_implementation=row.get("attn", "sdpa"),
        **extra,
    )


def comparison_setups() -> list[TrainingSetup]:
    """The six setups notebook 04 compares, in its order.

    MedGemma 27B text: the original guide's (LoRA on q and v only, 4×512, no Liger), the course default (all
    linear layers), the default with Liger, and packed 4096-token rows with Liger; MedGemma 1.5 4B: the default
    and packed rows with Liger. :func:`breakdown_markdown` lists each one's label under the table.
    """
    big, small = "medgemma-27b-text-it", "medgemma-1.5-4b-it"
    return [
        TrainingSetup(big, lora_targets=("q_proj", "v_proj"), micro_batch=4, seq_len=512),
        TrainingSetup(big, micro_batch=4, seq_len=512),
        TrainingSetup(big, micro_batch=4, seq_len=512, liger=True),
        TrainingSetup(big, micro_batch=1, seq_len=4096, packing=True, liger=True),
        TrainingSetup(small, micro_batch=4, seq_len=512),
        TrainingSetup(small, micro_batch=1, seq_len=4096, packing=True, liger=True),
    ]
