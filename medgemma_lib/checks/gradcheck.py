"""Gradient reference check: the product's training step against a plain computation of the same loss.

*Product*: one packed batch as :func:`medgemma_lib.training.train.run_training` builds it (TRL's best-fit packing
with position ids, completion-only labels, ``LeanSFTTrainer.compute_loss``: label-only logits on CPU,
TRL's fused chunked LM head on CUDA, where Liger's kernels and varlen attention are also on), NF4 LoRA.

*Reference*: every example of that batch tokenised again on its own from the prepared records (the
chat template applied directly, labels = the completion tokens), run alone and unpacked through a
plain ``transformers`` model of the same class whose linear layers hold the **dequantised** NF4
weights, with LoRA written out as ``x·Aᵀ·Bᵀ·scale``; full logits, eager attention, fp32, standard
cross-entropy summed over all label tokens and divided by their count (what the Trainer does).

The two share no code on the paths under test (packing, masking, attention over packed rows, the
loss, bitsandbytes' matmul and its CPU inference layout, PEFT's LoRA forward), so a wrong gradient
in any of them shows as a difference. Run with ``python -m medgemma_lib gradcheck`` (table + JSON);
``tests/test_gradients.py`` runs it on CPU, ``docs/correctness.md`` has the H200 numbers.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from peft.tuners.lora import LoraLayer

from medgemma_lib.core.atomic import write_json
from medgemma_lib.data import prepare_from_config
from medgemma_lib.demo import load_demo_config
from medgemma_lib.models.loading import (
    compute_dtype,
    cpu_inference_packing_state,
    default_device,
    load_model,
    load_tokenizer,
    resolve_model,
)
from medgemma_lib.training import stopping, train
from medgemma_lib.training import trainer as trainer_parts

# Relative L2 difference allowed per LoRA tensor. fp32 on CPU: both sides compute in fp32 on the same
# dequantised weights (differences are summation order, measured ~1e-6). bf16 on CUDA: the product
# computes in bf16 (8 significant bits) against an fp32 reference.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class GradCheck:
    """The outcome of one comparison (also written as JSON)."""

    device: str
    dtype: str
    tolerance: float
    n_examples: int
    n_label_tokens: int
    row_tokens: int
    loss_product: float
    loss_reference: float
    max_rel_diff: float
    per_layer: dict = field(default_factory=dict)  # layer index -> largest relative difference of its LoRA tensors
    worst: list = field(default_factory=list)  # the five largest, with names
    after_eval_pass: bool = False
    packing_state: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.tolerance and abs(
            self.loss_product - self.loss_reference
        ) <= self.tolerance * max(1.0, self.loss_reference)

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def check_config(overrides: list[str] | None = None):
    """The demo config, changed only where a deterministic comparison needs it (no LoRA dropout)."""
    return load_demo_config(
        [
            "lora.dropout=0.0",
            "train.max_length=512",
            "data.max_train_examples=16",
            "data.max_eval_examples=4",
            *(overrides or []),
        ]
    )


def build_trainer(cfg, workdir: Path, model=None, tokenizer=None, splits=None):
    """A ``LeanSFTTrainer`` exactly as ``run_training`` builds it (same model preparation and trainer)."""

    device = default_device()
    trainer_parts.set_cpu_threads(cfg, device)
    source = resolve_model(cfg.model.profile)  # resolved once, as run_training does
    profile = source.profile
    tokenizer = tokenizer or load_tokenizer(source)
    if splits is None:
        splits, _ = prepare_from_config(cfg.data, output_dir=None, tokenizer=tokenizer)
    if model is None:
        model = load_model(source, cfg.model.quantization, device, attn_implementation=cfg.model.attn_implementation)
    # The stop token's embedding row is trained exactly when run_training would train it (the demo base: yes).
    check = stopping.check_stop_token(
        model, tokenizer, list(splits["validation"]), mode=cfg.lora.train_stop_token, max_length=cfg.train.max_length
    )
    model = trainer_parts.prepare_model_for_training(
        cfg, model, profile, device, verbose=False, token_ids=check.trained_token_ids
    )
    train_ds = train.conversational_only(splits["train"])
    eval_ds = train.conversational_only(splits["validation"])
    _randomise_lora_b(model, cfg.train.seed)
    trainer = trainer_parts.build_trainer(cfg, workdir, device, model, tokenizer, train_ds, eval_ds, [], 1, 1)
    trainer.reference_records = [_tokenise(tokenizer, r) for r in splits["train"]]
    return trainer


def _randomise_lora_b(model, seed: int) -> None:
    """LoRA starts with B = 0, where every A gradient is exactly zero and a comparison of it proves nothing:
    give B small random values (the state of any adapter after a few steps)."""

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def _tokenise(tokenizer, record) -> tuple[list[int], list[int]]:
    """(prompt ids, full ids) of a prepared record, with the chat template applied directly."""
    prompt = tokenizer.apply_chat_template(
        record["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    full = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=True, return_dict=False)
    if full[: len(prompt)] != prompt:
        raise AssertionError("the chat template does not extend the prompt: cannot derive the labels")
    return list(prompt), list(full)


def first_packed_batch(trainer) -> dict:
    """The first training batch, as the Trainer would feed it to ``compute_loss``."""
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def reference_examples(trainer, inputs) -> list[tuple[list[int], list[int]]]:
    """The examples of a packed row, tokenised again on their own: (input ids, labels with -100 on the prompt).

    Found by their prompt among the prepared records; a row segment that matches no record, or whose
    tokens differ from the record's own tokenisation, is an error (packing or truncation changed it).
    """
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, p in enumerate(inputs["position_ids"][0].tolist()) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        segment = ids[a:b]
        match = next(
            ((p, f) for p, f in trainer.reference_records if segment == f[: len(segment)] and len(segment) > len(p)),
            None,
        )
        if match is None:
            raise AssertionError(f"packed segment at {a}:{b} equals no prepared example's own tokenisation")
        prompt, full = match
        full = full[: len(segment)]  # an example cut to train.max_example_length stays cut
        out.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    return out


def product_gradients(trainer, inputs) -> tuple[float, dict]:
    """Loss and LoRA gradients of one step through the product's ``training_step``
    (its ``compute_loss`` and backward)."""

    model = trainer.model
    model.zero_grad(set_to_none=True)
    n_items = int(
        (inputs["labels"][:, 1:] != -100).sum()
    )  # what the Trainer counts for one micro-batch without accumulation
    loss = trainer.training_step(
        model, dict(inputs), torch.tensor(n_items, device=inputs["labels"].device)
    )  # compute_loss + backward
    grads = {
        _lora_key(n): p.grad.detach().float().cpu().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _lora_key(name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``
    -> ``model.layers.0.self_attn.q_proj.A``; the trained embedding rows -> ``model.embed_tokens.rows``."""
    m = re.search(r"(?:base_model\.model\.)?(.*)\.token_adapter\.trainable_tokens_delta\.[^.]+$", name)
    if m:
        return f"{m.group(1)}.rows"
    m = re.search(r"(?:base_model\.model\.)?(.*)\.lora_([AB])\.[^.]+\.weight$", name)
    if not m:
        raise AssertionError(f"unexpected trainable parameter {name}")
    return f"{m.group(1)}.{m.group(2)}"


