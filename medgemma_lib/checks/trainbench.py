"""The product's own training path, timed: ``training.train.run_training`` on random-weight architectures.

``python -m medgemma_lib trainbench`` (beside the throughput benchmark, :mod:`medgemma_lib.checks.bench`)
lands here. Each row is one ``run_training`` call: the preset's YAML with a few overrides, the same
``LeanSFTTrainer``, collator, packing, Liger kernels, varlen attention, loss and optimizer as a real run.
What is not the product's:

* the model: :func:`medgemma_lib.checks.random_models.build_model` (the real architecture, random weights, NF4
  exactly as loading quantises a checkpoint), presented to ``run_training`` through a folder holding its
  ``config.json``;
* the data: prompt/completion records whose token lengths are those of the real MedQuAD pairs under the
  Gemma 3 chat template (``resources/medquad_token_lengths.json``), written in a word-level tokenizer
  (:func:`synthetic_tokenizer`) where each word is one token, so a record tokenises to exactly its MedQuAD
  length (tested);
* per-step timing: a callback that synchronises the GPU at each optimizer step's start and end.

Useful tokens are real tokens (packing is padding-free): TRL's ``num_tokens`` between the end of the
warm-up and the last step, over the synchronised time between them. Warm-up steps carry the compile time
of ``train.compile_layers``, reported apart (``warmup_s``). :func:`lever_gradients` checks a lever on the
same batch against the preset without it (LoRA gradients, tensor by tensor).
"""

from __future__ import annotations

import gc
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from datasets import Dataset, DatasetDict
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, TrainerCallback

from medgemma_lib.checks import bench
from medgemma_lib.checks.random_models import build_model, text_config
from medgemma_lib.core.atomic import write_json, write_text
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import ConfigError, ResourceError
from medgemma_lib.core.profiles import BOS_ID, EOS_ID, PAD_ID
from medgemma_lib.models import loading as models
from medgemma_lib.models import lora_kernels, norm_kernels
from medgemma_lib.training import train, trainer

UNK_ID = 3
SPECIAL = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": UNK_ID}
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
FIRST_WORD = max(SPECIAL.values()) + 1


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w4 … w{vocab_size-1}``: one word, one token; the chat template adds ``<bos>``."""
    vocab = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def synthetic_datasets(full: list[int], prompt: list[int], n_examples: int, vocab_size: int, seed: int = 0):
    """``n_examples`` prompt/completion records drawn (seeded) from the MedQuAD lengths; returns (datasets, lengths).

    A record of MedQuAD length ``n`` with a prompt of ``p`` tokens holds ``p - 1`` prompt words (the template
    adds ``<bos>``) and ``n - p`` answer words, each a random token id.
    """
    rng = random.Random(seed)
    picks = [rng.randrange(len(full)) for _ in range(n_examples)]
    rows, lengths = [], []
    for i in picks:
        n, p = full[i], max(2, min(prompt[i], full[i] - 1))
        words = [f"w{rng.randrange(FIRST_WORD, vocab_size)}" for _ in range(n - 1)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": " ".join(words[: p - 1])}],
                "completion": [{"role": "assistant", "content": " ".join(words[p - 1 :])}],
            }
        )
        lengths.append((n, p))
    return DatasetDict({"train": Dataset.from_list(rows)}), lengths


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, the GPU synchronised at its start and end."""

    def __init__(self, device: str, profile_step: int | None = None):
        self.cuda = device.startswith("cuda")
        self.profile_step = profile_step  # 0-based optimizer step to record with torch.profiler (None: none)
        self.profiler = None
        self.profile: dict | None = None
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.graphs: list[int] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        # Two recorded steps after the timed ones: the first as it runs (kernel time, GPU busy share), the second
        # with every Python function timed too (with_stack: host time by library, which slows that step down).
        if self.profile_step is not None and len(self.starts) in (self.profile_step, self.profile_step + 1):
            kinds = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                kinds.append(torch.profiler.ProfilerActivity.CUDA)
            python = len(self.starts) == self.profile_step + 1
            self.profiler = torch.profiler.profile(activities=kinds, with_stack=python)
            self.profiler.__enter__()
        self.starts.append(self._now())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            summary = profile_summary(self.profiler, self.ends[-1] - self.starts[-1])
            if self.profile is None:
                self.profile = summary
            else:  # the step with Python functions: only where the host's time goes
                self.profile["python_step"] = {
                    k: summary[k] for k in ("wall_ms", "cpu_self_ms", "host_ms_by_library", "top_cpu_ops")
                }
            self.profiler = None
        self.graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))  # a recompile adds graphs


