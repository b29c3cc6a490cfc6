"""Helpers shared by the training tests: small real data splits and a tiny-model config."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "medquad_sample.csv"


def small_splits(n_train: int = 24, n_eval: int = 4, tokenizer=None):
    """Short real MedQuAD examples from the shipped sample, through the real data pipeline."""
    from medgemma_lib.core.config import DataSection
    from medgemma_lib.data import prepare_from_config

    section = DataSection(
        input=str(SAMPLE),
        max_answer_chars=300,
        long_answer_policy="drop",
        max_train_examples=n_train,
        max_eval_examples=n_eval,
    )
    splits, _ = prepare_from_config(section, output_dir=None, tokenizer=tokenizer)
    return splits


def tiny_overrides(model_dir, output_dir, run_name: str, **train) -> list[str]:
    """Config overrides for a fast CPU run of the tiny random Gemma 3 (plumbing only)."""
    values = {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "max_length": 96,
        "packing": True,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "eval_steps": 3,
        "save_steps": 3,
        "save_total_limit": 2,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.34,
        "num_threads": 1,
        "seed": 7,
    }
    values.update(train)
    out = [
        f"model.profile={model_dir}",
        "model.quantization=nf4",
        f"train.output_dir={output_dir}",
        f"train.run_name={run_name}",
        f"data.input={SAMPLE}",
        "data.max_answer_chars=300",
        "data.long_answer_policy=drop",
        "data.max_train_examples=24",
        "data.max_eval_examples=4",
    ]
    out += [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    return out


def step_grads(model, ids, keep):
    """Logits, the input-embedding gradient and the gradients of the parameters ``keep(name, param)`` selects, of
    one loss.backward() (for comparing a routed forward with the library's own)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits.float().pow(2).mean() + logits.float()[..., :7].sum() * 1e-3).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if keep(n, p)}
    return logits.detach(), embeds.grad.detach(), grads


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_same_step(want, got, n_params: int, tol_out: float, tol_grad: float = 1e-5) -> None:
    """Two :func:`step_grads` results agree: logits and input gradient within ``tol_out``, the same ``n_params``
    parameter gradients, each non-zero in the reference and within ``tol_grad``."""
    (want_logits, want_dx, want_g), (got_logits, got_dx, got_g) = want, got
    assert rel(got_logits, want_logits) < tol_out
    assert rel(got_dx, want_dx) < tol_out
    assert set(got_g) == set(want_g) and len(want_g) == n_params
    for name in want_g:
        assert want_g[name].abs().max() > 0, name
        assert rel(got_g[name], want_g[name]) < tol_grad, name
