"""GPU memory: footprint of a loaded model, and a training-memory estimator checked against measurement.

Estimator (:func:`estimate_training_memory`)
--------------------------------------------
Peak *allocated* memory of one QLoRA training step (what ``torch.cuda.max_memory_allocated``
reports), built from the architecture, not from a lookup table:

* **weights**: decoder linears in NF4 with double quantisation (0.5 byte per weight + an 8-bit
  absmax per 64 weights + an fp32 absmax per 256 blocks = 0.5159 byte), embeddings (tied with the
  output layer), norms and the vision tower in bf16. For 27B this gives 15.05 GiB and for the 4B
  language model 2.80 GiB, exactly the weights measured on the H200 (``../shared/benchmarks``).
* **LoRA**: r·(in+out) fp32 parameters per adapted linear; AdamW keeps two fp32 moments; the
  gradient is allocated during backward. At the peak (the start of backward) the gradients do
  not exist yet, so 12 bytes per LoRA parameter count (16 once backward has run).
* **activations**: with gradient checkpointing each decoder layer keeps only its bf16 input
  (2·H bytes per token and layer) and one layer is recomputed in backward, needing
  ``LAYER_BACKWARD_BYTES_PER_H`` · H bytes per token; without checkpointing every layer keeps
  ``LAYER_SAVED_BYTES_PER_H`` · H bytes per token.
* **logits and loss**: without Liger, transformers materialises the 262,208-word logits and the
  loss: ``LOGITS_BYTES`` per token and vocabulary entry (bf16 logits 2, their fp32 upcast 4, fp32
  log-probabilities 4, fp32 gradient 4 = 14). Liger's fused linear cross-entropy computes them in
  chunks of a few dozen tokens and never holds them (≈0).

Calibrated constants (fitted once to the 13 rows of ``h200-2026-11-29.md``; every other row,
including the MedQuAD-shaped packed rows, is a prediction):

=============================  ======  =====================================================
constant                       value   where it comes from
=============================  ======  =====================================================
``LOGITS_BYTES``               14.1    slope of non-Liger rows minus Liger rows (27B and 4B
                                       agree: 14.1 / 14.1); physical count above gives 14
``LAYER_BACKWARD_BYTES_PER_H`` 113.7   slope of Liger rows in tokens (27B 113.8, 4B 113.5)
``LAYER_SAVED_BYTES_PER_H``    80.0    27B Liger without checkpointing, 4×512
``PACKED_MASK_BYTES``          3.6     per row, layer and (row length)²: the extra the packed
                                       rows without checkpointing need (27B 3.9, 4B 3.3)
``FIXED_OVERHEAD_GIB``         0.1     intercept (cuBLAS workspace, RoPE tables, masks)
``RESERVED_FACTOR`` / ``_LOGITS``  1.04 / 0.37  reserved ≈ 1.04·allocated + 0.37·logits
=============================  ======  =====================================================

Architectures (from the checkpoints' ``config.json`` on the Hub; the 270M demo from its converted
config): 27B text: hidden 5376, 62 layers, intermediate 21504, 32 heads, 16 KV heads, head_dim 128,
vocab 262,208. 4B language model: hidden 2560, 34 layers, intermediate 10240, 8 heads, 4 KV heads,
head_dim 256, vocab 262,208, plus a SigLIP vision tower (~0.42 B parameters: 27 layers, hidden 1152,
MLP 4304) and projector kept in bf16. The multimodal 27B has the same language model plus the same
vision tower.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 1024**3

# --- calibrated constants (see module docstring) ---------------------------------------------
LOGITS_BYTES = 14.1
LAYER_BACKWARD_BYTES_PER_H = 113.7
LAYER_SAVED_BYTES_PER_H = 80.0
PACKED_MASK_BYTES = 3.6
FIXED_OVERHEAD_GIB = 0.1
RESERVED_FACTOR = 1.04
RESERVED_LOGITS_FACTOR = 0.37
# --- physical constants -----------------------------------------------------------------------
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4 bits + 8-bit absmax/64 + fp32 absmax/(64·256)
INT8_BYTES_PER_WEIGHT = 1 + 4 / 4096  # int8 + an fp32 scale per row (rows ~4k wide)
LORA_STATE_BYTES_AT_PEAK = 12  # fp32 weight + AdamW m and v; gradients come later in backward
CUDA_CONTEXT_GIB = 0.5  # not in "allocated": CUDA context and kernels, per process
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """Shape numbers of a Gemma 3 language model (plus an optional vision tower)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_params: float = 0.0  # kept in bf16, never trained

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        norms = self.layers * (4 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.vocab * self.hidden + norms


_VISION_SIGLIP = 0.42e9  # SigLIP so400m tower + projector in MedGemma 4B / 27B multimodal
ARCHITECTURES: dict[str, Architecture] = {
    "demo": Architecture("demo", 640, 18, 2048, 4, 1, 256, 262144),
    "medgemma-4b-it": Architecture("medgemma-4b-it", 2560, 34, 10240, 8, 4, 256, 262208, _VISION_SIGLIP),
    "medgemma-27b-text-it": Architecture("medgemma-27b-text-it", 5376, 62, 21504, 32, 16, 128, 262208),
    "medgemma-27b-it": Architecture("medgemma-27b-it", 5376, 62, 21504, 32, 16, 128, 262208, _VISION_SIGLIP),
}
# Benchmark names: "27b" = 27B text; "4b" = the 4B language model alone (no vision tower).
ARCHITECTURES["27b"] = replace(ARCHITECTURES["medgemma-27b-text-it"], name="27b")
ARCHITECTURES["4b"] = replace(ARCHITECTURES["medgemma-4b-it"], name="4b", vision_params=0.0)


def architecture(profile: str) -> Architecture:
    from medgemma_lib.errors import ConfigError

    if profile in ARCHITECTURES:
        return ARCHITECTURES[profile]
    raise ConfigError(f"記憶體估算不認識設定檔 {profile!r}。", hint=f"可用：{'、'.join(k for k in ARCHITECTURES if '-' in k or k == 'demo')}")


@dataclass
class TrainingSetup:
    """What decides training memory. ``seq_len`` is the padded length, or the packed row length."""

    profile: str = "medgemma-27b-text-it"
    quantization: str = "nf4"
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    micro_batch: int = 4
    seq_len: int = 512
    gradient_checkpointing: bool = True
    liger: bool = False
    packing: bool = False
    attn_implementation: str = "sdpa"
    compute_bytes: int = 2  # bf16 on GPU; 4 for fp32 (CPU demo)

    def label(self) -> str:
        targets = "all-linear" if self.lora_targets == "all-linear" else "+".join(t.removesuffix("_proj") for t in self.lora_targets)
        parts = [f"{targets} r{self.lora_r}", f"{self.micro_batch}×{self.seq_len}{'（packing）' if self.packing else ''}"]
        parts.append("Liger" if self.liger else "無 Liger")
        parts.append("梯度檢查點" if self.gradient_checkpointing else "無梯度檢查點")
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


def lora_param_count(arch: Architecture, r: int, targets) -> int:
    names = LORA_LINEARS if targets == "all-linear" else tuple(targets)
    shapes = arch.linear_shapes()
    unknown = [n for n in names if n not in shapes]
    if unknown:
        from medgemma_lib.errors import ConfigError

        raise ConfigError(f"LoRA 目標 {unknown} 不是 Gemma 3 的線性層。", hint=f"可用：all-linear 或 {', '.join(LORA_LINEARS)}")
    return arch.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def weight_bytes(arch: Architecture, quantization: str = "nf4") -> float:
    per = {"nf4": NF4_BYTES_PER_WEIGHT, "int8": INT8_BYTES_PER_WEIGHT, "none": 2.0}[quantization]
    return arch.linear_params() * per + (arch.other_params() + arch.vision_params) * 2


def estimate_training_memory(setup: TrainingSetup | None = None, **kwargs) -> MemoryEstimate:
    """Predict peak allocated (and reserved) GPU memory of one QLoRA step; see the module docstring."""
    setup = replace(setup or TrainingSetup(), **kwargs)
    arch = architecture(setup.profile)
    h, L, b, s = arch.hidden, arch.layers, setup.micro_batch, setup.seq_len
    tokens = b * s
    scale = setup.compute_bytes / 2  # activation constants were measured in bf16

    weights = weight_bytes(arch, setup.quantization)
    n_lora = lora_param_count(arch, setup.lora_r, setup.lora_targets)
    lora = n_lora * LORA_STATE_BYTES_AT_PEAK
    mask_per_layer = PACKED_MASK_BYTES * b * s * s if setup.packing else 0.0
    eager_per_layer = 10 * b * arch.heads * s * s * scale if setup.attn_implementation == "eager" else 0.0  # uncalibrated
    if setup.gradient_checkpointing:
        stored = 2 * h * tokens * L * scale
        working = LAYER_BACKWARD_BYTES_PER_H * h * tokens * scale + mask_per_layer + eager_per_layer
    else:
        stored = (LAYER_SAVED_BYTES_PER_H * h * tokens * scale + mask_per_layer + eager_per_layer) * L
        working = (LAYER_BACKWARD_BYTES_PER_H - LAYER_SAVED_BYTES_PER_H) * h * tokens * scale
    logits = 0.0 if setup.liger else LOGITS_BYTES * tokens * arch.vocab
    overhead = FIXED_OVERHEAD_GIB * GIB
    # Two candidate peaks: the loss (all logits alive) and the first layer's backward.
    loss_phase = stored + logits
    backward_phase = stored + working
    activations = stored + (working if backward_phase >= loss_phase else 0.0)
    logits_at_peak = logits if loss_phase > backward_phase else 0.0
    peak = weights + lora + activations + logits_at_peak + overhead
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
        breakdown={"checkpointed_inputs_gib" if setup.gradient_checkpointing else "saved_activations_gib": g(stored), "layer_backward_gib": g(working), "logits_if_not_liger_gib": g(LOGITS_BYTES * tokens * arch.vocab)},
    )


