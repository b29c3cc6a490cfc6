"""LoRA / QLoRA training: one function, :func:`run_training`, behind the CLI, the demo and notebook 05.

Reads top to bottom like TRL's ``sft.py``: config → data → model (NF4) → LoRA → ``SFTTrainer`` →
train (with out-of-memory retry) → save the run folder. The run folder ``results/<run-name>/`` holds::

    adapter/                 LoRA weights (adapter_model.safetensors) + adapter_config.json
    config.yaml              the resolved config (evaluation reads model.profile from it)
    train_log.jsonl          every logged loss / learning rate / validation loss, with memory
    loss.png                 train and validation loss curve
    memory.json              peak memory and the advice derived from it
    train_summary.json       initial and final validation loss, steps, timings, tokens/s
    tensorboard/             TensorBoard event files
    checkpoints/checkpoint-N resumable checkpoints (the last K), each marked complete when fully written

Speed on CPU (the demo): the 262,144-token output layer costs as much per position as the rest of
the 270M model, so :class:`LeanSFTTrainer` projects only the positions that carry a label
(``logits_to_keep`` with a boolean mask) and skips TRL's entropy metric; packing (best-fit
decreasing, padding-free) removes padding. On CUDA TRL's own fused, chunked LM head is used (it takes
the place of Liger's fused linear cross-entropy, which TRL refuses), plus, as measured on the H200
(docs/benchmarks.md): Liger's RMSNorm / RoPE / GeGLU kernels (:func:`apply_liger`) and, for packed
rows, attention within each example only (:func:`use_varlen_attention`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import warnings

from medgemma_lib.config import RunConfig, load_config, save_config
from medgemma_lib.errors import ConfigError, ResourceError, TrainingError, TrainingInterrupted

# transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*; TRL 1.16 and PEFT still read the
# old names, so every run printed three FutureWarnings (with the library's install path) that users cannot act on.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_kwargs)?` is deprecated", category=FutureWarning)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
# What a fresh run replaces; an old evaluation describes an adapter that no longer exists, so it goes too.
_RUN_ARTEFACTS = (ADAPTER_DIR, CHECKPOINT_DIR, "tensorboard", LOG_FILE, "loss.png", "memory.json", SUMMARY_FILE, "config.yaml",
                  "initial_eval.json", "demo_summary.json", "eval.json", "eval.md", "eval.png", "merged", "merged-float32")


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``train_summary.json``)."""

    run_dir: str
    adapter_dir: str
    profile: str
    device: str
    initial_eval_loss: float | None
    final_eval_loss: float | None
    global_step: int
    final_train_loss: float | None
    train_seconds: float
    train_cpu_seconds: float
    seconds_per_step: float | None
    tokens_trained: int
    tokens_per_second: float | None
    micro_batch: int
    gradient_accumulation_steps: int
    trainable_params: int
    total_params: int
    resumed_from: str | None = None
    oom_retries: int = 0
    memory: dict = field(default_factory=dict)
    memory_advice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def eval_loss_drop(self) -> float | None:
        if self.initial_eval_loss is None or self.final_eval_loss is None:
            return None
        return self.initial_eval_loss - self.final_eval_loss

    def summary_text(self) -> str:
        """A short Chinese report of the run."""
        lines = [f"訓練完成：{self.global_step} 步，耗時 {self.train_seconds:.0f} 秒（{self.device}）。"]
        if self.seconds_per_step:
            lines.append(f"  每步 {self.seconds_per_step:.2f} 秒，每秒 {self.tokens_per_second or 0:.0f} 個訓練 token（共 {self.tokens_trained} 個）。")
        if self.initial_eval_loss is not None and self.final_eval_loss is not None:
            rel = self.eval_loss_drop / self.initial_eval_loss if self.initial_eval_loss else 0.0
            lines.append(
                f"  驗證集 loss：{self.initial_eval_loss:.3f} → {self.final_eval_loss:.3f}（下降 {rel:.1%}；"
                f"困惑度 {math.exp(self.initial_eval_loss):.1f} → {math.exp(self.final_eval_loss):.1f}）"
            )
        if self.oom_retries:
            lines.append(f"  曾因記憶體不足自動重試 {self.oom_retries} 次；最後使用 micro-batch {self.micro_batch}、梯度累積 {self.gradient_accumulation_steps}。")
        if self.memory_advice:
            lines.append("  " + self.memory_advice)
        lines.append(f"  LoRA adapter：{display_path(self.adapter_dir)}")
        lines.append(f"  執行資料夾：{display_path(self.run_dir)}（loss.png、train_log.jsonl、tensorboard/）")
        return "\n".join(lines)


