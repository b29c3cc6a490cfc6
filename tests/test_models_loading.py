"""Loading the real demo model offline (NF4 and fp32), fp16 refusal, LoRA never on the vision tower."""

from __future__ import annotations

import os
import warnings

import pytest

from medgemma_lib.core.errors import ResourceError
from medgemma_lib.models import loading as models

PROMPT = "Diabetes is a chronic disease in which"


def _continue(model, tok, text=PROMPT, n=12):
    import torch

    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_demo_loads_offline_and_continues_a_medical_prompt(demo_model_dir, quantization):
    import torch

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*kernels.*")
        model = models.load_model("demo", quantization=quantization, device="cpu")
    tok = models.load_tokenizer("demo")
    text = _continue(model, tok)
    assert text.strip() and any(ch.isalpha() for ch in text)
    if quantization == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        from medgemma_lib.setup.memory import footprint

        fp = footprint(model)
        nf4 = next(r for r in fp["rows"] if r["dtype"].startswith("nf4"))
        assert nf4["bytes"] < 0.6 * nf4["params"]  # ~0.52 byte per quantised weight
    else:
        assert model.dtype == torch.float32


def test_fp16_is_refused_with_the_reason():
    with pytest.raises(ResourceError) as err:
        models.load_model("demo", quantization="none", device="cpu", dtype="float16")
    assert "float16" in err.value.message and "bfloat16" in (err.value.hint or "")


def test_lora_targets_skip_the_vision_tower():
    import torch
    from conftest import tiny_multimodal_config
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = tiny_multimodal_config(300)
    model = Gemma3ForConditionalGeneration(cfg)
    # The vision tower has q_proj/k_proj/v_proj/out_proj and fc1/fc2 of its own: a plain name list would hit them.
    assert any("vision_tower" in n and n.endswith("q_proj") for n, _ in model.named_modules())
    models.freeze_vision_tower(model)
    profile = models.PROFILES["medgemma-4b-it"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=profile.lora_target_modules()))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    wrapped = {
        n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "language_model" in n
    }
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