# ----------------------------------------------------------------------------------------------
# Advice


def candidate_setups(profile: str, lora_r: int = 16, lora_targets="all-linear") -> list[TrainingSetup]:
    """Settings worth trying, roughly from fastest to slowest (H200 measurements, see benchmarks)."""
    base = dict(profile=profile, lora_r=lora_r, lora_targets=lora_targets)
    out = []
    for ckpt in (False, True):
        for mb in (8, 4, 2, 1):
            out.append(TrainingSetup(**base, micro_batch=mb, seq_len=4096, packing=True, liger=True, gradient_checkpointing=ckpt))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=2048, packing=True, liger=True, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=4096, packing=True, liger=False, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=4, seq_len=512, liger=True, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=1024, packing=True, liger=True, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=512, liger=True, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=4, seq_len=512, liger=False, gradient_checkpointing=True))
    out.append(TrainingSetup(**base, micro_batch=1, seq_len=512, liger=False, gradient_checkpointing=True))
    return out


def _speed_rank(s: TrainingSetup) -> tuple:
    # Measured on H200: no checkpointing > checkpointing (~1.5×); Liger+packing > padding;
    # more tokens per step > fewer (fixed per-step costs). Larger key = faster.
    return (not s.gradient_checkpointing, s.liger and s.packing, s.liger, s.micro_batch * s.seq_len)


