"""Training-throughput benchmark: QLoRA on the real MedGemma architectures with random weights.

``python -m medgemma_lib bench`` builds the architecture of a profile (``27b``: medgemma-27b-text-it,
``4b``: the language model of medgemma-4b-it, ``tiny``: a small stand-in for CPU tests) with
random weights in NF4 (:mod:`medgemma_lib.checks.random_models`), adds LoRA with
peft, and times training steps on batches whose example lengths are drawn from the real MedQuAD
token lengths (``resources/medquad_token_lengths.json``: Gemma 3 tokenizer + chat template).
``bench --unsloth`` times Unsloth on the same batches (:mod:`medgemma_lib.checks.unsloth`).

What counts: **useful tokens** are real input tokens; padding never counts. Each variant reports
useful tokens/s over the measured steps (warm-up steps excluded), the median step time, and the
peak allocated and reserved GPU memory. Several variants run side by side on one model build, so
they share the GPU, the data draw and the software versions. Output: JSON plus a Markdown table.

Layouts:

* ``grouped``: the original guide's recipe: batches of examples truncated at ``max_length`` and
  padded to the longest, ordered like ``group_by_length`` (megabatches of 50 batches sorted by length).
* ``padded``: the same with random order.
* ``packed``: examples truncated at ``max_length`` laid end to end in rows of ``row_length`` tokens,
  ``position_ids`` restarting per example and no attention mask (transformers then keeps examples
  apart; checked by :func:`packed_matches_unpacked`). A row's unused tail is one more dummy segment
  whose tokens are not counted and carry no label.

Attention for packed rows: ``sdpa`` (a block-diagonal boolean mask over the whole row) or
``varlen`` (:func:`register_varlen_attention`: flash attention over each example only, through
``torch.nn.attention.varlen``; exact masked sdpa where that is missing).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.gemma3 import modeling_gemma3

from medgemma_lib.checks.random_models import build_model
from medgemma_lib.core.atomic import write_json, write_text
from medgemma_lib.core.errors import ConfigError, DataError, ResourceError
from medgemma_lib.core.machine import machine_facts, package_versions
from medgemma_lib.core.profiles import BENCH_ALIASES, LORA_LINEAR_LAYERS
from medgemma_lib.models.attention import register_varlen_attention, varlen_support
from medgemma_lib.models.loading import default_device, load_tokenizer

# Full MedQuAD (16,423 answered pairs) under the Gemma 3 chat template: 4,614,001 tokens.
LENGTHS_RESOURCE = "resources/medquad_token_lengths.json"
MATMUL_TFLOPS_H200 = 790.0  # bf16 8192^3 on random data, measured on this card (KINDS.md); remeasured per run on CUDA

BENCH_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "accelerate", "triton")
QV = ["q_proj", "v_proj"]
ALL_LINEAR = list(LORA_LINEAR_LAYERS)


@dataclass
class Variant:
    """One training setting to time."""

    name: str
    description: str
    layout: str = "packed"  # grouped | padded | packed
    micro_batch: int = 1  # examples per step (grouped/padded) or rows per step (packed)
    max_length: int = 2048  # truncate each example here
    row_length: int = 4096  # packed only
    lora_targets: list = field(default_factory=lambda: list(ALL_LINEAR))
    lora_r: int = 16
    lora_dropout: float = 0.0
    grad_ckpt: bool = True
    liger: bool = False
    attn: str = "sdpa"  # sdpa | varlen
    optim: str = "adamw_fused"  # adamw | adamw_fused | adamw_8bit
    steps: int = 10  # measured steps
    warmup: int = 2  # steps run first and not counted
    role: str = ""  # original | default | preset-24gb | preset-8gb | step

    def short(self) -> str:
        t = "q,v" if list(self.lora_targets) == QV else "all-linear"
        shape = (
            f"{self.micro_batch}×{self.row_length} packed"
            if self.layout == "packed"
            else f"{self.micro_batch} ex {self.layout}"
        )
        return (
            f"{t} r{self.lora_r} drop{self.lora_dropout:g}, {shape}, trunc {self.max_length}, "
            f"ckpt {'on' if self.grad_ckpt else 'off'}, {'liger' if self.liger else 'full logits'}, "
            f"{self.attn}, {self.optim}"
        )


def original_variant(steps: int = 25, warmup: int = 3) -> Variant:
    """The original guide's recipe, the row every other is compared with (``× original``)."""
    return Variant(
        "original",
        "原始指南：q,v LoRA、4 筆 group_by_length、截斷 512、補齊到最長",
        layout="grouped",
        micro_batch=4,
        max_length=512,
        lora_targets=list(QV),
        lora_dropout=0.05,
        grad_ckpt=True,
        liger=False,
        attn="sdpa",
        optim="adamw",
        steps=steps,
        warmup=warmup,
        role="original",
    )