def display_path(path: str | os.PathLike) -> str:
    """A path relative to the current folder when inside it, else with the home folder shown as ``~``."""
    p = Path(os.fsdecode(path)).resolve()  # OSError.filename can be bytes (TensorBoard writes with byte paths)
    for base in (Path.cwd().resolve(), Path(__file__).resolve().parents[1]):  # the working folder, then the project
        try:
            return str(p.relative_to(base))
        except ValueError:
            pass
    home = Path.home().resolve()
    try:
        return "~/" + str(p.relative_to(home))
    except ValueError:
        return str(p)


# ----------------------------------------------------------------------------------------------
# Run folder


def default_run_name(cfg: RunConfig) -> str:
    profile = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.model.profile).name).strip("-") or "run"
    return f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir_for(cfg: RunConfig) -> Path:
    if not cfg.train.run_name:
        raise ConfigError("沒有指定執行名稱 train.run_name。", hint="請在設定檔或命令列加上 train.run_name=名稱。")
    return Path(cfg.train.output_dir) / cfg.train.run_name


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if not _is_main_process():
        return
    if run_dir.exists() and not resume:
        # Re-running a name starts over: remove only what a previous run of ours wrote.
        for name in _RUN_ARTEFACTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from medgemma_lib.errors import OutputError

        raise OutputError(f"無法建立執行資料夾 {run_dir}：{exc.strerror or exc}", hint="請確認磁碟空間與寫入權限，或改用 train.output_dir=其他資料夾。") from None


# ----------------------------------------------------------------------------------------------
# Building blocks


def lora_config(cfg: RunConfig, profile):
    """PEFT ``LoraConfig``: every linear layer of the language model by default, never the vision tower."""
    from peft import LoraConfig

    from medgemma_lib.models import lora_target_modules

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_modules(profile, cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        # No modules_to_save: a trainable copy of the 262k-token embedding would add ~0.7–2.8 GB.
    )


def sft_config(cfg: RunConfig, run_dir: Path, device: str, micro_batch: int | None = None, grad_accum: int | None = None):
    """TRL ``SFTConfig`` from our config (the only place that maps our fields onto TRL's)."""
    import torch
    from trl import SFTConfig

    from medgemma_lib.models import compute_dtype

    t = cfg.train
    dtype = compute_dtype(device)
    has_eval = t.eval_steps > 0
    packing = bool(t.packing)
    # TRL: padding-free without packing cannot truncate; packing (best-fit decreasing) is padding-free.
    padding_free = bool(t.padding_free) and not packing
    max_length = t.max_length if (packing or not padding_free) else None
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=micro_batch or t.per_device_train_batch_size,
        per_device_eval_batch_size=micro_batch or t.per_device_train_batch_size,
        gradient_accumulation_steps=grad_accum or t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # A float below 1 is a ratio that transformers rounds *up*, so a short run still warms up.
        warmup_steps=float(t.warmup_ratio),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=max_length,
        packing=packing,
        packing_strategy="bfd",
        padding_free=padding_free,
        completion_only_loss=True,
        # On CUDA run_training applies Liger itself (apply_liger): TRL would only repeat it, with a deprecation warning.
        use_liger_kernel=t.use_liger_kernel if device == "cpu" else False,
        prediction_loss_only=True,  # else TRL's evaluation rebuilds the full logits
        report_to=[],  # TensorBoard is attached as a callback writing into the run folder
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if _world_size() > 1 else None,
        disable_tqdm=False,
        save_only_model=False,
        remove_unused_columns=True,
    )