def reference_gradients(peft_model, examples, device: str, dtype=None) -> tuple[float, dict]:
    """Loss and LoRA gradients from the plain computation described in the module docstring.

    ``dtype``: fp32 by default; bf16 measures how far plain bf16 arithmetic alone moves the gradients (the floor
    that a bf16 product can be held to, ``docs/bench/gradcheck_bf16_floor.py``)."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    base = peft_model.get_base_model()
    config = base.config.__class__.from_dict(
        {k: v for k, v in base.config.to_dict().items() if k != "quantization_config"}
    )
    config._attn_implementation = "eager"
    dtype = dtype or torch.float32
    ref = type(base)(config).to(device=device, dtype=dtype).eval()  # eval: no dropout anywhere
    with torch.no_grad():
        for name, param in ref.named_parameters():
            module_name, attr = name.rsplit(".", 1)
            src = base.get_submodule(module_name)
            if isinstance(src, LoraLayer):
                src = src.get_base_layer()
            if isinstance(src, Linear4bit) and attr == "weight":
                if getattr(src.weight.quant_state, "packing_format_for_cpu", False):
                    raise AssertionError(f"{module_name} is in bitsandbytes' CPU inference layout")
                value = dequantize_4bit(src.weight.data, src.weight.quant_state)
            else:
                value = getattr(src, attr)
            param.copy_(value.to(device=device, dtype=dtype).reshape(param.shape))
    ref.requires_grad_(False)
    lora, hooks = {}, []
    rows = {}  # embedding rows the product trains: their gradient is that of the whole (tied) embedding, at those rows
    for name, module in base.named_modules():
        adapter = getattr(module, "token_adapter", None)
        if adapter is not None and adapter.tied_adapter is None and adapter.token_indices:
            rows[f"{name}.rows"] = (
                ref.get_submodule(name).weight,
                list(adapter.token_indices[adapter.active_adapters[0]]),
            )
    for weight, _ in rows.values():
        weight.requires_grad_(True)
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapter = module.active_adapters[0]
        a = module.lora_A[adapter].weight.detach().to(device, dtype).clone().requires_grad_(True)
        b = module.lora_B[adapter].weight.detach().to(device, dtype).clone().requires_grad_(True)
        scale = float(module.scaling[adapter])
        lora[f"{name}.A"], lora[f"{name}.B"] = a, b

        def add_lora(mod, args, output, a=a, b=b, scale=scale):
            return output + scale * ((args[0] @ a.T) @ b.T)

        hooks.append(ref.get_submodule(name).register_forward_hook(add_lora))
    try:
        total = torch.zeros((), device=device)
        count = 0
        for ids, labels in examples:
            input_ids = torch.tensor([ids], device=device)
            target = torch.tensor(labels[1:], device=device)
            logits = ref(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
            total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            count += int((target != -100).sum())
        loss = total / count
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {k: v.grad.detach().float().cpu() for k, v in lora.items()}
    grads.update({k: weight.grad[ids].detach().float().cpu() for k, (weight, ids) in rows.items()})
    del ref
    return float(loss.detach()), grads


def compare(product: dict, reference: dict) -> tuple[float, dict, list]:
    """Largest relative L2 difference, per layer and overall; every LoRA tensor must be on both sides."""
    if set(product) != set(reference):
        missing = sorted(set(reference) ^ set(product))[:5]
        raise AssertionError(f"LoRA tensors differ between product and reference: {missing}")
    rows = []
    for key, ref in reference.items():
        diff = (product[key] - ref).norm() / ref.norm().clamp(min=1e-30)
        rows.append((float(diff), key))
    per_layer: dict[int, float] = {}
    for diff, key in rows:
        layer = int(_LAYER.search(key).group(1)) if _LAYER.search(key) else -1
        per_layer[layer] = max(per_layer.get(layer, 0.0), diff)
    rows.sort(reverse=True)
    return rows[0][0], dict(sorted(per_layer.items())), [{"tensor": k, "rel_diff": d} for d, k in rows[:5]]


def run_check(cfg=None, *, evaluate_first: bool = False, trainer=None, workdir: Path | None = None) -> GradCheck:
    """Compare product and reference gradients on one packed batch; ``evaluate_first`` runs the
    Trainer's evaluation pass before the step (what ``run_training`` does before training)."""

    cfg = cfg or check_config()
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if workdir is None else contextlib.nullcontext(str(workdir)) as tmp:
        trainer = trainer or build_trainer(cfg, Path(tmp))
        inputs = first_packed_batch(trainer)
        examples = reference_examples(trainer, inputs)
        # The reference first, on the weights as loaded: an evaluation pass must not change what training computes.
        loss_r, grads_r = reference_gradients(trainer.model, examples, str(inputs["input_ids"].device))
        if evaluate_first:
            trainer.evaluate()
        loss_p, grads_p = product_gradients(trainer, inputs)
    dtype = str(compute_dtype(default_device())).replace("torch.", "")
    worst_diff, per_layer, worst = compare(grads_p, grads_r)
    return GradCheck(
        device=default_device(),
        dtype=dtype,
        tolerance=TOLERANCE[dtype],
        n_examples=len(examples),
        n_label_tokens=sum(sum(t != -100 for t in lab[1:]) for _, lab in examples),
        row_tokens=int(inputs["input_ids"].shape[1]),
        loss_product=loss_p,
        loss_reference=loss_r,
        max_rel_diff=worst_diff,
        per_layer=per_layer,
        worst=worst,
        after_eval_pass=evaluate_first,
        packing_state=cpu_inference_packing_state(trainer.model),
    )