def default_variants(arch: str) -> list[Variant]:
    """The side-by-side set for one architecture: original recipe, the lever ladder, default and presets."""
    if arch == "tiny":
        return [
            dataclasses.replace(original_variant(steps=3, warmup=1), micro_batch=2, max_length=64),
            Variant(
                "packed", "packed rows", micro_batch=2, max_length=96, row_length=128, steps=3, warmup=1, role="default"
            ),
        ]
    ladder = [
        original_variant(),
        Variant("packed-sdpa", "+ packing, all-linear", row_length=4096, lora_dropout=0.05, optim="adamw", role="step"),
        Variant("packed-liger", "+ Liger", row_length=4096, lora_dropout=0.05, liger=True, optim="adamw", role="step"),
        Variant("packed-liger-nodrop", "+ dropout 0, fused AdamW", row_length=4096, liger=True, role="step"),
        Variant("packed-liger-varlen", "+ varlen attention", row_length=4096, liger=True, attn="varlen", role="step"),
    ]
    if arch == "27b":
        return ladder + [
            Variant(
                "default-141gb",
                "141 GB default: no checkpointing",
                row_length=4096,
                liger=True,
                attn="varlen",
                grad_ckpt=False,
                role="default",
            ),
            Variant(
                "141gb-2x4096",
                "141 GB candidate: no checkpointing, 2 rows",
                micro_batch=2,
                row_length=4096,
                liger=True,
                attn="varlen",
                grad_ckpt=False,
                role="default",
            ),
            Variant(
                "141gb-ckpt-4x4096",
                "141 GB candidate: checkpointing, 4 rows",
                micro_batch=4,
                row_length=4096,
                liger=True,
                attn="varlen",
                steps=6,
                role="step",
            ),
            Variant(
                "24gb-2048", "24 GB preset candidate", row_length=2048, liger=True, attn="varlen", role="preset-24gb"
            ),
            Variant(
                "24gb-2048-8bit",
                "24 GB preset candidate, 8-bit AdamW",
                row_length=2048,
                liger=True,
                attn="varlen",
                optim="adamw_8bit",
                role="preset-24gb",
            ),
            Variant(
                "24gb-3072", "24 GB preset candidate", row_length=3072, liger=True, attn="varlen", role="preset-24gb"
            ),
        ]
    return ladder + [
        Variant(
            "default-141gb",
            "141 GB default: no checkpointing, 4 rows",
            micro_batch=4,
            row_length=4096,
            liger=True,
            attn="varlen",
            grad_ckpt=False,
            role="default",
        ),
        Variant(
            "141gb-8x4096",
            "141 GB candidate: no checkpointing, 8 rows",
            micro_batch=8,
            row_length=4096,
            liger=True,
            attn="varlen",
            grad_ckpt=False,
            role="default",
        ),
        Variant("8gb-8192", "8 GB preset candidate", row_length=8192, liger=True, attn="varlen", role="preset-8gb"),
        Variant(
            "8gb-2x8192",
            "8 GB preset candidate",
            micro_batch=2,
            row_length=8192,
            liger=True,
            attn="varlen",
            role="preset-8gb",
        ),
    ]


# ----------------------------------------------------------------------------------------------
# Data: MedQuAD lengths and batch layouts