def make_lean_trainer_class():
    """``SFTTrainer`` whose loss projects only labelled positions through the LM head (CPU)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from medgemma_lib.models import use_trainable_4bit_layout

    class LeanSFTTrainer(SFTTrainer):
        """TRL's trainer with two additions.

        * ``label_only_logits`` (CPU): the model's own forward with ``logits_to_keep`` set to the
          positions whose next token is trained, so the 262k-wide LM head never runs on prompt or
          padding positions; token accuracy comes from those logits, entropy is not computed.
        * Multimodal Gemma 3 trained on text gets the ``token_type_ids`` it expects (all text).
        """

        label_only_logits: bool = False
        needs_token_type_ids: bool = False
        example_max_length: int | None = None  # packing: cut each example to this before packing rows of max_length

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            if not packing or not self.example_max_length or self.example_max_length >= args.max_length:
                return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            from trl.data_utils import pack_dataset

            row_length = args.max_length
            args.max_length = self.example_max_length  # TRL truncates (and drops fully masked examples) only unpacked
            try:
                dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
            finally:
                args.max_length = row_length
            dataset = dataset.select_columns(["input_ids", "labels"])
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Packing {dataset_name} dataset"}
            return pack_dataset(dataset, row_length, args.packing_strategy, map_kwargs)

        # No 4-bit layer may enter bitsandbytes' CPU inference layout (no backward) while this trainer owns the
        # model: checked before every evaluation batch (where the packing would happen) and every training step.
        def training_step(self, model, *args, **kwargs):
            use_trainable_4bit_layout(model)
            return super().training_step(model, *args, **kwargs)

        def prediction_step(self, model, *args, **kwargs):
            use_trainable_4bit_layout(model)
            return super().prediction_step(model, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.needs_token_type_ids and "token_type_ids" not in inputs:
                inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
            if not self.label_only_logits or return_outputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"]
            targets_mask = labels[:, 1:] != -100
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets_mask
            forward_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")}
            outputs = model(**forward_inputs, use_cache=False, logits_to_keep=keep)
            logits = outputs.logits.reshape(-1, outputs.logits.size(-1)).float()
            targets = labels[:, 1:][targets_mask]
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            n_local = targets.numel()
            denom = num_items_in_batch if num_items_in_batch is not None else n_local
            loss = loss_sum / torch.as_tensor(denom, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                correct = (logits.argmax(-1) == targets).sum()
                n_valid = self.accelerator.gather_for_metrics(torch.tensor(n_local, device=correct.device)).sum()
                correct = self.accelerator.gather_for_metrics(correct).sum()
                self._metrics[mode]["mean_token_accuracy"].append((correct / n_valid).item() if n_valid > 0 else 0.0)
                if mode == "train":
                    n_tokens = inputs["position_ids"].size(1) if "attention_mask" not in inputs else int(inputs["attention_mask"].sum())
                    self._total_train_tokens += int(self.accelerator.gather_for_metrics(torch.tensor(n_tokens)).sum())
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LeanSFTTrainer


def apply_liger(model) -> None:
    """Liger's Gemma 3 kernels (RMSNorm, RoPE, GeGLU) on ``model`` (CUDA, before LoRA), once.

    Not its fused linear cross-entropy: TRL 1.16 refuses it and computes the loss with its own fused,
    chunked LM head, which likewise never builds the full 262k-wide logits.
    """
    if getattr(model, "_medgemma_liger", False):
        return
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma3, apply_liger_kernel_to_gemma3_text
    except ImportError:
        raise TrainingError(
            "設定了 train.use_liger_kernel=true，但沒有安裝 liger-kernel。",
            hint="請執行 pip install liger-kernel==0.8.5，或改用 train.use_liger_kernel=false。",
        ) from None
    kernels = {"rope": True, "rms_norm": True, "geglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}
    if getattr(model.config, "model_type", "") == "gemma3":  # multimodal checkpoint (4B): text layers get the kernels
        apply_liger_kernel_to_gemma3(model=model, layer_norm=False, **kernels)
    else:
        apply_liger_kernel_to_gemma3_text(model=model, **kernels)
    model._medgemma_liger = True


def use_varlen_attention(model, verbose: bool = True) -> str:
    """Attention within each packed example (flash varlen) when the installed torch has it, else sdpa."""
    from medgemma_lib.attention import register_varlen_attention, varlen_support

    if not varlen_support()["torch.nn.attention.varlen"]:
        if verbose:
            print("注意：這個 PyTorch 沒有 torch.nn.attention.varlen，打包的資料改用 sdpa 注意力（較慢，結果相同）。", flush=True)
        return getattr(model.config, "_attn_implementation", "sdpa")
    name = register_varlen_attention()
    configs = [model.config, getattr(model.config, "text_config", None), *(getattr(m, "config", None) for m in model.modules())]
    for config in {id(c): c for c in configs if c is not None}.values():
        if getattr(config, "model_type", "") == "gemma3_text":  # the language model only; the vision tower keeps sdpa
            config._attn_implementation = name
    return name


def _tensorboard_callback(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))


def set_cpu_threads(cfg: RunConfig, device: str) -> int | None:
    """Use the configured (or all) cores, split between processes under ``accelerate launch``."""
    if device != "cpu":
        return None
    import torch

    n = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // _world_size())
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------
# Out of memory


def oom_error(cfg: RunConfig, micro_batch: int, grad_accum: int, device: str) -> ResourceError:
    """A Chinese explanation of a CUDA out-of-memory error, with the estimator's numbers and advice."""
    t = cfg.train
    estimate_text = ""
    advice_text = ""
    try:
        from medgemma_lib import memory

        profile = cfg.model.profile
        setup = memory.TrainingSetup(
            profile=profile, quantization=cfg.model.quantization, lora_r=cfg.lora.r,
            lora_targets=cfg.lora.target_modules if cfg.lora.target_modules == "all-linear" else tuple(cfg.lora.target_modules),
            micro_batch=micro_batch, seq_len=t.max_length, gradient_checkpointing=t.gradient_checkpointing,
            liger=t.use_liger_kernel, packing=t.packing,
        )
        est = memory.estimate_training_memory(setup)
        estimate_text = f"估算這個設定需要約 {est.needs_card_gib():.1f} GiB（峰值 allocated {est.peak_allocated_gib:.1f} GiB）。"
        gpu_gib = None
        if device.startswith("cuda"):
            import torch

            gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
            estimate_text += f"這張 GPU 有 {gpu_gib:.1f} GiB。"
            advice_text = memory.advise(profile, gpu_gib)["advice"]
    except Exception:  # noqa: BLE001 - the estimator is optional help; the OOM message must still appear
        pass
    hint_parts = [
        f"把 train.per_device_train_batch_size 減半（目前 {micro_batch}）並把 train.gradient_accumulation_steps 加倍（目前 {grad_accum}），等效批次不變",
        "開啟 train.gradient_checkpointing=true" if not t.gradient_checkpointing else f"縮短 train.max_length（目前 {t.max_length}）",
        "或設定 train.auto_oom_retry=true 讓程式自動重試",
    ]
    if advice_text:
        hint_parts.insert(0, "估算器建議：" + advice_text)
    return ResourceError(
        f"訓練時記憶體不足（out of memory）：micro-batch {micro_batch}、每列最多 {t.max_length} 個 token。{estimate_text}",
        hint="；".join(hint_parts) + "。可先執行 python -m medgemma_lib memory 查看估算。",
    )


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------
# Ctrl+C: a clean stop with a checkpoint


