"""One model registry (``medgemma_lib.core.profiles``) read by loading, the memory estimator and the benchmark."""

from __future__ import annotations

import pytest

from medgemma_lib.checks import bench, random_models
from medgemma_lib.core.config import load_config
from medgemma_lib.core.profiles import BENCH_ARCHITECTURES, LORA_LINEAR_LAYERS, PROFILES
from medgemma_lib.models import loading as models
from medgemma_lib.setup import memory


def test_every_reader_gets_the_same_architecture_objects():
    for name, profile in PROFILES.items():
        assert memory.architecture(name) is profile.architecture
        assert models.PROFILES[name] is profile
    for name, arch in BENCH_ARCHITECTURES.items():
        assert memory.architecture(name) is arch
        cfg = random_models.text_config(name)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (
            arch.hidden,
            arch.layers,
            arch.intermediate,
        )
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
            arch.heads,
            arch.kv_heads,
            arch.head_dim,
        )


def test_the_27b_architecture_matches_its_hub_config_and_parameter_count():
    """Known answers from google/medgemma-27b-text-it's config.json and its 27.0 B parameters."""
    arch = PROFILES["medgemma-27b-text-it"].architecture
    assert (arch.hidden, arch.layers, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim, arch.vocab) == (
        5376,
        62,
        21504,
        32,
        16,
        128,
        262_208,
    )
    assert (arch.linear_params() + arch.other_params()) / 1e9 == pytest.approx(27.0, abs=0.1)
    four = PROFILES["medgemma-4b-it"].architecture
    assert (four.linear_params() + four.other_params() + four.vision_params) / 1e9 == pytest.approx(4.30, abs=0.01)


def test_lora_targets_come_from_the_profile_and_never_reach_the_vision_tower():
    assert PROFILES["demo"].lora_target_modules() == list(LORA_LINEAR_LAYERS) == bench.ALL_LINEAR
    assert memory.LORA_LINEARS == LORA_LINEAR_LAYERS
    spec = PROFILES["medgemma-4b-it"].lora_target_modules(["q_proj", "v_proj"])
    assert spec == r".*language_model.*\.(q_proj|v_proj)$"


def test_the_memory_setup_of_a_run_is_what_run_training_trains(repo_root):
    cfg = load_config(repo_root / "configs" / "demo.yaml")
    cpu = memory.setup_for_run(cfg, device="cpu")
    assert (cpu.profile, cpu.quantization, cpu.lora_r, cpu.lora_targets) == ("demo", "nf4", 16, "all-linear")
    assert (cpu.micro_batch, cpu.seq_len, cpu.packing, cpu.gradient_checkpointing) == (1, 256, True, False)
    assert cpu.compute_bytes == 4 and cpu.attn_implementation == "sdpa" and not cpu.liger  # fp32 on CPU, no Liger
    big = load_config(repo_root / "configs" / "medgemma-27b-24gb.yaml")
    gpu = memory.setup_for_run(big, device="cuda", micro_batch=1)
    assert gpu.compute_bytes == 2 and gpu.micro_batch == 1
    assert gpu.attn_implementation == ("varlen" if big.train.packing else "sdpa")
    assert gpu.liger == big.train.use_liger_kernel and gpu.gradient_checkpointing == big.train.gradient_checkpointing


def test_the_settings_table_of_notebook_05_shows_the_config_values(repo_root):
    from medgemma_lib.training.train import settings_table

    cfg = load_config(repo_root / "configs" / "demo.yaml", ["train.max_steps=7", "lora.r=4"])
    table = settings_table(cfg)
    assert table.loc["max_steps", "值"] == 7 and table.loc["lora.r", "值"] == 4
    assert table.loc["model.quantization", "值"] == "nf4" and table.loc["packing", "值"] is True


def test_quiet_library_warnings_hides_only_the_libraries_future_notices():
    import warnings

    from medgemma_lib import quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit("renamed in v6", FutureWarning, "x.py", 1, module="transformers.trainer")
        warnings.warn_explicit("renamed in v6", FutureWarning, "x.py", 1, module="medgemma_lib.training.train")
        warnings.warn_explicit("something else", UserWarning, "x.py", 1, module="transformers.trainer")
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "renamed in v6"),
        (UserWarning, "something else"),
    ]