def load_token_lengths(path: str | os.PathLike | None = None) -> tuple[list[int], list[int]]:
    """(full lengths, prompt lengths) per example: the shipped resource, or a JSON/CSV file.

    A CSV (question, answer columns) is tokenised with the demo profile's Gemma 3 tokenizer and chat template.
    """
    if path is None:
        data = json.loads(resources.files("medgemma_lib").joinpath(LENGTHS_RESOURCE).read_text(encoding="utf-8"))
        return list(data["full"]), list(data["prompt"])
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"找不到長度檔案 {p}。", hint="請給 MedQuAD CSV（question、answer 欄位）或 bench 產生的長度 JSON。"
        )
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        return list(data["full"]), list(data["prompt"])
    return compute_token_lengths(p)


def compute_token_lengths(csv_path: str | os.PathLike, tokenizer=None) -> tuple[list[int], list[int]]:
    """Token lengths of each (question, answer) row with Gemma 3's tokenizer and turn template."""

    try:
        df = pd.read_csv(csv_path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"無法讀取 {csv_path}：{exc}", hint="請提供 UTF-8 CSV，含 question 與 answer 欄位。") from None
    if not {"question", "answer"} <= set(df.columns):
        raise DataError(
            f"{csv_path} 缺少 question 或 answer 欄位（現有：{', '.join(map(str, df.columns))}）。",
            hint="請使用 MedQuAD 格式的 CSV。",
        )
    df = df.dropna(subset=["question", "answer"])
    tok = tokenizer or load_tokenizer("demo")
    qs, ans = df["question"].astype(str).tolist(), df["answer"].astype(str).tolist()
    full_txt = [
        tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
        for q, a in zip(qs, ans)
    ]
    prompt_txt = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in qs
    ]
    full = [len(x) for x in tok(full_txt, add_special_tokens=False)["input_ids"]]
    prompt = [len(x) for x in tok(prompt_txt, add_special_tokens=False)["input_ids"]]
    return full, prompt


@dataclass
class Batch:
    """One step's tensors' recipe (token ids are drawn when the tensors are made)."""

    layout: str
    rows: list[list[tuple[int, int]]]  # per row: (length, prompt length) of each example, in order
    width: int  # tensor width (padded length or row length)

    @property
    def useful_tokens(self) -> int:
        return sum(n for row in self.rows for n, _ in row)

    @property
    def tensor_tokens(self) -> int:
        return len(self.rows) * self.width


def _truncate(full: int, prompt: int, max_length: int) -> tuple[int, int]:
    n = min(full, max_length)
    return n, min(prompt, n - 1)


def make_batches(variant: Variant, full: list[int], prompt: list[int], n_batches: int, seed: int = 0) -> list[Batch]:
    """Draw ``n_batches`` batches shaped by the real lengths, laid out as the variant says."""
    rng = random.Random(seed)
    order = list(range(len(full)))
    rng.shuffle(order)
    examples = [_truncate(full[i], prompt[i], variant.max_length) for i in order]
    bs = variant.micro_batch
    if variant.layout in ("padded", "grouped"):
        if variant.layout == "grouped":
            # transformers' LengthGroupedSampler: megabatches of 50 batches, each sorted longest first,
            # and the batch holding the longest example moved to the front.
            mega = bs * 50
            groups = [sorted(examples[i : i + mega], key=lambda e: -e[0]) for i in range(0, len(examples), mega)]
            examples = [e for g in groups for e in g]
        batches = []
        for i in range(0, len(examples) - bs + 1, bs):
            rows = [[e] for e in examples[i : i + bs]]
            batches.append(Batch(variant.layout, rows, max(r[0][0] for r in rows)))
            if len(batches) == n_batches and variant.layout == "padded":
                break
        if variant.layout == "grouped":
            # The longest batch comes first (as the sampler does); the rest are spread evenly over the
            # epoch, since the first megabatch alone (sorted longest first) is not representative.
            longest = batches.pop(max(range(len(batches)), key=lambda j: batches[j].width))
            picks = [round(k * (len(batches) - 1) / max(n_batches - 2, 1)) for k in range(n_batches - 1)]
            batches = [longest] + [batches[j] for j in picks]
        return batches
    if variant.layout != "packed":
        raise ConfigError(f"不認識的批次排列 {variant.layout!r}。", hint="請用 grouped、padded 或 packed。")
    if variant.max_length > variant.row_length:
        raise ConfigError(
            "packed 排列的 max_length 不能大於 row_length。", hint="把 max_length 設為不超過 row_length。"
        )
    # First fit over a look-ahead window keeps rows nearly full without reordering the data much.
    pending: list[tuple[int, int]] = []
    source = iter(examples)
    batches = []
    while len(batches) < n_batches:
        rows = []
        for _ in range(bs):
            row, free = [], variant.row_length
            while len(pending) < 256:
                nxt = next(source, None)
                if nxt is None:
                    break
                pending.append(nxt)
            i = 0
            while i < len(pending) and free > 0:
                if pending[i][0] <= free:
                    ex = pending.pop(i)
                    row.append(ex)
                    free -= ex[0]
                else:
                    i += 1
            if not row:
                raise DataError("資料不足以填滿一列。", hint="請用較完整的長度檔案或較少的步數。")
            rows.append(row)
        batches.append(Batch("packed", rows, variant.row_length))
    return batches


