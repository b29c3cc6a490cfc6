"""The training-memory estimator against H200 measurements, its advice, and the footprint report.

Data (every row of the three files is checked, allocated and reserved, within ±15 %):
- medgemma_lib/resources/h200_reference.json: copied from ../shared/benchmarks/*.md (each group names its source);
- medgemma_lib/resources/h200_bench_2026-11-29.json: this project's ``python -m medgemma_lib bench`` on one H200
  (docs/benchmarks.md, docs/bench/*.json), with LoRA dropout, attention, optimizer and allocator per row;
- medgemma_lib/resources/h200_trainbench_2026-12-03.json and h200_trainbench_2026-12-04.json: ``python -m
  medgemma_lib trainbench`` (the presets through ``run_training``, with and without layer compilation and activation
  offloading; 27B rows of 4096, 6144 and 8192 tokens without checkpointing).
To add a measurement, append a group or a row to either file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli

from medgemma_lib.setup import memory

DATA = Path(memory.__file__).resolve().parents[1] / "resources"  # shipped with the package: memory reads it at run time
REFERENCE = memory.reference_rows(DATA / "h200_reference.json")
BENCH = memory.reference_rows(DATA / "h200_bench_2026-11-29.json")
TRAINBENCH_1203 = memory.reference_rows(DATA / "h200_trainbench_2026-12-03.json")  # through run_training
TRAINBENCH_1204 = memory.reference_rows(DATA / "h200_trainbench_2026-12-04.json")  # seven runs, three starts
TRAINBENCH = TRAINBENCH_1203 + TRAINBENCH_1204
ROWS = REFERENCE + BENCH + TRAINBENCH
FULL_TABLE = [r for r in ROWS if r["source"].endswith("h200-2026-11-29.md")]
TOLERANCE = 0.15


def _id(row):
    return f"{row['arch']}:{row['variant'][:60]}:{row['source'].rsplit('/', 1)[-1][:24]}"


def _errors(row):
    est = memory.estimate_training_memory(memory.setup_from_row(row))
    return (
        est,
        (est.peak_allocated_gib - row["peak_allocated_gib"]) / row["peak_allocated_gib"],
        (est.peak_reserved_gib - row["peak_reserved_gib"]) / row["peak_reserved_gib"],
    )


def test_reference_data_holds_all_13_rows_of_the_h200_table_and_20_bench_rows():
    assert len(FULL_TABLE) == 13
    assert {r["arch"] for r in FULL_TABLE} == {"27b", "4b"}
    assert len(BENCH) == 20
    assert len(TRAINBENCH_1203) == 13 and len(TRAINBENCH_1204) == 20
    assert max(r["seq"] for r in TRAINBENCH_1204 if r["arch"] == "27b") == 8192  # the 129.7 GiB row
    assert {(r["compile_layers"], r["activation_offloading"]) for r in TRAINBENCH} == {
        (False, False),
        (True, False),
        (False, True),
    }
    assert set(memory.REFERENCE_FILES) == {
        "h200_reference.json",
        "h200_bench_2026-11-29.json",
        "h200_trainbench_2026-12-03.json",
        "h200_trainbench_2026-12-04.json",
    }


def _file(row) -> str:
    return "trainbench" if row in TRAINBENCH else "bench" if row in BENCH else "reference"


def test_table_of_measured_and_predicted_memory():
    # Prints the whole comparison (pytest -s shows it; a failure shows it too), then checks every row.
    lines = [
        f"{'file':10} {'arch':4} {'variant':62} {'alloc':>7} {'pred':>7} {'err':>7} | "
        f"{'reserved':>8} {'pred':>7} {'err':>7}"
    ]
    worst = 0.0
    for row in ROWS:
        est, ea, er = _errors(row)
        worst = max(worst, abs(ea))
        lines.append(
            f"{_file(row):10} {row['arch']:4} {row['variant'][:62]:62} "
            f"{row['peak_allocated_gib']:7.2f} {est.peak_allocated_gib:7.2f} {ea:+7.1%} | "
            f"{row['peak_reserved_gib']:8.2f} {est.peak_reserved_gib:7.2f} {er:+7.1%}"
        )
    print("\n".join(lines))
    assert worst <= TOLERANCE, "\n".join(lines)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_peak_allocated_within_15_percent_of_measurement(row):
    est, error, _ = _errors(row)
    measured = row["peak_allocated_gib"]
    assert abs(error) <= TOLERANCE, f"預估 {est.peak_allocated_gib} GiB，實測 {measured} GiB（誤差 {error:+.1%}）"


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_peak_reserved_within_15_percent(row):
    # Reserved memory decides whether a card is big enough; the advice relies on this prediction.
    est, _, error = _errors(row)
    assert abs(error) <= TOLERANCE, (
        f"預估 {est.peak_reserved_gib} GiB，實測 {row['peak_reserved_gib']} GiB（誤差 {error:+.1%}）"
    )


def test_reference_liger_rows_are_modelled_with_liger_loss_only():
    # h200_reference.json marks its Liger rows liger_layers=false (inferred; see the file's note):
    # with Liger's layer kernels assumed, its no-checkpointing rows would be far too low.
    no_ckpt = [r for r in REFERENCE if r["liger"] and not r["grad_ckpt"]]
    assert no_ckpt and all(r["liger_layers"] is False for r in REFERENCE)
    for row in no_ckpt:
        full = memory.estimate_training_memory(memory.setup_from_row({**row, "liger_layers": True}))
        assert full.peak_allocated_gib < (1 - TOLERANCE) * row["peak_allocated_gib"]


def test_dropout_attention_and_optimizer_are_counted_physically():
    base = memory.TrainingSetup(
        profile="27b",
        micro_batch=1,
        seq_len=4096,
        packing=True,
        liger=True,
        gradient_checkpointing=False,
        attn_implementation="varlen",
        lora_dropout=0.0,
        optim="adamw_fused",
    )
    est = memory.estimate_training_memory
    a = memory.ARCHITECTURES["27b"]
    h, i, q, n, L = a.hidden, a.intermediate, a.heads * a.head_dim, 4096, a.layers
    # dropout: a bf16 copy and a bool mask of every LoRA input, instead of keeping 3 of those inputs
    dropout_bytes = L * n * (3 * (5 * h + q + i) - 2 * (2 * h + i))
    delta = est(base, lora_dropout=0.05).peak_allocated_gib - est(base).peak_allocated_gib
    assert delta == pytest.approx(dropout_bytes / memory.GIB, abs=0.02)
    # sdpa on packed rows: a bf16 mask of s² per layer and k/v repeated to all heads; varlen has neither
    kv = a.kv_heads * a.head_dim
    sdpa_bytes = L * (2 * 4096 * 4096 + n * 4 * (q - kv))
    delta = est(base, attn_implementation="sdpa").peak_allocated_gib - est(base).peak_allocated_gib
    assert delta == pytest.approx(sdpa_bytes / memory.GIB, abs=0.02)
    assert est(base, attn_implementation="flash_attention_2").peak_allocated_gib == est(base).peak_allocated_gib
    # 8-bit AdamW: 2 bytes of state per LoRA parameter instead of 8
    e = est(base)
    assert e.lora_gib - est(base, optim="paged_adamw_8bit").lora_gib == pytest.approx(
        6 * e.lora_params / memory.GIB, abs=0.01
    )


@pytest.mark.parametrize("arch,measured", [("27b", 15.05), ("4b", 2.80)])
def test_quantised_weights_match_measurement(arch, measured):
    # Computed from the architecture alone, no calibration: NF4 linears + bf16 embeddings and norms.
    assert memory.weight_bytes(memory.ARCHITECTURES[arch]) / memory.GIB == pytest.approx(measured, rel=0.02)


def test_lora_parameter_count_from_the_real_shapes():
    arch = memory.ARCHITECTURES["27b"]
    # q: 5376→4096, v: 5376→2048, r 16, 62 layers
    assert memory.lora_param_count(arch, 16, ("q_proj", "v_proj")) == 62 * 16 * ((5376 + 4096) + (5376 + 2048))
    assert memory.lora_param_count(arch, 16, "all-linear") == 62 * 16 * (
        2 * (5376 + 4096) + 2 * (5376 + 2048) + 3 * (5376 + 21504)
    )  # 113.5 M


def test_settings_move_memory_the_right_way():
    base = memory.TrainingSetup(profile="medgemma-27b-text-it", micro_batch=4, seq_len=512)
    est = memory.estimate_training_memory
    assert est(base, liger=True).peak_allocated_gib < est(base).peak_allocated_gib
    assert (
        est(base, gradient_checkpointing=False, liger=True).peak_allocated_gib
        > est(base, liger=True).peak_allocated_gib
    )
    assert est(base, micro_batch=8).peak_allocated_gib > est(base).peak_allocated_gib
    assert est(base, lora_r=64).lora_gib > est(base).lora_gib
    assert est(base, quantization="none").weights_gib > 3 * est(base).weights_gib
    assert est(base, liger=True).logits_gib == 0
    # the vision tower (bf16, ~0.42 B) makes the multimodal profiles heavier than the language model alone
    assert est(base, profile="medgemma-4b-it").weights_gib - est(base, profile="4b").weights_gib == pytest.approx(
        0.78, abs=0.03
    )


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


@pytest.mark.parametrize(
    "profile,gb,preset,shape,ckpt,optim",
    [
        ("medgemma-27b-text-it", 141, "141 GB", "1×6144", False, "fused"),
        ("medgemma-27b-text-it", 80, "80 GB", "1×4096", False, "fused"),  # 74.1 GiB under a 79 GiB cap (2026-12-06)
        ("medgemma-27b-text-it", 24, "24 GB", "1×4096", True, "fused"),
        ("medgemma-27b-text-it", 20, "24 GB", "1×4096", True, "fused"),  # 17.7 GiB measured (2026-12-03)
        ("medgemma-4b-it", 8, "8 GB", "1×8192", True, "fused"),
        ("medgemma-4b-it", 141, "141 GB", "4×4096", False, "fused"),
    ],
)
def test_advice_recommends_the_measured_presets(profile, gb, preset, shape, ckpt, optim):
    # docs/benchmarks.md "Presets that follow from this": packed, Liger, varlen, dropout 0.
    a = memory.advise(profile, memory.usable_gib(gb))
    assert a["fits"] and a["preset"] == preset
    for word in (shape, "Liger", "varlen", "dropout 0", optim, "梯度檢查點" if ckpt else "無梯度檢查點"):
        assert word in a["setting"], (word, a["setting"])
    assert ("無梯度檢查點" in a["setting"]) != ckpt


def test_advice_table_shape():
    table = memory.advice_table(["medgemma-4b-it", "medgemma-27b-text-it"], [8, 12, 16, 24, 40, 80, 141])
    assert list(table.columns) == ["medgemma-4b-it", "medgemma-27b-text-it"]
    assert len(table) == 7
    assert table.loc["8 GB", "medgemma-27b-text-it"].startswith("放不下")
    assert table.loc["80 GB", "medgemma-27b-text-it"].startswith("可以")


@pytest.mark.slow
def test_cli_prints_breakdown_and_advice():
    run = run_cli("memory", "--profile", "medgemma-27b-text-it", "--gpu-gib", "24", "--batch", "4", "--seq", "512")
    assert run.returncode == 0, run.stderr
    for word in ("量化後權重", "LoRA", "啟動值", "logits", "峰值", "放不下", "建議"):
        assert word in run.stdout
    liger = run_cli("memory", "--profile", "medgemma-27b-text-it", "--gpu-gib", "24", "--liger")
    assert "放得下" in liger.stdout
    bad = run_cli("memory", "--profile", "medgemma-70b")
    assert bad.returncode == 2 and "不認識" in bad.stderr and "Traceback" not in bad.stderr
    lean = run_cli(
        "memory",
        "--profile",
        "medgemma-27b-text-it",
        "--batch",
        "1",
        "--seq",
        "3072",
        "--packing",
        "--liger",
        "--attn",
        "varlen",
        "--lora-dropout",
        "0",
        "--optim",
        "adamw_torch_fused",
        "--expandable-segments",
        "--json",
    )
    assert lean.returncode == 0, lean.stderr
    assert '"lora_dropout": 0.0' in lean.stdout and '"attn_implementation": "varlen"' in lean.stdout
    bad_dropout = run_cli("memory", "--lora-dropout", "1.5")
    assert bad_dropout.returncode == 2 and "dropout" in bad_dropout.stderr
    table = run_cli("memory", "--profile", "medgemma-4b-it", "--table")
    assert table.returncode == 0 and "141 GB" in table.stdout


def test_footprint_of_a_quantised_tiny_model(tiny_model_dir):
    import torch
    from transformers import Gemma3ForCausalLM

    from medgemma_lib.models.loading import quantization_config

    full = Gemma3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q = Gemma3ForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        quantization_config=quantization_config("nf4", "cpu"),
        device_map={"": "cpu"},
    )
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


def test_comparison_setups_are_the_six_notebook_04_compares():
    setups = memory.comparison_setups()
    assert len(setups) == 6 and len({(s.profile, s.label()) for s in setups}) == 6
    assert setups[0].lora_targets == ("q_proj", "v_proj") and not setups[0].liger
    assert [s.profile for s in setups].count("medgemma-27b-text-it") == 4
    assert all(s.packing == (s.seq_len == 4096) for s in setups)
    table = memory.breakdown_table(setups)
    assert (table["峰值（allocated）"] < table["需要的顯示卡"]).all()