class GracefulStop:
    """First Ctrl+C (SIGINT, also Jupyter's "interrupt kernel"): finish the current step, save a complete
    checkpoint, stop (``run_training`` then raises :class:`TrainingInterrupted`). A second Ctrl+C stops
    at once, as Python normally does. Only the main thread can own a signal handler; elsewhere this
    does nothing. Under DDP every rank agrees on the stop at the same step (one tiny all-reduce per step).
    """

    def __init__(self, verbose: bool = True):
        self.requested = False
        self.verbose = verbose
        self._previous = None
        self._installed = False

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        import signal

        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
        return False

    def _handle(self, signum, frame):
        import signal
        import sys

        if self.requested:  # second Ctrl+C: give the user back the usual immediate interrupt
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("\n收到中斷（Ctrl+C）：這一步結束後會儲存完整的檢查點並停止，之後可以用 --resume 接續。"
                  "再按一次 Ctrl+C 會立即中止（不儲存）。", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Whether to stop now; with several processes, true when any of them was interrupted."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopOnInterrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.agreed():
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopOnInterrupt()


# ----------------------------------------------------------------------------------------------
# The training function


def run_training(
    cfg: RunConfig,
    *,
    callbacks: list | None = None,
    resume: bool = False,
    notebook: bool = False,
    datasets=None,
    model=None,
    tokenizer=None,
    evaluate_before: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Train LoRA on ``cfg`` and write the run folder; the CLI, the demo and notebook 05 all call this.

    ``datasets``: a prepared ``DatasetDict`` (train/validation[/test]); when None the data is prepared
    from ``cfg.data``. ``model``/``tokenizer``: already loaded ones (e.g. a notebook that loaded them
    earlier); when None they are loaded from ``cfg.model``. ``resume``: continue from the newest
    complete checkpoint of ``results/<run_name>/``. ``notebook``: draw the loss curve live.
    """
    import torch

    from medgemma_lib import checkpoints, monitor
    from medgemma_lib.models import default_device, load_model, load_tokenizer, resolve_profile

    if resume and not cfg.train.run_name:
        raise ConfigError("--resume 需要知道要接續哪一次執行。", hint="請加上 train.run_name=先前的執行名稱（results/ 底下的資料夾名）。")
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    run_dir = run_dir_for(cfg)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    resume_from = None
    if resume:
        removed = checkpoints.remove_incomplete_checkpoints(ckpt_dir) if _is_main_process() else []
        resume_from = checkpoints.latest_complete_checkpoint(ckpt_dir)
        if verbose:
            for ckpt, reason in removed:
                print(f"已移除無法使用的檢查點 {ckpt.name}（未寫完或已損壞）：{reason}", flush=True)
        if resume_from is None:
            raise TrainingError(f"在 {display_path(ckpt_dir)} 找不到完整的檢查點，無法接續訓練。", hint="請確認 train.run_name，或不加 --resume 重新開始。")
        if verbose:
            print(f"從檢查點 {display_path(resume_from)} 接續訓練。", flush=True)
    _prepare_run_dir(run_dir, resume)

    device = default_device()
    threads = set_cpu_threads(cfg, device)
    profile, _ = resolve_profile(cfg.model.profile)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.profile)
    if datasets is None:
        from medgemma_lib.data import prepare_from_config

        datasets, _report = prepare_from_config(cfg.data, output_dir=None, tokenizer=tokenizer)
    train_ds = _conversational_only(datasets["train"])
    eval_ds = _conversational_only(datasets["validation"]) if "validation" in datasets and len(datasets["validation"]) else None
    if len(train_ds) == 0:
        raise TrainingError("訓練集是空的，無法訓練。", hint="請檢查 data.input 與 data.max_train_examples。")
    if _is_main_process():
        save_config(cfg, run_dir / "config.yaml")

    if model is None:
        if verbose:
            print(f"載入模型 {cfg.model.profile}（{cfg.model.quantization}，{device}）…", flush=True)
        model = load_model(cfg.model.profile, cfg.model.quantization, device, attn_implementation=cfg.model.attn_implementation)
    model = prepare_model_for_training(cfg, model, profile, device, verbose=verbose)
    trainable, total = model.get_nb_trainable_parameters()
    if verbose:
        print(f"可訓練參數：{trainable:,}／全部 {total:,}（{trainable / total:.3%}），LoRA r={cfg.lora.r}、alpha={cfg.lora.alpha}", flush=True)

    initial_eval = _read_json(run_dir / "initial_eval.json") if resume else None
    micro_batch, grad_accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    log_path = run_dir / LOG_FILE
    previous_records = monitor.read_log(log_path) if resume else []
    oom_retries = 0
    started = time.time()
    cpu_started = time.process_time()
    stop = GracefulStop(verbose=verbose)
    with stop:
        while True:
            mon = monitor.make_monitor_callback(log_path, device, previous_records)
            cbs = [mon]
            if "tensorboard" in (cfg.train.report_to or []) and _is_main_process():
                cbs.append(_tensorboard_callback(run_dir))
            if notebook:
                cbs.append(monitor.make_live_plot_callback(mon))
            cbs.extend(callbacks or [])
            cbs.append(stop.callback())  # after the user's callbacks, before the marker: a Ctrl+C stop saves at this step
            cbs.append(checkpoints.make_marker_callback())  # last: marks a checkpoint complete after everything else
            trainer = _build_trainer(cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, cbs, micro_batch, grad_accum)
            _use_chinese_progress(trainer)
            try:
                if evaluate_before and eval_ds is not None and initial_eval is None:
                    initial_eval = trainer.evaluate()
                    if _is_main_process():
                        # the monitor callback already logged it as step 0 of the curve
                        (run_dir / "initial_eval.json").write_text(json.dumps(initial_eval), encoding="utf-8")
                    if verbose:
                        print(f"訓練前驗證集 loss：{initial_eval['eval_loss']:.4f}", flush=True)
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                break
            except OSError as exc:
                raise write_error(exc, "寫入檢查點或訓練紀錄", ckpt_dir, run_dir) from None
            except torch.OutOfMemoryError:
                del trainer
                _free_memory()
                if not cfg.train.auto_oom_retry or micro_batch <= 1:
                    raise oom_error(cfg, micro_batch, grad_accum, device) from None
                oom_retries += 1
                micro_batch, grad_accum = micro_batch // 2, grad_accum * 2
                if verbose:
                    print(f"記憶體不足：自動改用 micro-batch {micro_batch}、梯度累積 {grad_accum}（等效批次不變）重試。", flush=True)
                resume_from = checkpoints.latest_complete_checkpoint(ckpt_dir)
                previous_records = monitor.read_log(log_path)
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        raise TrainingInterrupted(trainer.state.global_step, checkpoints.latest_complete_checkpoint(ckpt_dir), run_dir)
    train_seconds = time.time() - started
    train_cpu = time.process_time() - cpu_started

    final_eval = None
    if eval_ds is not None:
        last = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == trainer.state.global_step]
        final_eval = last[-1] if last else trainer.evaluate()
    adapter_dir = run_dir / ADAPTER_DIR
    if _is_main_process() and (adapter_dir / checkpoints.MARKER).exists():
        (adapter_dir / checkpoints.MARKER).unlink()  # a resumed run rewrites the adapter: the old marker no longer holds
    try:
        trainer.save_model(str(adapter_dir))  # adapter_model.safetensors + adapter_config.json (main process)
        if _is_main_process():
            checkpoints.write_completion_marker(adapter_dir)  # sizes and SHA-256: evaluation refuses a damaged adapter
    except OSError as exc:
        raise write_error(exc, "寫入 LoRA 轉接器", ckpt_dir, run_dir) from None
    records = mon.records
    mem = monitor.memory_summary(records, device)
    advice = monitor.memory_advice(mem, micro_batch, cfg.train.gradient_checkpointing, cfg.train.max_length)
    steps_this_session = trainer.state.global_step - (_step_of(resume_from) or 0)
    train_metrics = [h for h in trainer.state.log_history if "loss" in h]
    tokens = int(trainer._total_train_tokens)
    pure_train = max(1e-9, sum(h.get("train_runtime", 0.0) for h in trainer.state.log_history if "train_runtime" in h) or train_seconds)
    result = TrainResult(
        run_dir=str(run_dir),
        adapter_dir=str(adapter_dir),
        profile=cfg.model.profile,
        device=device + (f"，{threads} 執行緒" if threads else ""),
        initial_eval_loss=initial_eval["eval_loss"] if initial_eval else None,
        final_eval_loss=final_eval["eval_loss"] if final_eval else None,
        global_step=trainer.state.global_step,
        final_train_loss=train_metrics[-1]["loss"] if train_metrics else None,
        train_seconds=round(train_seconds, 1),
        train_cpu_seconds=round(train_cpu, 1),
        seconds_per_step=round(pure_train / steps_this_session, 3) if steps_this_session > 0 else None,
        tokens_trained=tokens,
        tokens_per_second=round(tokens / pure_train, 1) if tokens else None,
        micro_batch=micro_batch,
        gradient_accumulation_steps=grad_accum,
        trainable_params=int(trainable),
        total_params=int(total),
        resumed_from=str(resume_from) if resume else None,
        oom_retries=oom_retries,
        memory=mem,
        memory_advice=advice,
    )
    if _is_main_process():
        (run_dir / "memory.json").write_text(json.dumps({**mem, "advice": advice, "per_log": [{k: v for k, v in r.items() if "gib" in k or k == "step"} for r in records]}, ensure_ascii=False, indent=1), encoding="utf-8")
        fig = monitor.plot_loss_curve(records, run_dir / "loss.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        (run_dir / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    if verbose:
        print(result.summary_text(), flush=True)
    result.trainer = trainer  # for notebooks and the demo's held-out evaluation (not serialised)
    return result


def prepare_model_for_training(cfg: RunConfig, model, profile, device: str, verbose: bool = True):
    """The model as :func:`run_training` trains it: 4-bit layers in their trainable layout, Liger and
    varlen attention on CUDA, then LoRA (seeded). A model that already has LoRA keeps it."""
    from peft import PeftModel, get_peft_model

    from medgemma_lib.models import use_trainable_4bit_layout

    if use_trainable_4bit_layout(model) and verbose:  # a model passed in after it generated or evaluated on a CPU
        print("注意：這個模型的 4 位元層曾被 bitsandbytes 轉成只能推論的 CPU 格式，已轉回可訓練的格式再開始訓練。", flush=True)
    if device.startswith("cuda") and not isinstance(model, PeftModel):
        if cfg.train.use_liger_kernel:
            apply_liger(model)
        if cfg.train.packing or cfg.train.padding_free:
            use_varlen_attention(model, verbose=verbose)
    if not isinstance(model, PeftModel):
        from transformers import set_seed

        set_seed(cfg.train.seed)  # the Trainer seeds only after the model exists: seed the LoRA init here
        model = get_peft_model(model, lora_config(cfg, profile))
    return model


def write_error(exc: OSError, what: str, ckpt_dir: Path, run_dir: Path):
    """A Chinese error for a failed write during training (disk full, quota, read-only, permissions).

    Whatever was being written is incomplete and will never be used (checkpoints and the adapter are
    only trusted with their completion marker); the newest complete checkpoint is named for ``--resume``.
    """
    import errno

    from medgemma_lib import checkpoints
    from medgemma_lib.errors import OutputError

    reasons = {errno.ENOSPC: "磁碟空間不足", errno.EDQUOT: "超過磁碟配額", errno.EROFS: "磁碟是唯讀的", errno.EACCES: "沒有寫入權限"}
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    where = display_path(exc.filename) if getattr(exc, "filename", None) else display_path(run_dir)
    good = checkpoints.latest_complete_checkpoint(ckpt_dir)
    keep = (f"之前完整的檢查點 {display_path(good)} 沒有受影響；清出空間後執行 python -m medgemma_lib train --config "
            f"{display_path(run_dir / 'config.yaml')} --resume 從它接續。") if good else "清出空間後重新訓練。"
    return OutputError(f"{what}時失敗：{reason}（{where}）。寫到一半的檔案不會被使用。", hint=keep)


def format_log_line(logs: dict, step: int, max_steps: int) -> str | None:
    """One Chinese line for a Trainer log record (terminal), or None for records the summary reports."""
    if "eval_loss" in logs:
        return f"第 {step}/{max_steps} 步：驗證集 loss {logs['eval_loss']:.4f}"
    if "loss" in logs:
        lr = logs.get("learning_rate")
        extra = f"，學習率 {float(lr):.2e}" if lr is not None else ""
        return f"第 {step}/{max_steps} 步：訓練 loss {float(logs['loss']):.4f}{extra}"
    return None


def _use_chinese_progress(trainer) -> None:
    """In a terminal, replace the Trainer's English dict lines (and the nested evaluation bar) with Chinese lines.

    Notebooks keep their own progress display (and notebook 05 draws the loss curve live).
    """
    from transformers.trainer_callback import ProgressCallback

    plain = [cb for cb in trainer.callback_handler.callbacks if type(cb) is ProgressCallback]
    if not plain:
        return

    class ChineseProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                line = format_log_line(logs, state.global_step, state.max_steps)
                if line:
                    self.training_bar.write(line)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # no second bar under the training bar

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ChineseProgressCallback())


def _build_trainer(cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, callbacks, micro_batch, grad_accum):
    import torch

    args = sft_config(cfg, run_dir, device, micro_batch, grad_accum)
    if eval_ds is None:
        args.eval_strategy = "no"
    trainer_cls = make_lean_trainer_class()
    trainer_cls.example_max_length = cfg.train.max_example_length if cfg.train.packing else None
    try:
        trainer = trainer_cls(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
        )
    except ImportError as exc:
        raise TrainingError(f"缺少訓練需要的套件：{exc}", hint="請執行 pip install -r requirements.txt。") from None
    trainer.label_only_logits = device == "cpu"
    trainer.needs_token_type_ids = getattr(model.config, "model_type", "") == "gemma3" or "vision_config" in model.config.to_dict()
    if device == "cpu":
        # TRL stores QLoRA adapters in bf16 (a GPU recommendation); on CPU we compute in fp32, so keep them fp32.
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainer


def _conversational_only(ds):
    keep = [c for c in ("prompt", "completion") if c in ds.column_names]
    if len(keep) != 2:
        raise TrainingError(
            f"資料集缺少 prompt／completion 欄位（找到：{', '.join(ds.column_names)}）。",
            hint="請用 medgemma_lib.data.prepare_from_config 準備資料。",
        )
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _step_of(path) -> int | None:
    if not path:
        return None
    from medgemma_lib.checkpoints import checkpoint_step

    return checkpoint_step(Path(path))


# ----------------------------------------------------------------------------------------------
# CLI


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="LoRA／QLoRA 訓練（設定檔＋覆寫），結果寫到 results/<執行名稱>/")
    p.add_argument("--config", "-c", default="configs/demo.yaml", help="設定檔（YAML），預設 configs/demo.yaml")
    p.add_argument("--resume", action="store_true", help="從 results/<run_name>/checkpoints 中最新的完整檢查點接續")
    p.add_argument("--run-name", help="執行名稱（等同 train.run_name=...）")
    p.add_argument("overrides", nargs="*", metavar="區段.鍵=值", help="覆寫設定，例如 train.max_steps=20 lora.r=8")
    p.set_defaults(func=_cli_train)


def _cli_train(args) -> int:
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    cfg = load_config(args.config, overrides)
    result = run_training(cfg, resume=args.resume)
    if result.initial_eval_loss is not None and result.final_eval_loss is not None and result.final_eval_loss >= result.initial_eval_loss:
        print("注意：驗證集 loss 沒有下降。可以提高學習率、增加步數，或檢查資料。", flush=True)
    return 0