# What a CUDA kernel's name says it does (first match wins), for the profile's "where the time goes". In
# the H200 runs of 2026-12-04 Liger's kernels fell under "other" (docs/benchmarks.md says so where it shows them).
KERNEL_KINDS = [
    ("copies", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "attention")),
    ("NF4 dequantisation", ("dequantize", "kdequant")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul")),
    # Liger's kernels are named after their Python functions (_rms_norm_backward_kernel, _geglu_tanh_forward_kernel)
    ("fused Triton kernels (Liger, inductor)", ("triton", "_rms_norm", "_geglu", "_rope", "liger")),
    ("other element-wise and reductions", ()),
]


_PY_FUNCTION = re.compile(r"^(?P<path>[^<(][^(]*)\((?P<line>\d+)\): ")
HOST_LIBRARIES = (
    "medgemma_lib",
    "transformers",
    "peft",
    "trl",
    "liger_kernel",
    "bitsandbytes",
    "accelerate",
    "triton",
    "unsloth",
    "unsloth_zoo",
    "datasets",
    "torch",
)


def short_key(key: str) -> str:
    """A CPU event's name without what names the machine: a Python function's path from its library on
    ("/root/.local/…/site-packages/peft/x.py(3): f" → "peft/x.py(3): f"), no object addresses."""
    key = re.sub(r" at 0x[0-9a-fA-F]+", "", key)
    m = _PY_FUNCTION.match(key)
    if m:
        parts = m.group("path").replace("\\", "/").split("/")
        i = next((i for i, p in enumerate(parts[:-1]) if p in HOST_LIBRARIES), None)
        rest = key[m.end("path") :]
        key = "/".join(parts[i:]) + rest if i is not None else parts[-1] + rest
    return key


def host_library(key: str) -> str:
    """Who spent a CPU event's own time: the library of a Python function ("transformers/…/x.py(12): forward" →
    transformers), other Python (built-ins, the standard library), or C++ (ATen operators, autograd, the CUDA
    runtime)."""
    m = _PY_FUNCTION.match(key)
    if m:
        parts = [p for p in m.group("path").replace("\\", "/").split("/") if p]
        return next((p for p in parts[:-1] if p in HOST_LIBRARIES), "Python built-ins and other Python")
    if key.startswith("<"):
        return "Python built-ins and other Python"
    return "C++: ATen, autograd, CUDA runtime"


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, words in KERNEL_KINDS:
        if any(w in low for w in words):
            return kind
    return KERNEL_KINDS[-1][0]


