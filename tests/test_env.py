"""Environment check: the recommendation logic on described hardware, and the real doctor."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

from medgemma_lib.setup.env import EnvironmentReport, GPUInfo, collect_environment, format_report, recommend

GOOD_PACKAGES = {"transformers": "5.23.0", "bitsandbytes": "0.50.2", "torch": "2.13.0"}


def machine(gpus=(), packages=None, disk=50.0, torch="2.13.0") -> EnvironmentReport:
    return EnvironmentReport(
        python="3.11.7",
        platform="Linux x86_64",
        cpu_count=8,
        ram_gib=32.0,
        torch=torch,
        cuda="12.8" if gpus else None,
        gpus=list(gpus),
        bitsandbytes_backend="cuda" if gpus else "cpu",
        packages=dict(packages or GOOD_PACKAGES),
        free_disk_gib=disk,
        demo_model_cached=False,
        cache_dir="~/.cache/medgemma_lib",
    )


def test_no_gpu_recommends_demo_on_cpu():
    rec = recommend(machine())
    assert rec.profile == "demo" and rec.preset == "configs/demo.yaml"
    assert rec.ok and rec.problems == []


def test_24gb_ampere_gets_27b_text():
    rec = recommend(machine([GPUInfo("NVIDIA GeForce RTX 3090", 24.0, (8, 6), True)]))
    assert rec.profile == "medgemma-27b-text-it"
    assert rec.preset.endswith("27b-24gb.yaml")


def test_80gb_gets_the_large_preset():
    rec = recommend(machine([GPUInfo("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), True)]))
    assert rec.profile == "medgemma-27b-text-it" and "80gb" in rec.preset


def test_16gb_t4_cannot_train_gemma3_and_says_why():
    rec = recommend(machine([GPUInfo("Tesla T4", 15.6, (7, 5), False)]))
    assert rec.profile == "demo"
    assert not rec.ok
    assert any("bfloat16" in p and "Tesla T4" in p for p in rec.problems)


def test_12gb_bf16_card_gets_4b():
    rec = recommend(machine([GPUInfo("NVIDIA GeForce RTX 3060", 12.0, (8, 6), True)]))
    assert rec.profile == "medgemma-1.5-4b-it" and rec.preset == "configs/medgemma-1.5-4b-8gb.yaml"


def test_doctor_refuses_transformers_older_than_5_6_for_multimodal_gemma3():
    """Known answers: 5.5.2 is refused with the Chinese reason (exit 2 from doctor), 5.6.0 and 5.23.0 pass."""
    from medgemma_lib.setup.env import refuses_training

    old = machine([GPUInfo("NVIDIA GeForce RTX 3060", 12.0, (8, 6), True)])
    old.packages["transformers"] = "5.5.2"
    rec = recommend(old)
    assert not rec.ok and any("5.6" in p and "token_type_ids" in p for p in rec.problems)
    assert refuses_training(old)
    for fine in ("5.6.0", "5.23.0"):
        old.packages["transformers"] = fine
        assert not refuses_training(old) and not any("token_type_ids" in p for p in recommend(old).problems)


def test_model_loading_refuses_old_transformers_before_loading(monkeypatch):
    from medgemma_lib.core.errors import ModelError
    from medgemma_lib.models import loading as models

    monkeypatch.setattr(models.transformers, "__version__", "5.5.0")  # the module object that loading reads
    with pytest.raises(ModelError) as err:
        models.load_model("medgemma-1.5-4b-it", quantization="none", device="cpu")
    assert "5.6" in err.value.message and "token_type_ids" in err.value.message
    models.check_transformers_for(models.PROFILES["medgemma-27b-text-it"])  # text-only class: no limit


def test_6gb_card_falls_back_to_demo():
    rec = recommend(machine([GPUInfo("NVIDIA GeForce GTX 1660", 6.0, (8, 6), True)]))
    assert rec.profile == "demo"


def test_old_transformers_is_a_problem():
    rec = recommend(machine(packages={**GOOD_PACKAGES, "transformers": "4.46.3"}))
    assert any("4.50" in p for p in rec.problems) and not rec.ok


def test_missing_bitsandbytes_and_low_disk_are_problems():
    pk = dict(GOOD_PACKAGES)
    pk["bitsandbytes"] = None
    rec = recommend(machine(packages=pk, disk=0.5))
    assert any("bitsandbytes" in p for p in rec.problems)
    assert any("磁碟" in p for p in rec.problems)


def test_report_is_chinese_and_mentions_recommendation():
    report = machine([GPUInfo("NVIDIA L4", 22.5, (8, 9), True)])
    text = format_report(report, recommend(report))
    assert "環境檢查" in text and "建議設定檔" in text and "NVIDIA L4" in text


def test_collect_environment_on_this_machine():
    report = collect_environment()
    assert report.python.startswith("3.")
    assert report.packages["torch"] is not None
    assert report.free_disk_gib > 0
    assert not report.cache_dir.startswith("/root") and not report.cache_dir.startswith("/home")


@pytest.mark.slow
def test_doctor_cli_prints_chinese_report_and_exits_0():
    proc = run_cli("doctor", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "環境檢查" in proc.stdout and "建議" in proc.stdout


@pytest.mark.slow
def test_doctor_json_is_data():
    proc = run_cli("doctor", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"report", "recommendation"}
    assert data["recommendation"]["profile"] in {"demo", "medgemma-4b-it", "medgemma-27b-text-it"}


def test_missing_packages_names_the_required_ones_not_found():
    from medgemma_lib.setup.env import REQUIRED_PACKAGES, missing_packages

    full = dict.fromkeys(REQUIRED_PACKAGES, "1.0")
    assert missing_packages(machine(packages=full)) == []
    assert missing_packages(machine(packages={**full, "peft": None, "trl": None})) == ["peft", "trl"]
    assert missing_packages(machine(packages={"torch": "2.13.0"}), required=("torch", "opencc")) == ["opencc"]
