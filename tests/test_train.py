"""Training plumbing on the tiny random Gemma 3 (fast); real learning is tested in test_demo.py."""

from __future__ import annotations

import json
import math

import pytest
from cli_helpers import run_cli
from train_helpers import small_splits, tiny_overrides

from medgemma_lib.core.config import load_config


@pytest.fixture(scope="module")
def tiny_splits(demo_tokenizer):
    return small_splits(tokenizer=demo_tokenizer)


def test_lora_config_stays_in_language_model():
    from medgemma_lib.models.loading import PROFILES
    from medgemma_lib.training.trainer import lora_config

    cfg = load_config(None)
    text = lora_config(cfg, PROFILES["demo"])
    assert set(text.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (text.r, text.lora_alpha, text.lora_dropout) == (16, 32, 0.05)
    assert not text.modules_to_save  # no trainable copy of the 262k-token embedding
    mm = lora_config(cfg, PROFILES["medgemma-4b-it"])
    assert isinstance(mm.target_modules, str) and "language_model" in mm.target_modules
    import re

    assert re.fullmatch(mm.target_modules, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(mm.target_modules, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")


def test_sft_config_maps_our_settings(tmp_path):
    from medgemma_lib.training.trainer import sft_config

    cfg = load_config("configs/demo.yaml")
    args = sft_config(cfg, tmp_path, "cpu")
    assert args.completion_only_loss is True
    assert args.packing and args.packing_strategy == "bfd" and args.max_length == 256
    assert args.prediction_loss_only is True  # evaluation must not rebuild the full logits
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.bf16 is False and args.fp16 is False and args.use_cpu is True  # fp32 on CPU, never fp16
    assert args.get_warmup_steps(20) == 2  # a ratio rounded up: warmup really applies
    gpu = load_config("configs/medgemma-27b-24gb.yaml")
    assert gpu.train.gradient_checkpointing and gpu.train.packing


@pytest.mark.slow
def test_label_only_loss_equals_trl_loss(tiny_model_dir, tiny_splits, demo_tokenizer, tmp_path):
    """The CPU shortcut (logits only where a label is) gives TRL's loss and gradients."""
    import torch
    from peft import get_peft_model

    from medgemma_lib.models.loading import PROFILES, load_model
    from medgemma_lib.training.train import conversational_only
    from medgemma_lib.training.trainer import build_trainer as _build_trainer
    from medgemma_lib.training.trainer import lora_config

    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, "eq"))
    model = get_peft_model(load_model(str(tiny_model_dir), "none", "cpu"), lora_config(cfg, PROFILES["demo"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B so the adapter matters
    train = conversational_only(tiny_splits["train"])
    trainer = _build_trainer(cfg, tmp_path, "cpu", model, demo_tokenizer, train, None, [], 2, 1)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    model.eval()
    losses, grads = [], []
    for lean in (False, True):
        trainer.label_only_logits = lean
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tiny_splits, tmp_path_factory):
    from medgemma_lib.training.train import run_training

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, out, "tiny"))
    return run_training(cfg, datasets=tiny_splits)


@pytest.mark.slow
def test_run_folder_has_everything_evaluation_needs(tiny_run):
    from pathlib import Path

    from medgemma_lib.training import checkpoints

    run = Path(tiny_run.run_dir)
    assert Path(tiny_run.adapter_dir) == run / "adapter"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    resolved = load_config(run / "config.yaml")
    assert resolved.model.profile == tiny_run.profile and resolved.train.run_name == "tiny"
    for name in ("train_log.jsonl", "loss.png", "memory.json", "train_summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = checkpoints.list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-3", "checkpoint-6"]
    assert all(checkpoints.is_complete(c) for c in ckpts)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["initial_eval_loss"] and summary["final_eval_loss"]
    assert summary["trainable_params"] > 0 and summary["tokens_trained"] > 0
    memory = json.loads((run / "memory.json").read_text())
    assert memory["peak_rss_gib"] > 0 and memory["advice"]


def test_log_shows_warmup_then_decay_and_eval(tiny_run):
    from pathlib import Path

    from medgemma_lib.training.monitor import read_log

    records = read_log(Path(tiny_run.run_dir) / "train_log.jsonl")
    lrs = [r["learning_rate"] for r in records if "learning_rate" in r]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1, lrs  # rises to a peak, then falls
    assert all(a <= b for a, b in zip(lrs[: peak + 1], lrs[1 : peak + 1])), lrs
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])), lrs
    assert lrs[-1] < max(lrs) / 2
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert eval_steps == [0, 3, 6]
    assert all("cpu_rss_gib" in r for r in records if "loss" in r)


@pytest.mark.slow
def test_oom_is_retried_with_half_micro_batch(tiny_model_dir, tiny_splits, tmp_path, capsys):
    import torch
    from transformers import TrainerCallback

    from medgemma_lib.training.train import run_training

    class FakeOOM(TrainerCallback):
        """Raise CUDA's out-of-memory error on the first step while the micro-batch is 2."""

        def on_step_begin(self, args, state, control, **kwargs):
            if args.per_device_train_batch_size > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, "oom", max_steps=2, eval_steps=2, save_steps=2))
    result = run_training(cfg, datasets=tiny_splits, callbacks=[FakeOOM()], evaluate_before=False)
    assert (result.micro_batch, result.gradient_accumulation_steps, result.oom_retries) == (1, 2, 1)
    assert result.global_step == 2
    assert "記憶體不足" in capsys.readouterr().out


@pytest.mark.slow
def test_oom_without_retry_explains_in_chinese(tiny_model_dir, tiny_splits, tmp_path):
    import torch
    from transformers import TrainerCallback

    from medgemma_lib.core.errors import ResourceError
    from medgemma_lib.training.train import run_training

    class FakeOOM(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory.")

    cfg = load_config(
        None,
        tiny_overrides(tiny_model_dir, tmp_path, "oom2", max_steps=2, auto_oom_retry=False) + ["model.profile=demo"],
    )
    with pytest.raises(ResourceError) as info:
        run_training(
            cfg, datasets=tiny_splits, callbacks=[FakeOOM()], evaluate_before=False, model=_tiny_model(tiny_model_dir)
        )
    err = info.value
    assert "記憶體不足" in err.message and "micro-batch 2" in err.message
    assert "估算" in err.message  # the estimator's figure for this setting
    assert "gradient_accumulation_steps" in err.hint and "auto_oom_retry" in err.hint


def _tiny_model(folder):
    from medgemma_lib.models.loading import load_model

    return load_model(str(folder), "nf4", "cpu")


def test_resume_without_checkpoint_is_a_chinese_error(tmp_path):
    from medgemma_lib.core.errors import TrainingError
    from medgemma_lib.training.train import run_training

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.run_name=nothing"])
    with pytest.raises(TrainingError, match="找不到完整的檢查點"):
        run_training(cfg, resume=True)


def test_train_cli_bad_override_exit_2():

    proc = run_cli("train", "--config", "configs/demo.yaml", "train.max_stepz=3")
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr and "max_steps" in proc.stderr and "Traceback" not in proc.stderr
