"""Shared fixtures.

* ``demo_model_dir``: the real Gemma 3 270M demo model (converted once into the cache).
* ``demo_tokenizer``: its real Gemma 3 tokenizer (262,144 tokens, turn template).
* ``tiny_model_dir``: a tiny *random* Gemma 3 with the real tokenizer, for fast plumbing tests of
  shapes, saving and loading. Never evidence that training works.
* ``shared_data``: ``../shared/data`` when present; tests that need it skip cleanly otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data 不存在：略過需要完整資料集的測試")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from medgemma_lib.models.loading import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from medgemma_lib.models.loading import load_tokenizer

    return load_tokenizer("demo")


def build_tiny_gemma3(folder: Path, tokenizer, seed: int = 0) -> Path:
    """Save a tiny random Gemma3ForCausalLM (real vocabulary size) with the real tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from medgemma_lib.models.loading import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        pad_token_id=PAD_ID,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(config)
    return save_tiny(model, folder, tokenizer)


def save_tiny(model, folder: Path, tokenizer) -> Path:
    """Save a tiny model with Gemma 3's stop tokens in its generation config, and the tokenizer beside it."""
    from transformers import GenerationConfig

    from medgemma_lib.models.loading import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID], pad_token_id=PAD_ID, do_sample=False
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_multimodal_config(vocab_size: int, **text):
    """A tiny ``Gemma3Config``: a 2-layer language model (sliding + full attention) and a 2-layer SigLIP tower."""
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            **text,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        image_token_index=vocab_size - 1,
        boi_token_index=vocab_size - 3,
        eoi_token_index=vocab_size - 2,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), demo_tokenizer)


_SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@pytest.fixture(autouse=True)
def _no_token_leaks_between_tests():
    """Some code under test sets HF_TOKEN for the process (the notebook token box does, on purpose).

    Restore the variables after every test, so a later test or an nbval kernel never inherits a
    token that an earlier test planted.
    """
    before = {name: os.environ.get(name) for name in _SECRET_VARS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