def advise(profile: str, gpu_gib: float, **kwargs) -> dict:
    """The fastest setting that fits ``gpu_gib`` (as reported by the driver), in Chinese."""
    ests = [estimate_training_memory(s, **kwargs) for s in candidate_setups(profile)]
    fitting = [e for e in ests if e.fits(gpu_gib)]
    if not fitting:
        smallest = min(ests, key=lambda e: e.needs_card_gib())
        return {
            "profile": profile, "gpu_gib": gpu_gib, "fits": False, "setting": None, "peak_allocated_gib": None,
            "advice": f"放不下：{profile} 最省記憶體的設定（{smallest.setup.label()}）也需要約 {smallest.needs_card_gib():.0f} GiB。"
            + ("請改用 medgemma-4b-it 或 demo。" if "27b" in profile else "請改用 demo 設定檔（CPU 也可）。"),
        }
    best = max(fitting, key=lambda e: _speed_rank(e.setup))
    text = f"可以：{best.setup.label()}，預估峰值 {best.peak_allocated_gib:.1f} GiB（含保留約 {best.needs_card_gib():.1f} GiB）。"
    if not best.setup.liger:
        text += "安裝 liger-kernel 可再省下 logits 的記憶體。"
    return {"profile": profile, "gpu_gib": gpu_gib, "fits": True, "setting": best.setup.label(), "peak_allocated_gib": best.peak_allocated_gib, "advice": text}


