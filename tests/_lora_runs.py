"""Build run folders (adapter + config.yaml) like train.py writes, without training (for tests)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_run(
    run_dir: Path,
    model_source: str,
    profile: str,
    quantization: str = "none",
    targets=("q_proj", "v_proj", "o_proj"),
    seed: int = 1,
    b_scale: float = 1.0,
    token_ids: list[int] | None = None,
    **eval_overrides,
) -> Path:
    """Save a LoRA adapter with random, non-zero A and B (``init_lora_weights=False``) on ``model_source``.

    Non-zero B matters: a freshly initialised adapter (B = 0) changes nothing, so a test that
    "merged" it would pass even if merging were skipped. ``token_ids``: embedding rows trained as well
    (PEFT ``trainable_token_indices``, as a run that learns the stop token saves), moved off their base values.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgemma_lib.core.config import RunConfig, save_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_source, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(targets),
            init_lora_weights=False,
            trainable_token_indices=list(token_ids) if token_ids else None,
        ),
    )
    with torch.no_grad():  # keep the change visible but the model still coherent
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * p.std())
    run_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(run_dir / "adapter")
    cfg = RunConfig()
    cfg.model.profile = profile
    cfg.model.quantization = quantization
    cfg.data.input = str(ROOT / "data" / "medquad_sample.csv")
    cfg.train.run_name = run_dir.name
    cfg.train.output_dir = str(run_dir.parent)
    for key, value in eval_overrides.items():
        setattr(cfg.eval, key, value)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
