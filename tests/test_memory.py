"""The training-memory estimator against H200 measurements, its advice, and the footprint report.

Data: tests/data/h200_reference.json, copied from ../shared/benchmarks/*.md (each group names its
source). To add a measurement, append a group or a row there; every row is checked.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from medgemma_lib import memory

ROWS = memory.reference_rows()
FULL_TABLE = [r for r in ROWS if r["source"].endswith("h200-2026-11-29.md")]


def _id(row):
    return f"{row['arch']}:{row['variant']}:{row['source'].rsplit('/', 1)[-1]}"


def test_reference_data_holds_all_13_rows_of_the_h200_table():
    assert len(FULL_TABLE) == 13
    assert {r["arch"] for r in FULL_TABLE} == {"27b", "4b"}


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_peak_allocated_within_15_percent_of_measurement(row):
    est = memory.estimate_training_memory(memory.setup_from_row(row))
    measured = row["peak_allocated_gib"]
    error = (est.peak_allocated_gib - measured) / measured
    assert abs(error) <= 0.15, f"預估 {est.peak_allocated_gib} GiB，實測 {measured} GiB（誤差 {error:+.1%}）"


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_peak_reserved_within_15_percent(row):
    # Reserved memory decides whether a card is big enough; the advice relies on this prediction.
    est = memory.estimate_training_memory(memory.setup_from_row(row))
    assert abs(est.peak_reserved_gib - row["peak_reserved_gib"]) / row["peak_reserved_gib"] <= 0.15


@pytest.mark.parametrize("arch,measured", [("27b", 15.05), ("4b", 2.80)])
def test_quantised_weights_match_measurement(arch, measured):
    # Computed from the architecture alone, no calibration: NF4 linears + bf16 embeddings and norms.
    assert memory.weight_bytes(memory.ARCHITECTURES[arch]) / memory.GIB == pytest.approx(measured, rel=0.02)


def test_lora_parameter_count_from_the_real_shapes():
    arch = memory.ARCHITECTURES["27b"]
    # q: 5376→4096, v: 5376→2048, r 16, 62 layers
    assert memory.lora_param_count(arch, 16, ("q_proj", "v_proj")) == 62 * 16 * ((5376 + 4096) + (5376 + 2048))
    assert memory.lora_param_count(arch, 16, "all-linear") == 62 * 16 * (2 * (5376 + 4096) + 2 * (5376 + 2048) + 3 * (5376 + 21504))  # 113.5 M


def test_settings_move_memory_the_right_way():
    base = memory.TrainingSetup(profile="medgemma-27b-text-it", micro_batch=4, seq_len=512)
    est = memory.estimate_training_memory
    assert est(base, liger=True).peak_allocated_gib < est(base).peak_allocated_gib
    assert est(base, gradient_checkpointing=False, liger=True).peak_allocated_gib > est(base, liger=True).peak_allocated_gib
    assert est(base, micro_batch=8).peak_allocated_gib > est(base).peak_allocated_gib
    assert est(base, lora_r=64).lora_gib > est(base).lora_gib
    assert est(base, quantization="none").weights_gib > 3 * est(base).weights_gib
    assert est(base, liger=True).logits_gib == 0
    # the vision tower (bf16, ~0.42 B) makes the multimodal profiles heavier than the language model alone
    assert est(base, profile="medgemma-4b-it").weights_gib - est(base, profile="4b").weights_gib == pytest.approx(0.78, abs=0.03)


def test_advice_for_common_cards():
    # The original guide's recipe (q,v, 4×512, no Liger) reserves ~27 GiB on the H200: not a 24 GB card.
    seed = memory.estimate_training_memory(profile="medgemma-27b-text-it", lora_targets=("q_proj", "v_proj"))
    assert not seed.fits(memory.usable_gib(24))
    a24 = memory.advise("medgemma-27b-text-it", memory.usable_gib(24))
    assert a24["fits"] and "Liger" in a24["setting"] and a24["peak_allocated_gib"] < 22
    assert not memory.advise("medgemma-27b-text-it", memory.usable_gib(16))["fits"]
    assert "medgemma-4b-it" in memory.advise("medgemma-27b-text-it", memory.usable_gib(8))["advice"]
    assert memory.advise("medgemma-4b-it", memory.usable_gib(8))["fits"]
    big = memory.advise("medgemma-27b-text-it", memory.usable_gib(141))
    assert big["fits"] and "無梯度檢查點" in big["setting"]  # the fastest measured setting when memory allows


def test_advice_table_shape():
    table = memory.advice_table(["medgemma-4b-it", "medgemma-27b-text-it"], [8, 12, 16, 24, 40, 80, 141])
    assert list(table.columns) == ["medgemma-4b-it", "medgemma-27b-text-it"]
    assert len(table) == 7
    assert table.loc["8 GB", "medgemma-27b-text-it"].startswith("放不下")
    assert table.loc["80 GB", "medgemma-27b-text-it"].startswith("可以")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medgemma_lib", "memory", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_breakdown_and_advice():
    run = _cli("--profile", "medgemma-27b-text-it", "--gpu-gib", "24", "--batch", "4", "--seq", "512")
    assert run.returncode == 0, run.stderr
    for word in ("量化後權重", "LoRA", "激活值", "logits", "峰值", "放不下", "建議"):
        assert word in run.stdout
    liger = _cli("--profile", "medgemma-27b-text-it", "--gpu-gib", "24", "--liger")
    assert "放得下" in liger.stdout
    bad = _cli("--profile", "medgemma-70b")
    assert bad.returncode == 2 and "不認識" in bad.stderr and "Traceback" not in bad.stderr
    table = _cli("--profile", "medgemma-4b-it", "--table")
    assert table.returncode == 0 and "141 GB" in table.stdout


def test_footprint_of_a_quantised_tiny_model(tiny_model_dir):
    import torch
    from transformers import Gemma3ForCausalLM

    from medgemma_lib.models import quantization_config

    full = Gemma3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q = Gemma3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quantization_config("nf4", "cpu"), device_map={"": "cpu"})
    fp_full, fp_q = memory.footprint(full), memory.footprint(q)
    assert fp_q["params"] == fp_full["params"]  # logical sizes survive packing
    assert fp_full["bytes"] == fp_full["fp32_bytes"]
    assert any(r["dtype"].startswith("nf4") for r in fp_q["rows"])
    linear = sum(p.numel() for n, p in full.named_parameters() if n.endswith("proj.weight"))
    nf4 = next(r for r in fp_q["rows"] if r["dtype"].startswith("nf4"))
    assert nf4["params"] == linear
    # ~0.5 byte per weight + statistics; in a model this tiny the shared code tables still weigh in
    assert linear * 0.5 < nf4["bytes"] < linear * 4
    table = memory.footprint_table(fp_q)
    assert table.iloc[-1]["資料型別"] == "合計"