def batch_tensors(batch: Batch, vocab_size: int, device: str, seed: int = 0, varlen: bool = False) -> dict:
    """input_ids, labels and (packed) position_ids, or attention_mask (padded), for one batch.

    Labels cover answers only (the prompt and padding are -100). In packed rows the first token of
    each example has label -100 too, so no loss term crosses from one example into the next.
    """

    g = torch.Generator().manual_seed(seed)
    n_rows, width = len(batch.rows), batch.width
    ids = torch.randint(3, vocab_size, (n_rows, width), generator=g)
    ids[:, 0] = 2  # <bos>
    labels = torch.full((n_rows, width), -100, dtype=torch.long)
    out: dict[str, Any] = {}
    if batch.layout == "packed":
        pos = torch.zeros((n_rows, width), dtype=torch.long)
        seq_lens: list[int] = []
        for r, row in enumerate(batch.rows):
            start = 0
            for n, p in row:
                ids[r, start] = 2
                pos[r, start : start + n] = torch.arange(n)
                labels[r, start + p : start + n] = ids[r, start + p : start + n]
                seq_lens.append(n)
                start += n
            if start < width:  # the row's unused tail: its own segment, never labelled nor counted
                ids[r, start:] = 0
                pos[r, start:] = torch.arange(width - start)
                seq_lens.append(width - start)
        out["position_ids"] = pos
        if varlen:
            cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
            out["cu_seq_lens_q"] = cu.to(device)
            out["cu_seq_lens_k"] = out["cu_seq_lens_q"]
            out["max_length_q"] = out["max_length_k"] = max(seq_lens)
    else:
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        for r, row in enumerate(batch.rows):
            n, p = row[0]
            mask[r, :n] = 1
            ids[r, n:] = 0
            labels[r, p:n] = ids[r, p:n]
        out["attention_mask"] = mask
    out["input_ids"] = ids
    out["labels"] = labels
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Running one variant


def make_optimizer(params, name: str, device: str):
    """AdamW (fused on CUDA when ``name`` says so) or bitsandbytes' 8-bit AdamW, at the presets' learning rate."""
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)
    fused = name == "adamw_fused" and device.startswith("cuda")
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=fused or None)