def profile_summary(prof, wall_s: float, top: int = 12) -> dict:
    """Where one step's time goes: GPU kernel time against the step's wall time, by kind of kernel, and the
    operators that launched the most of it.

    The profiler lists each kernel twice: as a device event and inside the operator that launched it (an
    operator's ``self_device_time_total``); kernel time is summed over the device events only.
    ``gpu_busy_share`` well below 1 means the GPU waits for the CPU to launch work (Python, dispatch,
    kernel launches); near 1, the step is bound by the GPU's arithmetic or memory."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    cpu_us = sum(e.self_cpu_time_total for e in ops)
    launches = sum(e.count for e in ops if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    by_op = sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    by_kernel = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    host: dict[str, float] = {}
    own: dict[str, list] = {}  # per short_key: built-ins merged over objects, paths from the library on
    for e in ops:
        lib = host_library(e.key)
        host[lib] = host.get(lib, 0.0) + e.self_cpu_time_total
        entry = own.setdefault(short_key(e.key), [0, 0.0])
        entry[0] += e.count
        entry[1] += e.self_cpu_time_total
    by_cpu = sorted(own.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {
        "wall_ms": round(wall_s * 1000, 1),
        "gpu_kernel_ms": round(gpu_us / 1000, 1),
        "cpu_self_ms": round(cpu_us / 1000, 1),
        "gpu_busy_share": round(gpu_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
        "kernel_launches": int(launches),
        "gpu_ms_by_kind": {k: round(v / 1000, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_gpu_ops": [
            {
                "op": e.key[:80],
                "calls": int(e.count),
                "gpu_ms": round(e.self_device_time_total / 1000, 2),
                "cpu_ms": round(e.self_cpu_time_total / 1000, 2),
            }
            for e in by_op
        ],
        "top_kernels": [
            {
                "kernel": e.key[:100],
                "kind": kernel_kind(e.key),
                "calls": int(e.count),
                "gpu_ms": round(e.self_device_time_total / 1000, 2),
            }
            for e in by_kernel
        ],
        # Where the host's time goes: operators, autograd functions, CUDA runtime calls and (recorded with
        # with_stack) Python functions by their own CPU time; a Triton launch counts in the Python that calls it.
        "host_ms_by_library": {k: round(v / 1000, 1) for k, v in sorted(host.items(), key=lambda kv: -kv[1])},
        "top_cpu_ops": [
            {"op": key[:80], "calls": int(calls), "cpu_ms": round(us / 1000, 2)} for key, (calls, us) in by_cpu
        ],
    }


def model_folder(arch_config, root: Path) -> Path:
    """A folder ``run_training`` accepts as the model: the architecture's ``config.json`` and a whole (tiny)
    safetensors file. Nothing is loaded from it (the model is passed in)."""
    folder = root / "model"
    folder.mkdir(parents=True, exist_ok=True)
    arch_config.architectures = ["Gemma3ForCausalLM"]
    arch_config.save_pretrained(folder)
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


BENCH_OVERRIDES = [
    "train.logging_steps=1",  # one log line a step: TRL's token count at every step
    "train.eval_steps=1000000",
    "train.save_steps=1000000",
    "train.report_to=[]",
    "train.auto_oom_retry=false",  # an OOM is a result, not something to hide
]


CARD_MARGIN_GIB = 1.0  # what a card's driver, CUDA context and display keep: the allocator gets the rest
CARD_FILL_LIMIT = 0.95  # a preset keeps its peak reserved memory at most this share of its card's cap


def card_cap_gib(card_gib: float) -> float:
    """The allocator cap that stands for a card of ``card_gib`` GB-class memory: the card less the margin."""
    return float(card_gib) - CARD_MARGIN_GIB


def card_fit(card_gib: float | None, cap_gib: float | None, peak_reserved_gib: float | None) -> dict:
    """The row's card facts: the card, the cap applied (None: not applied, e.g. on a CPU), the margin left under the
    cap, and whether the peak stayed within :data:`CARD_FILL_LIMIT` of the cap."""
    if not card_gib:
        return {}
    fits = None
    margin = None
    if cap_gib is not None and peak_reserved_gib is not None:
        margin = round(cap_gib - peak_reserved_gib, 3)
        fits = peak_reserved_gib <= CARD_FILL_LIMIT * cap_gib
    return {"card_gib": card_gib, "cap_gib": cap_gib, "margin_gib": margin, "fits_card": fits}


def cap_fraction(card_gib: float, device: str) -> float | None:
    """The share of this GPU that :func:`card_cap_gib` is (None on a CPU: nothing to cap); a GPU smaller than the
    card is refused in Chinese before anything runs."""
    if not device.startswith("cuda"):
        return None
    total_gib = torch.cuda.get_device_properties(_cuda_index(device)).total_memory / 2**30
    cap = card_cap_gib(card_gib)
    if cap > total_gib:
        raise ConfigError(
            f"這張 GPU 只有 {total_gib:.1f} GiB，量不了 {card_gib:g} GB 的卡（上限 {cap:g} GiB）。",
            hint="請用記憶體更大的 GPU，或把 --card-gib 改小。",
        )
    return cap / total_gib


def cap_allocator(card_gib: float, device: str) -> float | None:
    """Cap this process's CUDA caching allocator at :func:`card_cap_gib` (``set_per_process_memory_fraction``,
    which bounds everything the process holds, the model included); the cap in GiB, or None on a CPU."""
    fraction = cap_fraction(card_gib, device)
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, _cuda_index(device))
    return card_cap_gib(card_gib)


def _cuda_index(device: str) -> int:
    """``cuda`` → the current device's index; ``cuda:1`` → 1 (the allocator cap needs an index)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def run_preset(
    arch: str,
    preset: str,
    overrides: list[str],
    *,
    name: str,
    device: str,
    full: list[int],
    prompt: list[int],
    steps: int = 8,
    warmup: int = 3,
    seed: int = 0,
    profile: bool = False,
    card_gib: float | None = None,
    log=print,
) -> dict:
    """One ``run_training`` call of ``preset`` (+ ``overrides``) on a random-weight ``arch``; its row.

    ``card_gib``: the card the preset is for; on CUDA the caching allocator is capped at :func:`card_cap_gib` of it
    (model included) for this row, so a bigger GPU measures what that card would hold.
    """
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = text_config(arch)
        folder = model_folder(config, root)
        cfg = load_config(
            preset,
            [
                f"model.profile={folder}",
                f"train.output_dir={root / 'runs'}",
                f"train.run_name={name}",
                f"train.max_steps={warmup + steps + (2 if profile else 0)}",  # + two profiled steps after the timed
                "train.warmup_ratio=0.0",
                *BENCH_OVERRIDES,
                *overrides,
            ],
        )
        t = cfg.train
        row_tokens = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.max_length
        need = int((warmup + steps + 2) * row_tokens / (statistics.mean(full) * 0.97)) + 64
        datasets, lengths = synthetic_datasets(full, prompt, need, config.vocab_size, seed=seed)
        tokenizer = synthetic_tokenizer(config.vocab_size)
        model, info = build_model(arch, device, seed=seed)
        cap = cap_allocator(card_gib, device) if card_gib else None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        last = warmup + steps  # steps [warmup, last) are timed; with --profile, steps last, last + 1 are recorded
        timer = StepTimer(device, profile_step=last if profile else None)
        started = time.perf_counter()
        error = None
        try:
            result = train.run_training(
                cfg, datasets=datasets, model=model, tokenizer=tokenizer, callbacks=[timer], verbose=False
            )
        except (torch.OutOfMemoryError, ResourceError) as exc:  # a setting that does not fit is a row of its own
            # run_training turns an out-of-memory into a Chinese ResourceError when it does not retry
            result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        wall = time.perf_counter() - started
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, _cuda_index(device))
        # run_training's monitor resets the peak at every log: its own maximum over the steps is the run's peak.
        mem = result.memory if result is not None else {}
        peak_alloc = (
            max(mem.get("peak_allocated_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30) if cuda else None
        )
        peak_res = max(mem.get("peak_reserved_gib", 0.0), torch.cuda.max_memory_reserved() / 2**30) if cuda else None
        row = {
            "name": name,
            "arch": arch,
            "preset": preset,
            "overrides": list(overrides),
            "path": "run_training",
            "micro_batch": t.per_device_train_batch_size,
            "grad_accum": t.gradient_accumulation_steps,
            "row_length": t.max_length,
            "max_example_length": t.max_example_length,
            "grad_ckpt": t.gradient_checkpointing,
            "liger": t.use_liger_kernel,
            "activation_offloading": t.activation_offloading,
            "compile_layers": t.compile_layers,
            "fused_lora": t.fused_lora,
            "optim": t.optim,
            "steps": steps,
            "warmup": warmup,
            "examples_drawn": len(lengths),
            "build": info,
            "wall_s": round(wall, 1),
            "peak_allocated_gib": round(peak_alloc, 3) if cuda else None,
            "peak_reserved_gib": round(peak_res, 3) if cuda else None,
            "error": error,
            **card_fit(card_gib, cap, peak_res if cuda else None),
        }
        if result is not None:
            tokens = [h["num_tokens"] for h in result.trainer.state.log_history if "num_tokens" in h and "loss" in h]
            losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h and "num_tokens" in h]
            ends, starts = timer.ends[:last], timer.starts[:last]
            tokens, losses = tokens[:last], losses[:last]
            step_s = [e - s for s, e in zip(starts, ends)]
            measured = step_s[warmup:]
            useful = tokens[-1] - tokens[warmup - 1] if len(tokens) > warmup else None
            span = ends[-1] - ends[warmup - 1] if len(ends) > warmup else None
            row.update(
                {
                    "tokens_per_step": [
                        int(b - a) for a, b in zip([0, *tokens[:-1]], tokens)
                    ],  # TRL's running count, differenced
                    "losses": [round(x, 4) for x in losses],
                    "step_s": [round(x, 4) for x in step_s],
                    "useful_tokens_measured": int(useful) if useful is not None else None,
                    "useful_tok_s": round(useful / span, 1) if useful and span else None,
                    "median_step_s": round(statistics.median(measured), 4) if measured else None,
                    "warmup_s": round(sum(step_s[:warmup]), 2),
                    "compile_overhead_s": round(sum(step_s[:warmup]) - warmup * statistics.median(measured), 2)
                    if measured
                    else None,
                    "run_training_memory": result.memory,
                    "compiled_graphs_per_step": timer.graphs,
                    "profile": timer.profile,
                    "recompiles_while_measured": timer.graphs[last - 1] - timer.graphs[warmup - 1]
                    if len(timer.graphs) >= last
                    else None,
                }
            )
            del result
        log(
            f"[{arch}] {name}: "
            + (
                f"{row.get('useful_tok_s')} tok/s, step {row.get('median_step_s')} s, "
                f"reserved {row.get('peak_reserved_gib')} GiB, warm-up {row.get('warmup_s')} s"
                if error is None
                else error
            )
        )
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # compiled code holds the model's layers
    return row


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def lever_gradients(
    arch: str,
    preset: str,
    levers: dict[str, list[str]],
    *,
    device: str,
    full: list[int],
    prompt: list[int],
    base: list[str] | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    """LoRA gradients of one packed batch through ``LeanSFTTrainer.training_step``: the preset, then each lever
    on the same model and batch; per lever the largest relative difference over all LoRA tensors
    (``max |g_lever - g_preset| / max |g_preset|`` per tensor). LoRA B starts random (with B = 0 every A
    gradient is zero and proves nothing)."""
    out: dict = {"arch": arch, "preset": preset, "levers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = text_config(arch)
        folder = model_folder(config, root)
        base_overrides = [
            f"model.profile={folder}",
            f"train.output_dir={root / 'runs'}",
            *BENCH_OVERRIDES,
            *(base or []),
        ]
        cfg = load_config(preset, base_overrides)
        datasets, _ = synthetic_datasets(full, prompt, 400, config.vocab_size, seed=seed)
        tokenizer = synthetic_tokenizer(config.vocab_size)
        model, _info = build_model(arch, device, seed=seed)
        profile, _ = models.resolve_profile(str(folder))
        model = trainer.prepare_model_for_training(cfg, model, profile, device, verbose=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        train_ds = train.conversational_only(datasets["train"])

        def grads(run_cfg):
            tr = trainer.build_trainer(run_cfg, root / "runs", device, model, tokenizer, train_ds, None, [], 1, 1)
            batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
            n_items = int((batch["labels"][:, 1:] != -100).sum())
            model.zero_grad(set_to_none=True)
            loss = tr.training_step(model, dict(batch), torch.tensor(n_items, device=batch["labels"].device))
            g = _lora_grads(model)
            model.zero_grad(set_to_none=True)
            return float(loss.detach()), g, int(batch["input_ids"].shape[1])

        loss0, g0, width = grads(cfg)
        out.update({"loss": loss0, "row_tokens": width, "tensors": len(g0)})
        for name, extra in levers.items():
            lever_cfg = load_config(preset, [*base_overrides, *extra])
            if lever_cfg.train.compile_layers:
                trainer.compile_decoder_layers(model)
            if lever_cfg.train.fused_lora:
                lora_kernels.fuse_lora_layers(model)
            if lever_cfg.train.fused_rms_norm:
                norm_kernels.fuse_rms_norms(model)
            loss1, g1, _ = grads(lever_cfg)
            lora_kernels.unfuse_lora_layers(model)  # the next lever starts from PEFT's layers again
            norm_kernels.unfuse_rms_norms(model)  # and from transformers' norms
            worst, where, worst_norm, num, den = 0.0, None, 0.0, 0.0, 0.0
            for k, a in g0.items():
                d = float((g1[k] - a).abs().max() / a.abs().max().clamp(min=1e-30))
                if d > worst:
                    worst, where = d, k
                diff2, ref2 = float((g1[k] - a).pow(2).sum()), float(a.pow(2).sum())
                worst_norm = max(worst_norm, (diff2 / max(ref2, 1e-60)) ** 0.5)
                num, den = num + diff2, den + ref2
            out["levers"][name] = {
                "overrides": extra,
                "loss": loss1,
                "max_rel_diff": worst,  # max |Δ| / max |g| of the worst tensor
                "worst_tensor": where,
                "max_rel_norm_diff": worst_norm,  # ‖Δ‖ / ‖g‖ of the worst tensor
                "rel_norm_diff_all": (num / max(den, 1e-60)) ** 0.5,  # over all LoRA gradients together
            }
            log(
                f"[{arch}] gradients {name}: loss {loss1:.5f} vs {loss0:.5f}, largest rel. diff {worst:.2e}, "
                f"worst tensor ‖Δ‖/‖g‖ {worst_norm:.2e}, all {out['levers'][name]['rel_norm_diff_all']:.2e}"
            )
    model = None  # noqa: F841 - free the model before the next row
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    shutil.rmtree(root, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# The rows of one run per architecture

ACC1 = "train.gradient_accumulation_steps=1"  # one micro-batch per timed step (the optimizer steps 8× as often)
NO_LIGER = "train.use_liger_kernel=false"
OFFLOAD = "train.activation_offloading=true"
COMPILE = "train.compile_layers=true"
FUSED = "train.fused_lora=true"
PEFT = "train.fused_lora=false"  # PEFT's own LoRA forward
NORM = "train.fused_rms_norm=true"  # torch's fused RMSNorm instead of Liger's
NO_CKPT = "train.gradient_checkpointing=false"

EAGER = "train.compile_layers=false"
NO_OFFLOAD = "train.activation_offloading=false"

# Row names say how a row differs from the preset as shipped (2026-12-04: 4B 8 GB offloads its checkpointed inputs,
# uncompiled; 27B 24 GB offloads at 1×4096; 27B 141 GB runs 1×6144 rows; these three use train.fused_lora).
ROWS: dict[str, list[tuple[str, str, list[str]]]] = {
    "4b": [
        ("8gb", "configs/medgemma-4b-8gb.yaml", [ACC1]),
        ("8gb-peft", "configs/medgemma-4b-8gb.yaml", [ACC1, PEFT]),
        ("8gb-norm", "configs/medgemma-4b-8gb.yaml", [ACC1, NORM]),
        ("8gb-norm-no-liger", "configs/medgemma-4b-8gb.yaml", [ACC1, NORM, NO_LIGER]),
        ("8gb-no-offload", "configs/medgemma-4b-8gb.yaml", [ACC1, NO_OFFLOAD]),
        ("8gb-compile", "configs/medgemma-4b-8gb.yaml", [ACC1, NO_OFFLOAD, COMPILE]),
        ("8gb-compile-no-liger", "configs/medgemma-4b-8gb.yaml", [ACC1, NO_OFFLOAD, COMPILE, NO_LIGER]),
        (
            "8gb-2x8192-compile",
            "configs/medgemma-4b-8gb.yaml",
            [ACC1, NO_OFFLOAD, COMPILE, NO_LIGER, "train.per_device_train_batch_size=2"],
        ),
        ("24gb", "configs/medgemma-4b-24gb.yaml", [ACC1]),
        ("24gb-no-ckpt", "configs/medgemma-4b-24gb.yaml", [ACC1, NO_CKPT]),
        (
            "24gb-no-ckpt-1x8192",
            "configs/medgemma-4b-24gb.yaml",
            [ACC1, NO_CKPT, "train.per_device_train_batch_size=1"],
        ),
        (
            "24gb-no-ckpt-1x4096",
            "configs/medgemma-4b-24gb.yaml",
            [ACC1, NO_CKPT, "train.per_device_train_batch_size=1", "train.max_length=4096"],
        ),
        ("24gb-fused-norm", "configs/medgemma-4b-24gb.yaml", [ACC1, FUSED, NORM]),
        ("141gb", "configs/medgemma-4b-141gb.yaml", [ACC1]),
        ("141gb-fused-norm", "configs/medgemma-4b-141gb.yaml", [ACC1, FUSED, NORM]),
        ("141gb-compile", "configs/medgemma-4b-141gb.yaml", [ACC1, COMPILE, NO_LIGER]),
    ],
    "27b": [
        ("24gb", "configs/medgemma-27b-24gb.yaml", [ACC1]),
        ("24gb-peft", "configs/medgemma-27b-24gb.yaml", [ACC1, PEFT]),
        ("24gb-norm", "configs/medgemma-27b-24gb.yaml", [ACC1, NORM]),
        ("24gb-6144", "configs/medgemma-27b-24gb.yaml", [ACC1, "train.max_length=6144"]),
        ("24gb-6144-norm", "configs/medgemma-27b-24gb.yaml", [ACC1, "train.max_length=6144", NORM]),
        ("24gb-3072-eager", "configs/medgemma-27b-24gb.yaml", [ACC1, NO_OFFLOAD, "train.max_length=3072"]),
        ("24gb-3072-offload", "configs/medgemma-27b-24gb.yaml", [ACC1, "train.max_length=3072"]),
        (
            "24gb-3072-compile",
            "configs/medgemma-27b-24gb.yaml",
            [ACC1, NO_OFFLOAD, "train.max_length=3072", COMPILE, NO_LIGER],
        ),
        ("80gb", "configs/medgemma-27b-80gb.yaml", [ACC1]),
        ("80gb-no-ckpt-fused", "configs/medgemma-27b-80gb.yaml", [ACC1, NO_CKPT, FUSED]),
        ("141gb", "configs/medgemma-27b-141gb.yaml", [ACC1]),
        ("141gb-peft", "configs/medgemma-27b-141gb.yaml", [ACC1, PEFT]),
        ("141gb-norm", "configs/medgemma-27b-141gb.yaml", [ACC1, NORM]),
        ("141gb-4096", "configs/medgemma-27b-141gb.yaml", [ACC1, "train.max_length=4096"]),
        ("141gb-8192", "configs/medgemma-27b-141gb.yaml", [ACC1, "train.max_length=8192"]),
        ("141gb-4096-compile", "configs/medgemma-27b-141gb.yaml", [ACC1, "train.max_length=4096", COMPILE, NO_LIGER]),
    ],
    "tiny": [
        ("tiny", "configs/demo.yaml", [ACC1, "train.max_length=256", "train.max_example_length=128"]),
    ],
}
# The levers' gradients are checked against the preset in eager mode, without Liger (transformers' own kernels) and
# without offloading, on the same model and batch, in this order (compilation stays on once a lever turned it on).
GRAD_BASE = [NO_LIGER, EAGER, NO_OFFLOAD, PEFT, "train.fused_rms_norm=false"]
GRAD_LEVERS = {"same": [], "offload": [OFFLOAD], "fused": [FUSED], "norm": [NORM], "compile": [COMPILE]}


def _ceiling(row: dict, info: dict, tflops: float) -> None:
    """Share of the matmul ceiling (6 FLOPs per parameter and token with checkpointing, 4 without) and epoch time."""
    per_token = (6 if row["grad_ckpt"] else 4) * info["matmul_params"]
    ceiling = tflops * 1e12 / per_token
    row["compute_ceiling_tok_s"] = round(ceiling, 1)
    if row.get("useful_tok_s"):
        row["share_of_ceiling"] = round(row["useful_tok_s"] / ceiling, 3)


def epoch_hours(row: dict, full: list[int]) -> float | None:
    """One pass over the full MedQuAD at this row's speed, examples cut at its ``max_example_length``."""
    if not row.get("useful_tok_s"):
        return None
    cut = row.get("max_example_length") or row["row_length"]
    return round(sum(min(n, cut) for n in full) / row["useful_tok_s"] / 3600, 3)


def _yes_no(value) -> str:
    return "—" if value is None else ("yes" if value else "NO")


def markdown(results: dict) -> str:
    lines = [
        "| arch | row | path | setting | useful tok/s | × original | share of ceiling | step s (median) | "
        "warm-up s | peak alloc GiB | peak reserved GiB | card cap GiB | margin GiB | ≤ 95 % of cap | epoch min |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, res in results["archs"].items():
        base = res.get("original", {}).get("useful_tokens_per_s")
        for r in res["rows"]:
            tok = r.get("useful_tok_s") or r.get("useful_tokens_per_s")
            ratio = f"{tok / base:.2f}" if tok and base else "—"
            setting = r.get("short") or " ".join(o.split(".", 1)[-1] for o in r.get("overrides", []))
            ep = r.get("epoch_hours")
            lines.append(
                f"| {arch} | {r['name']} | {r.get('path', 'bench loop')} | {setting} | {tok or r.get('error')} | "
                f"{ratio} | {r.get('share_of_ceiling', '—')} | {r.get('median_step_s') or r.get('step_s_median')} | "
                f"{r.get('warmup_s', '—')} | {r.get('peak_allocated_gib')} | {r.get('peak_reserved_gib')} | "
                f"{r.get('cap_gib') or '—'} | {r.get('margin_gib') if r.get('margin_gib') is not None else '—'} | "
                f"{_yes_no(r.get('fits_card'))} | {round(ep * 60, 1) if ep else '—'} |"
            )
    return "\n".join(lines)


def run(
    archs: list[str],
    out_dir: str | Path,
    *,
    only: list[str] | None = None,
    grads: bool = True,
    original: bool = True,
    steps: int = 8,
    warmup: int = 3,
    budget_s: float | None = None,
    device: str | None = None,
    profile: bool = False,
    card_gib: float | None = None,
    log=print,
) -> dict:
    """Gradient check of the levers, the original recipe (bench's loop) and the preset rows through
    ``run_training``, per architecture; ``trainbench.json`` and ``trainbench.md`` in ``out_dir`` after every row."""
    started = time.perf_counter()
    device = device or models.default_device()
    if card_gib:
        cap_fraction(card_gib, device)  # a GPU smaller than the card is refused before anything runs
    full, prompt = bench.load_token_lengths()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tflops = bench.measure_matmul_tflops(device) or bench.MATMUL_TFLOPS_H200
    results: dict = {
        "command": "python -m medgemma_lib trainbench",
        "card_gib": card_gib,
        "card_cap_gib": card_cap_gib(card_gib) if card_gib else None,
        "environment": bench.environment(),
        "matmul_tflops": tflops,
        "archs": {},
    }

    def save() -> None:
        write_json(out / "trainbench.json", results)
        write_text(out / "trainbench.md", markdown(results) + "\n")

    def time_left() -> bool:
        return budget_s is None or time.perf_counter() - started < budget_s

    for arch in archs:
        res = results["archs"].setdefault(arch, {"rows": []})
        rows = [r for r in ROWS[arch] if not only or r[0] in only]
        if grads and arch != "tiny" and device.startswith("cuda") and time_left():
            res["gradients"] = lever_gradients(
                arch, rows[0][1], GRAD_LEVERS, base=GRAD_BASE, device=device, full=full, prompt=prompt, log=log
            )
            save()
        if original and time_left():
            model, info = build_model(arch, device)
            info["matmul_tflops"] = tflops
            variant = bench.original_variant(steps=3, warmup=1) if arch == "tiny" else bench.original_variant()
            row = bench.run_variant(model, info, variant, full, prompt, device, log=log)
            row.update({"path": "bench loop (reference)", "short": variant.short()})
            res["original"] = row
            res["rows"].append(row)
            del model
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            save()
        for name, preset, overrides in rows:
            if not time_left():
                log(f"[{arch}] {name}: 略過（超過 --budget-s）")
                continue
            row = run_preset(
                arch,
                preset,
                overrides,
                name=name,
                device=device,
                full=full,
                prompt=prompt,
                steps=steps,
                warmup=warmup,
                profile=profile,
                card_gib=card_gib,
                log=log,
            )
            if row.get("profile"):
                pr = row["profile"]
                log(
                    f"[{arch}] {name} profile: wall {pr['wall_ms']} ms, GPU kernels {pr['gpu_kernel_ms']} ms "
                    f"({pr['gpu_busy_share']:.0%}), {pr['kernel_launches']} launches; "
                    + ", ".join(f"{k} {v} ms" for k, v in pr["gpu_ms_by_kind"].items())
                )
            _ceiling(row, row["build"], tflops)
            row["epoch_hours"] = epoch_hours(row, full)
            res["rows"].append(row)
            save()
    log(markdown(results))
    return results