def format_table(results: list[GradCheck]) -> str:
    lines = [
        "| check | device | dtype | examples | label tokens | loss (product / reference) | largest rel. diff | "
        "layer 0 | last layer | tolerance | result |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        last = max(k for k in r.per_layer)
        lines.append(
            f"| {'after an evaluation pass' if r.after_eval_pass else 'first step'} | {r.device} | {r.dtype} | "
            f"{r.n_examples} | {r.n_label_tokens} | "
            f"{r.loss_product:.5f} / {r.loss_reference:.5f} | {r.max_rel_diff:.2e} | "
            f"{r.per_layer.get(0, float('nan')):.2e} | "
            f"{r.per_layer[last]:.2e} | {r.tolerance:g} | {'ok' if r.ok else 'WRONG'} |"
        )
    return "\n".join(lines)


def check_and_report(overrides: list[str] | None = None, json_path: str | None = None) -> int:
    """``python -m medgemma_lib gradcheck``: both checks (first step, after an evaluation pass), a table, JSON."""
    started = time.time()
    cfg = check_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, Path(tmp))
        results = [run_check(cfg, trainer=trainer), run_check(cfg, trainer=trainer, evaluate_first=True)]
    print(format_table(results))
    for r in results:
        print(
            f"{'after eval' if r.after_eval_pass else 'first step'} per layer: "
            + ", ".join(f"{k}:{v:.1e}" for k, v in r.per_layer.items())
        )
    if json_path:
        write_json(
            json_path,
            {
                "date": time.strftime("%Y-%m-%d"),
                "seconds": round(time.time() - started, 1),
                "overrides": list(overrides or []),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "results": [r.to_dict() for r in results],
            },
        )
    return 0 if all(r.ok for r in results) else 1
