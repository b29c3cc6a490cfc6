"""trainbench: the presets timed through the product's own ``run_training`` (one path, no second training loop).

Checked on CPU with the tiny architecture: the synthetic records tokenise to exactly the MedQuAD lengths they
were drawn from, TRL's packing keeps every one of their tokens, a row's timed steps are ``LeanSFTTrainer``'s own
training steps, its token counts are what TRL counted, and the lever gradient comparison reports 0 for a lever
that changes nothing and a large difference for one that changes the batch. The levers themselves
(``train.compile_layers``, ``train.activation_offloading``) are checked against the plain reference in
``tests/test_gradients.py`` and on the H200 in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from medgemma_lib.checks import bench, random_models, trainbench
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import ConfigError
from medgemma_lib.training import trainer
from medgemma_lib.training.train import conversational_only

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.max_length=256", "train.max_example_length=128"]


@pytest.fixture(scope="module")
def lengths():
    return bench.load_token_lengths()


def test_synthetic_records_tokenise_to_their_medquad_lengths(lengths):
    full, prompt = lengths
    vocab = random_models.text_config("tiny").vocab_size
    tok = trainbench.synthetic_tokenizer(vocab)
    ds, drawn = trainbench.synthetic_datasets(full, prompt, 60, vocab, seed=3)
    assert len(ds["train"]) == len(drawn) == 60
    assert {n for n, _ in drawn} <= set(full)
    for record, (n, p) in zip(ds["train"], drawn):
        prompt_ids = tok.apply_chat_template(record["prompt"], add_generation_prompt=True, return_dict=False)
        full_ids = tok.apply_chat_template(record["prompt"] + record["completion"], return_dict=False)
        assert len(prompt_ids) == p and len(full_ids) == n
        assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in full_ids  # every word is one known token


def test_packing_keeps_every_token_of_the_records(lengths, tmp_path):
    full, prompt = lengths
    config = random_models.text_config("tiny")
    folder = trainbench.model_folder(config, tmp_path)
    cfg = load_config("configs/demo.yaml", [f"model.profile={folder}", f"train.output_dir={tmp_path}", *TINY])
    ds, drawn = trainbench.synthetic_datasets(full, prompt, 80, config.vocab_size, seed=1)
    model, _ = random_models.build_model("tiny", "cpu")
    tok = trainbench.synthetic_tokenizer(config.vocab_size)
    tr = trainer.build_trainer(cfg, tmp_path, "cpu", model, tok, conversational_only(ds["train"]), None, [], 1, 1)
    rows = tr.train_dataset["input_ids"]
    assert all(len(r) <= 256 for r in rows)
    assert sum(len(r) for r in rows) == sum(min(n, 128) for n, _ in drawn)  # the cut at max_example_length only


@pytest.mark.slow
@pytest.mark.parametrize("profile", [False, True], ids=["timed", "profiled"])
def test_a_row_times_the_products_own_training_steps(lengths, monkeypatch, profile):
    """With --profile, two more steps are recorded by the profiler after the timed ones and never timed: one as it
    runs, one with Python functions timed too (host time by library)."""
    full, prompt = lengths
    calls = []
    original = trainer.LeanSFTTrainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer.LeanSFTTrainer, "training_step", counted)
    row = trainbench.run_preset(
        "tiny",
        "configs/demo.yaml",
        [trainbench.ACC1, *TINY],
        name="tiny",
        device="cpu",
        full=full,
        prompt=prompt,
        steps=4,
        warmup=2,
        profile=profile,
        log=lambda *a: None,
    )
    assert row["error"] is None and row["path"] == "run_training"
    # one micro-batch per step, warm-up (and the profiled steps) included, nothing else trains
    assert calls == ["LeanSFTTrainer"] * (8 if profile else 6)
    if profile:
        pr = row["profile"]
        assert pr["wall_ms"] > 0 and pr["cpu_self_ms"] > 0
        assert "medgemma_lib" not in pr["host_ms_by_library"]  # the first recorded step times no Python function
        libs = pr["python_step"]["host_ms_by_library"]
        assert libs["medgemma_lib"] > 0 and libs["transformers"] > 0 and libs["trl"] > 0 and libs["peft"] > 0
    else:
        assert row["profile"] is None
    assert len(row["step_s"]) == len(row["tokens_per_step"]) == len(row["losses"]) == 6
    assert all(0 < t <= 256 for t in row["tokens_per_step"])
    assert row["useful_tokens_measured"] == sum(row["tokens_per_step"][2:])
    assert row["useful_tok_s"] > 0 and row["compile_layers"] is False


def test_lever_gradients_see_a_change_and_nothing_else(lengths):
    full, prompt = lengths
    out = trainbench.lever_gradients(
        "tiny",
        "configs/demo.yaml",
        {"same": [], "offload": [trainbench.OFFLOAD], "cut": ["train.max_example_length=64"]},
        base=TINY,
        device="cpu",
        full=full,
        prompt=prompt,
        log=lambda *a: None,
    )
    levers = out["levers"]
    assert out["tensors"] == 2 * 7 * 2  # A and B of 7 linears in each of the 2 layers
    assert levers["same"]["max_rel_diff"] == 0.0
    assert levers["offload"]["max_rel_diff"] == 0.0  # offloading is CUDA only: ignored on CPU
    assert levers["cut"]["rel_norm_diff_all"] > 0.1  # a lever that changes what is computed is caught


def test_offloading_is_passed_to_trl_on_cuda_only(tmp_path):
    cfg = load_config("configs/demo.yaml", [trainbench.OFFLOAD])
    assert trainer.sft_config(cfg, tmp_path, "cpu").activation_offloading is False


def test_compiling_and_offloading_together_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.yaml", [trainbench.COMPILE, trainbench.OFFLOAD])
    assert "不能同時開啟" in str(info.value)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "train",
            "--config",
            "configs/demo.yaml",
            f"train.output_dir={tmp_path}",
            "train.run_name=both",
            trainbench.COMPILE,
            trainbench.OFFLOAD,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "train.compile_layers 與 train.activation_offloading" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "both").exists()


def test_every_row_is_a_valid_config_of_a_shipped_preset():
    for arch, rows in trainbench.ROWS.items():
        assert len({name for name, _, _ in rows}) == len(rows)
        for name, preset, overrides in rows:
            assert (ROOT / preset).is_file()
            cfg = load_config(preset, overrides)
            assert cfg.train.gradient_accumulation_steps == 1, (arch, name)
    shipped = {name: load_config(p, o).train for name, p, o in trainbench.ROWS["4b"] + trainbench.ROWS["27b"]}
    assert shipped["8gb"].activation_offloading and not shipped["8gb"].compile_layers
    assert (
        shipped["8gb-compile"].compile_layers and not shipped["8gb-compile"].activation_offloading
    )  # refused together
    assert not shipped["8gb-no-offload"].activation_offloading
    assert shipped["24gb"].activation_offloading and shipped["24gb"].max_length == 4096
    assert shipped["141gb"].max_length == 6144 and not shipped["141gb"].gradient_checkpointing
    assert shipped["8gb"].fused_lora and shipped["24gb"].fused_lora and shipped["141gb"].fused_lora
    assert not shipped["8gb-peft"].fused_lora and not shipped["24gb-peft"].fused_lora
    for name in ("8gb-norm", "8gb-norm-no-liger", "24gb-norm", "24gb-6144-norm", "141gb-norm"):
        assert shipped[name].fused_rms_norm, name
    assert shipped["24gb-6144"].max_length == 6144 and shipped["24gb-6144"].gradient_checkpointing
    assert not shipped["8gb-norm-no-liger"].use_liger_kernel


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--arch", "70b"], "不認識的架構：70b"),
        (["--arch", "4b", "--only", "48gb"], "沒有這些列：48gb"),
        (["--card-gib", "1"], "--card-gib"),
    ],
)
def test_unknown_architectures_and_rows_are_refused_before_anything_runs(args, fragment, tmp_path):
    out = tmp_path / "out"
    done = run_cli("trainbench", *args, "--out", str(out), timeout=120)
    assert done.returncode == 2 and fragment in done.stderr + done.stdout
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_card_is_its_memory_less_one_gib_and_a_preset_fills_at_most_95_percent_of_it():
    assert trainbench.card_cap_gib(24) == 23.0 and trainbench.card_cap_gib(80) == 79.0
    fit = trainbench.card_fit(24, 23.0, 21.8)  # 0.95 × 23 = 21.85
    assert fit == {"card_gib": 24, "cap_gib": 23.0, "margin_gib": 1.2, "fits_card": True}
    assert trainbench.card_fit(24, 23.0, 21.9)["fits_card"] is False
    assert trainbench.card_fit(24, None, None) == {
        "card_gib": 24,
        "cap_gib": None,
        "margin_gib": None,
        "fits_card": None,
    }
    assert trainbench.card_fit(None, None, 3.0) == {}
    assert trainbench.cap_fraction(24, "cpu") is None  # nothing to cap on a CPU


def test_the_cap_is_the_cards_share_of_the_gpu_and_a_smaller_gpu_is_refused(monkeypatch):
    import torch

    class Props:
        total_memory = 80 * 2**30

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert trainbench.cap_allocator(24, "cuda:1") == 23.0
    assert trainbench.cap_allocator(24, "cuda") == 23.0  # the allocator needs an index (found on the H200)
    assert calls == [(23 / 80, 1), (23 / 80, 0)]
    with pytest.raises(ConfigError, match="量不了 141 GB 的卡"):
        trainbench.cap_allocator(141, "cuda:0")
    assert len(calls) == 2  # refused before capping


def test_profile_says_which_library_spends_the_hosts_time():
    """A real CPU profile with Python functions recorded (as StepTimer records the GPU step): the host time of a
    routed norm is split between medgemma_lib's function, torch's module call and ATen; the parts add up."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from medgemma_lib.models import norm_kernels

    norm = Gemma3RMSNorm(64)
    norm_kernels.fuse_rms_norms(norm)
    x = torch.randn(4, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(20):
            norm(x)
    out = trainbench.profile_summary(prof, wall_s=0.01)
    libs = out["host_ms_by_library"]
    assert {"medgemma_lib", "torch", "C++: ATen, autograd, CUDA runtime"} <= set(libs)
    assert abs(sum(libs.values()) - out["cpu_self_ms"]) < 0.05 * out["cpu_self_ms"] + 0.2
    assert libs["medgemma_lib"] > 0
    ops = {o["op"]: o for o in out["top_cpu_ops"]}
    line = norm_kernels._fused_forward.__code__.co_firstlineno
    assert ops[f"medgemma_lib/models/norm_kernels.py({line}): _fused_forward"]["calls"] == 20
    assert not any(" at 0x" in op for op in ops)  # built-ins merged over the objects they were called on
    assert trainbench.host_library("transformers/models/gemma3/modeling_gemma3.py(150): forward") == "transformers"
    assert trainbench.host_library("/tmp/site/peft/tuners/lora/bnb.py(501): forward") == "peft"
    assert trainbench.host_library("/usr/lib/python3.12/enum.py(1230): __hash__").startswith("Python")
    assert trainbench.host_library("/usr/lib/python3/dist-packages/trl/x.py(3): f") == "trl"
    assert trainbench.host_library("aten::mm") == trainbench.host_library("cudaLaunchKernel")
    # The listed names keep no machine path (CI imports the package from an absolute path, not from the cwd).
    assert trainbench.short_key("/root/x/site-packages/peft/tuners/lora/bnb.py(501): forward") == (
        "peft/tuners/lora/bnb.py(501): forward"
    )
    assert trainbench.short_key("/home/someone/job.py(7): main") == "job.py(7): main"
    assert (
        trainbench.short_key("<built-in method to of Tensor object at 0x7f00>")
        == "<built-in method to of Tensor object>"
    )
    assert trainbench.short_key("aten::mm") == "aten::mm"
    assert trainbench.host_library("<built-in method to of Tensor object at 0x7f>").startswith("Python")


def test_profile_counts_each_kernel_once_and_sorts_it_by_kind():
    """The profiler lists a kernel as a device event and again in the operator that launched it: the step's GPU
    time is the device events' sum (a double count would report a GPU busier than the wall clock allows)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(key, kind, device_us, cpu_us=0.0, count=1):
        return SimpleNamespace(
            key=key, device_type=kind, self_device_time_total=device_us, self_cpu_time_total=cpu_us, count=count
        )

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        ev("aten::mm", cpu, 600.0, cpu_us=50.0, count=4),
        ev("sm90_xmma_gemm_bf16bf16_bf16f32", cuda, 600.0, count=4),
        ev("bitsandbytes::dequantize_4bit", cpu, 150.0, cpu_us=30.0, count=2),
        ev("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", cuda, 150.0, count=2),
        ev("flash_attn::_flash_attn_varlen_forward", cpu, 100.0, cpu_us=20.0),
        ev("void flash_fwd_kernel<Flash_fwd_kernel_traits>", cuda, 100.0),
        ev("triton_red_fused_add_mul_rsqrt_0", cuda, 40.0),
        ev("_rms_norm_backward_kernel", cuda, 0.0),  # Liger's kernels carry their Python names
        ev("Memcpy DtoH (Device -> Pinned)", cuda, 60.0),
        ev("void at::native::vectorized_elementwise_kernel", cuda, 50.0),
        ev("cudaLaunchKernel", cpu, 0.0, cpu_us=100.0, count=9),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    out = trainbench.profile_summary(prof, wall_s=0.002)
    assert out["gpu_kernel_ms"] == 1.0  # 600 + 150 + 100 + 40 + 60 + 50 µs, not twice that
    assert out["gpu_busy_share"] == 0.5
    assert out["cpu_self_ms"] == 0.2 and out["kernel_launches"] == 9
    kinds = out["gpu_ms_by_kind"]
    assert list(kinds) == [
        "matmul",
        "NF4 dequantisation",
        "attention",
        "copies",
        "other element-wise and reductions",
        "fused Triton kernels (Liger, inductor)",
    ]
    assert kinds["matmul"] == 0.6 and kinds["copies"] == 0.1 and kinds["fused Triton kernels (Liger, inductor)"] == 0.0
    assert [o["op"] for o in out["top_gpu_ops"][:3]] == [
        "aten::mm",
        "bitsandbytes::dequantize_4bit",
        "flash_attn::_flash_attn_varlen_forward",
    ]
    assert out["top_kernels"][0]["kind"] == "matmul" and out["top_kernels"][0]["calls"] == 4
    # The host's side, by own CPU time: the launches first (100 µs), then aten::mm (50), no device event among them.
    assert [(o["op"], o["calls"], o["cpu_ms"]) for o in out["top_cpu_ops"][:3]] == [
        ("cudaLaunchKernel", 9, 0.1),
        ("aten::mm", 4, 0.05),
        ("bitsandbytes::dequantize_4bit", 2, 0.03),
    ]
    assert len(out["top_cpu_ops"]) == 4
    liger = "fused Triton kernels (Liger, inductor)"
    assert (
        trainbench.kernel_kind("_geglu_tanh_forward_kernel")
        == trainbench.kernel_kind("_rms_norm_backward_kernel")
        == liger
    )
    assert trainbench.kernel_kind("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>") != liger