class _LigerPatch:
    """Apply Liger's Gemma 3 kernels to a model instance and undo the module-level patches later."""

    _NAMES = ("apply_rotary_pos_emb", "Gemma3RMSNorm", "Gemma3MLP")

    def __init__(self):
        self.mod = modeling_gemma3
        self.saved = {n: getattr(modeling_gemma3, n) for n in self._NAMES}
        self.saved_forward = modeling_gemma3.Gemma3ForCausalLM.forward

    def apply(self, model) -> None:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_gemma3_text
        except ImportError:
            raise ResourceError(
                "未安裝 liger-kernel，無法測量 Liger 變體。",
                hint="在 CUDA 機器上 pip install liger-kernel==0.8.5，或不選 Liger 變體。",
            ) from None
        apply_liger_kernel_to_gemma3_text(model=model)

    def restore(self) -> None:
        for n, v in self.saved.items():
            setattr(self.mod, n, v)
        self.mod.Gemma3ForCausalLM.forward = self.saved_forward


def run_variant(
    model, arch_info: dict, variant: Variant, full: list[int], prompt: list[int], device: str, seed: int = 0, log=print
) -> dict:
    """Add LoRA, train ``warmup + steps`` steps, remove LoRA again; returns the variant's results."""

    cuda = device.startswith("cuda")
    config = model.config
    batches = make_batches(variant, full, prompt, variant.warmup + variant.steps, seed=seed)
    config._attn_implementation = register_varlen_attention() if variant.attn == "varlen" else "sdpa"
    for m in model.modules():
        if hasattr(m, "config") and getattr(m, "config", None) is not None and m.config is not config:
            if hasattr(m.config, "_attn_implementation") and m.config.model_type == config.model_type:
                m.config._attn_implementation = config._attn_implementation
    if variant.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    lora = LoraConfig(
        r=variant.lora_r,
        lora_alpha=2 * variant.lora_r,
        lora_dropout=variant.lora_dropout,
        target_modules=list(variant.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], variant.optim, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    times, useful, tensor_tokens, losses = [], [], [], []
    result: dict[str, Any] = {
        "name": variant.name,
        "variant": dataclasses.asdict(variant),
        "summary": variant.short(),
        "trainable_params": trainable,
    }
    try:
        for i, batch in enumerate(batches):
            inputs = batch_tensors(
                batch, config.vocab_size, device, seed=seed * 100_003 + i, varlen=variant.attn == "varlen"
            )
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = peft_model(**inputs)
            out.loss.backward()
            if cuda:
                torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i >= variant.warmup:
                times.append(dt)
                useful.append(batch.useful_tokens)
                tensor_tokens.append(batch.tensor_tokens)
            losses.append(float(out.loss.detach()))
            del out, inputs
        result["oom"] = False
    except torch.OutOfMemoryError:
        result["oom"] = True
        log(f"  {variant.name}: GPU 記憶體不足（OOM），已略過")
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        for p in peft_model.parameters():
            p.grad = None
        base = peft_model.unload()
        assert base is model
        model.gradient_checkpointing_disable()
        del peft_model, base
        gc.collect()  # free this variant's graph now, not during the next one's timed steps
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        result["weights_allocated_gib"] = round(base_alloc / 2**30, 2)
        torch.cuda.empty_cache()
    if result["oom"]:
        return result
    total_useful, total_time = sum(useful), sum(times)
    tok_s = total_useful / total_time
    matmul = arch_info["matmul_params"]
    flop_per_token = (6 if variant.grad_ckpt else 4) * matmul
    tflops = arch_info.get("matmul_tflops", MATMUL_TFLOPS_H200)
    ceiling = tflops * 1e12 / flop_per_token
    epoch_tokens = sum(min(n, variant.max_length) for n in full)
    result.update(
        {
            "steps_measured": len(times),
            "warmup_steps": variant.warmup,
            "useful_tokens_per_step": round(total_useful / len(times), 1),
            "tensor_tokens_per_step": round(sum(tensor_tokens) / len(times), 1),
            "padding_share": round(1 - total_useful / sum(tensor_tokens), 4),
            "useful_tokens_per_s": round(tok_s, 1),
            "step_s_median": round(statistics.median(times), 4),
            "step_s_mean": round(total_time / len(times), 4),
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
            "loss_finite": all(math.isfinite(x) for x in losses),
            "compute_ceiling_tokens_per_s": round(ceiling, 1),
            "share_of_ceiling": round(tok_s / ceiling, 3),
            "epoch_tokens": epoch_tokens,
            "truncated_share": round(1 - epoch_tokens / sum(full), 4),
            "epoch_hours": round(epoch_tokens / tok_s / 3600, 2),
        }
    )
    return result


def measure_matmul_tflops(device: str) -> float | None:
    """bf16 8192^3 matrix product rate on random data (mean of 10 after 3 warm-ups)."""

    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    rate = 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return round(rate, 1)


def environment() -> dict:
    """The header of every benchmark file: date, Python, GPU, the versions that decide speed, attention, allocator."""
    facts = machine_facts()
    gpu = facts["gpus"][0] if facts["gpus"] else None
    env = {
        "date": date.today().isoformat(),
        "python": facts["python"],
        "versions": package_versions(BENCH_PACKAGES),
        "varlen": varlen_support(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "gpu": gpu["name"] if gpu else None,
    }
    if gpu:
        env["gpu_memory_gib"] = gpu["memory_gib"]
    return env


def run_bench(
    archs: list[str],
    device: str | None = None,
    variants: list[str] | None = None,
    lengths: str | None = None,
    out_dir: str | os.PathLike = "results/bench",
    seed: int = 0,
    steps: int | None = None,
    warmup: int | None = None,
    log=print,
) -> dict:
    """Run the benchmark for each architecture; writes ``bench.json`` and ``bench.md`` into ``out_dir``."""

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError("指定了 CUDA，但這台機器沒有可用的 GPU。", hint="改用 --device cpu 與 --arch tiny。")
    full, prompt = load_token_lengths(lengths)
    results: dict[str, Any] = {"command": "python -m medgemma_lib bench", "environment": environment(), "archs": {}}
    results["environment"]["lengths"] = {
        "source": lengths or LENGTHS_RESOURCE,
        "examples": len(full),
        "tokens": sum(full),
    }
    tflops = measure_matmul_tflops(device)
    results["environment"]["matmul_tflops_measured"] = tflops
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        arch = BENCH_ALIASES.get(arch, arch)
        model, info = build_model(arch, device, seed=seed)
        info["matmul_tflops"] = tflops or MATMUL_TFLOPS_H200
        log(f"[{arch}] 建立模型 {info['build_seconds']} 秒，權重 {info['weights_gib']} GiB")
        chosen = default_variants(arch)
        if variants:
            chosen = [v for v in chosen if v.name in variants]
            if not chosen:
                raise ConfigError(
                    f"沒有符合的變體：{variants}", hint=f"可用：{', '.join(v.name for v in default_variants(arch))}"
                )
        chosen = sorted(chosen, key=lambda v: v.liger)  # Liger patches the instance: run those last
        liger = None
        rows = []
        for v in chosen:
            if steps is not None:
                v = dataclasses.replace(v, steps=steps)
            if warmup is not None:
                v = dataclasses.replace(v, warmup=warmup)
            if v.liger and liger is None:
                liger = _LigerPatch()
                liger.apply(model)
            r = run_variant(model, info, v, full, prompt, device, seed=seed, log=log)
            rows.append(r)
            log(row_line(arch, r))
            results["archs"][arch] = {"model": info, "variants": rows}
            write_results(results, out)
        if liger is not None:
            liger.restore()
        _add_ratios(results["archs"][arch])
        write_results(results, out)
        del model, chosen, liger
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    log(render_markdown(results))
    return results


def _add_ratios(arch_result: dict) -> None:
    base = next((r for r in arch_result["variants"] if r["name"] == "original" and not r.get("oom")), None)
    for r in arch_result["variants"]:
        if base and not r.get("oom"):
            r["x_original"] = round(r["useful_tokens_per_s"] / base["useful_tokens_per_s"], 2)


def row_line(arch: str, r: dict) -> str:
    """One variant's result as the log line printed while the benchmark runs."""
    if r.get("oom"):
        return f"  [{arch}] {r['name']}: OOM"
    mem = f"，峰值 {r.get('peak_allocated_gib')}/{r.get('peak_reserved_gib')} GiB" if "peak_reserved_gib" in r else ""
    return (
        f"  [{arch}] {r['name']}: {r['useful_tokens_per_s']} 有效 token/秒，每步 {r['step_s_median']} 秒"
        f"（量測 {r['steps_measured']} 步，暖身 {r['warmup_steps']} 步）{mem}"
    )


def render_markdown(results: dict) -> str:
    """``bench.md``: the environment line, then one table row per arch and variant."""
    env = results["environment"]
    v = env["versions"]
    head = (
        f"GPU: {env.get('gpu') or 'CPU'}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, "
        f"bitsandbytes {v.get('bitsandbytes')}, liger-kernel {v.get('liger-kernel')}; {env['date']}; "
        f"bf16 matmul {env.get('matmul_tflops_measured')} TFLOP/s measured\n\n"
    )
    lines = [
        "| arch | variant | setting | steps (warm-up) | useful tok/step | padding | useful tok/s | × original | "
        "share of ceiling | step s (median) | peak alloc GiB | peak reserved GiB | epoch h |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, a in results["archs"].items():
        for r in a["variants"]:
            if r.get("oom"):
                lines.append(
                    f"| {arch} | {r['name']} | {r['summary']} | OOM | | | | | | | "
                    f"{r.get('peak_allocated_gib', '')} | {r.get('peak_reserved_gib', '')} | |"
                )
                continue
            lines.append(
                f"| {arch} | {r['name']} | {r['summary']} | {r['steps_measured']} ({r['warmup_steps']}) | "
                f"{r['useful_tokens_per_step']:.0f} | {r['padding_share']:.1%} | {r['useful_tokens_per_s']:.0f} | "
                f"{r.get('x_original', '')} | {r['share_of_ceiling']:.0%} | {r['step_s_median']} | "
                f"{r.get('peak_allocated_gib', '')} | {r.get('peak_reserved_gib', '')} | {r['epoch_hours']} |"
            )
    return head + "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    """``bench.json`` and ``bench.md`` in ``out`` (after every variant, so a killed run keeps what it measured)."""
    write_json(out / "bench.json", results)
    write_text(out / "bench.md", render_markdown(results))


def packed_matches_unpacked(
    arch: str = "tiny",
    device: str = "cpu",
    attn: str = "sdpa",
    lengths=(5, 9, 3),
    seed: int = 0,
    restart_positions: bool = True,
) -> float:
    """Largest logit difference (relative to the largest logit) between examples packed in one row and
    the same examples run one at a time; near rounding when packing keeps examples apart."""

    model, _ = build_model(arch, device, quantize=False, seed=seed)
    # Flash kernels take bf16 only; on CPU compare in float32.
    model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).eval()
    v = Variant("check", "", micro_batch=1, max_length=max(lengths), row_length=sum(lengths) + 2, attn=attn)
    batch = Batch("packed", [[(n, 1) for n in lengths]], v.row_length)
    inputs = batch_tensors(batch, model.config.vocab_size, device, seed=seed, varlen=attn == "varlen")
    if not restart_positions:  # negative control: one long sequence, so later examples see earlier ones
        width = inputs["input_ids"].shape[1]
        inputs["position_ids"] = torch.arange(width, device=device)[None]
        if attn == "varlen":
            inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = torch.tensor(
                [0, width], dtype=torch.int32, device=device
            )
            inputs["max_length_q"] = inputs["max_length_k"] = width
    model.config._attn_implementation = register_varlen_attention() if attn == "varlen" else "sdpa"
    worst = 0.0
    with torch.no_grad():
        packed = model(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            **{k: inputs[k] for k in inputs if k.startswith(("cu_", "max_"))},
        ).logits
        model.config._attn_implementation = "sdpa"
        start = 0
        for n in lengths:
            alone = model(input_ids=inputs["input_ids"][:, start : start + n]).logits
            diff = (alone.float() - packed[:, start : start + n].float()).abs().max() / alone.float().abs().max()
            worst = max(worst, diff.item())
            start += n
    return worst