def advice_table(profile: str | list[str] = ("medgemma-4b-it", "medgemma-27b-text-it"), gpu_sizes=(8, 12, 16, 24, 40, 80, 141)):
    """A pandas table: rows = GPU sizes (GB), one advice column per profile (for notebook 04)."""
    import pandas as pd

    profiles = [profile] if isinstance(profile, str) else list(profile)
    rows = []
    for size in gpu_sizes:
        row = {"GPU 記憶體": f"{size} GB"}
        for p in profiles:
            row[p] = advise(p, usable_gib(size))["advice"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("GPU 記憶體")


def usable_gib(nominal_gb: float) -> float:
    """What the driver reports for a card sold as ``nominal_gb`` (80 GB → 79.2, 24 GB → 23.6)."""
    return nominal_gb * 0.985


def breakdown_table(setups: list[TrainingSetup]):
    import pandas as pd

    rows = []
    for s in setups:
        e = estimate_training_memory(s)
        rows.append({
            "設定": s.label(), "權重": e.weights_gib, "LoRA＋AdamW": e.lora_gib, "激活值": e.activations_gib,
            "logits＋loss": e.logits_gib, "其他": e.overhead_gib, "峰值（allocated）": e.peak_allocated_gib, "需要的顯示卡": round(e.needs_card_gib(), 1),
        })
    return pd.DataFrame(rows)


def format_estimate(e: MemoryEstimate, gpu_gib: float | None = None) -> str:
    s = e.setup
    lines = [
        f"== 訓練記憶體估算：{s.profile}（{s.quantization}）==",
        f"設定：{s.label()}",
        f"  量化後權重          {e.weights_gib:7.2f} GiB",
        f"  LoRA 參數＋AdamW    {e.lora_gib:7.2f} GiB（{e.lora_params / 1e6:.1f} M 個可訓練參數）",
        f"  激活值              {e.activations_gib:7.2f} GiB",
        f"  logits＋loss        {e.logits_gib:7.2f} GiB{'（Liger 分塊計算，不需保存）' if s.liger else ''}",
        f"  其他                {e.overhead_gib:7.2f} GiB",
        f"  峰值（allocated）   {e.peak_allocated_gib:7.2f} GiB",
        f"  需要的顯示卡        {e.needs_card_gib():7.1f} GiB 以上（含記憶體碎片與 CUDA context）",
        "（模型依 H200 實測校準，誤差約 ±5%；見 tests/data/h200_reference.json）",
    ]
    if gpu_gib is not None:
        lines.append(("✓ " if e.fits(gpu_gib) else "✗ ") + f"{gpu_gib:g} GiB 的 GPU：{'放得下' if e.fits(gpu_gib) else '放不下'}")
        lines.append("建議：" + advise(s.profile, gpu_gib)["advice"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Footprint of a loaded model


def footprint(model) -> dict:
    """Parameters and bytes by dtype of a loaded model, before (as bf16) and after quantisation.

    4-bit weights are counted with their logical size (``quant_state.shape``) and with their real
    storage: packed bytes plus the quantisation statistics (absmax, code tables).
    """
    import torch

    rows: dict[str, dict] = {}
    total_params = total_bytes = 0
    seen: set[int] = set()  # code tables may be shared between weights: count storage once
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
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
    import pandas as pd

    mib = 1024**2
    rows = [{"資料型別": r["dtype"], "參數量（百萬）": round(r["params"] / 1e6, 1), "大小（MiB）": round(r["bytes"] / mib, 1)} for r in fp["rows"]]
    rows.append({"資料型別": "合計", "參數量（百萬）": round(fp["params"] / 1e6, 1), "大小（MiB）": round(fp["bytes"] / mib, 1)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Reference measurements


def reference_rows(path: str | Path | None = None) -> list[dict]:
    """Measured rows (tests/data/h200_reference.json by default), each with its source."""
    p = Path(path) if path else Path(__file__).resolve().parents[1] / "tests" / "data" / "h200_reference.json"
    data = json.loads(p.read_text(encoding="utf-8"))
    rows = []
    for group in data["sources"]:
        for row in group["rows"]:
            rows.append({**row, "source": group["source"]})
    return rows


def setup_from_row(row: dict) -> TrainingSetup:
    targets = row["lora_targets"]
    return TrainingSetup(
        profile=row["arch"], lora_r=row.get("lora_r", 16), lora_targets=targets if targets == "all-linear" else tuple(targets),
        micro_batch=row["batch"], seq_len=row["seq"], gradient_checkpointing=row["grad_ckpt"], liger=row["liger"],
        packing=row.get("packing", False), attn_implementation=row.get("attn", "sdpa"),
    )


# ----------------------------------------------------------------------------------------------
# CLI


def register_cli(sub) -> None:
    p = sub.add_parser("memory", help="估算 QLoRA 訓練需要多少 GPU 記憶體，並依顯示卡大小給建議")
    p.add_argument("--profile", default="medgemma-27b-text-it", help="模型設定檔：medgemma-4b-it、medgemma-27b-text-it、medgemma-27b-it、demo")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU 記憶體大小（GiB），例如 24")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "none"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear", help="all-linear 或以逗號分隔的層名，例如 q_proj,v_proj")
    p.add_argument("--batch", type=int, default=4, help="每步的樣本數（micro-batch）")
    p.add_argument("--seq", type=int, default=512, help="序列長度（packing 時為每列長度）")
    p.add_argument("--no-grad-ckpt", action="store_true", help="不使用梯度檢查點")
    p.add_argument("--liger", action="store_true", help="使用 Liger 核心")
    p.add_argument("--packing", action="store_true", help="把樣本接成長列（packing）")
    p.add_argument("--table", action="store_true", help="列出 8～141 GB 顯示卡的建議表")
    p.add_argument("--json", action="store_true", help="以 JSON 輸出")
    p.set_defaults(func=_cli_memory)


def _cli_memory(args) -> int:
    from medgemma_lib.errors import ConfigError

    if args.batch < 1 or args.seq < 8 or args.lora_r < 1:
        raise ConfigError("--batch、--seq、--lora-r 必須是正整數（--seq 至少 8）。")
    targets = "all-linear" if args.lora_targets == "all-linear" else tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    architecture(args.profile)
    if args.table:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.width", 200):
            print(advice_table(args.profile).to_string())
        return 0
    est = estimate_training_memory(
        TrainingSetup(profile=args.profile, quantization=args.quantization, lora_r=args.lora_r, lora_targets=targets,
                      micro_batch=args.batch, seq_len=args.seq, gradient_checkpointing=not args.no_grad_ckpt,
                      liger=args.liger, packing=args.packing)
    )
    if args.json:
        print(json.dumps(est.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(format_estimate(est, args.gpu_gib))
    return 0
