"""The SFT trainer that :func:`medgemma_lib.training.train.run_training` builds, and what it is built from: our
config mapped onto TRL's and PEFT's (:func:`sft_config`, :func:`lora_config`, the only place this happens); the
model made trainable (:func:`prepare_model_for_training`: 4-bit layers in their trainable layout, LoRA, and the
speed levers: Liger's kernels (:func:`apply_liger`), attention within each packed example
(:func:`use_varlen_attention`), fused RMSNorm and LoRA kernels, compiled decoder layers
(:func:`compile_decoder_layers`)); :class:`LeanSFTTrainer` (TRL's ``SFTTrainer`` with label-only logits on CPU,
``token_type_ids`` for the multimodal class, per-example truncation before packing, the stop-token row's own
learning rate, the 4-bit layout guard) and :func:`build_trainer`; the callbacks it runs with (Ctrl+C through
:class:`GracefulStop` / :class:`StopOnInterrupt`: finish the step, save, stop, on every DDP rank; Chinese progress
in a terminal and in a notebook; TensorBoard); CPU threads and the DDP world size; and what a failed run says in
Chinese (:func:`oom_error`, :func:`write_error`), with :func:`free_memory` between runs.

Speed on CPU (the demo): the 262,144-token output layer costs as much per position as the rest of
the 270M model, so :class:`LeanSFTTrainer` projects only the positions that carry a label
(``logits_to_keep`` with a boolean mask) and skips TRL's entropy metric; packing (best-fit
decreasing, padding-free) removes padding. On CUDA TRL's own fused, chunked LM head is used (it takes
the place of Liger's fused linear cross-entropy, which TRL refuses), plus, as measured on the H200
(docs/benchmarks.md): Liger's RMSNorm / RoPE / GeGLU kernels (:func:`apply_liger`) and, for packed
rows, attention within each example only (:func:`use_varlen_attention`).
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset

from medgemma_lib.core import display
from medgemma_lib.core.config import RunConfig
from medgemma_lib.core.errors import OutputError, ResourceError, TrainingError
from medgemma_lib.core.paths import display_path
from medgemma_lib.core.profiles import ModelProfile
from medgemma_lib.models import loading as models
from medgemma_lib.models import lora_kernels, norm_kernels
from medgemma_lib.models.attention import register_varlen_attention, varlen_support
from medgemma_lib.setup import memory
from medgemma_lib.training import checkpoints, stopping
from medgemma_lib.training.runs import CHECKPOINT_DIR, CONFIG_FILE, TENSORBOARD_DIR


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------------------
# Configs for TRL and PEFT


def lora_config(cfg: RunConfig, profile: ModelProfile, token_ids: list[int] | None = None) -> LoraConfig:
    """PEFT ``LoraConfig``: every linear layer of the language model by default, never the vision tower.

    ``token_ids``: embedding rows to train as well (the stop token, when :mod:`medgemma_lib.training.stopping` finds
    that the base never learned to stop). PEFT's ``trainable_token_indices`` trains just those rows; the
    tied output layer reads the same rows, and the adapter stores them (2 × hidden values).
    """
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=profile.lora_target_modules(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        # No modules_to_save: a trainable copy of the 262k-token embedding would add ~0.7–2.8 GB.
        trainable_token_indices=list(token_ids) if token_ids else None,
    )


def sft_config(
    cfg: RunConfig, run_dir: Path, device: str, micro_batch: int | None = None, grad_accum: int | None = None
):
    """TRL ``SFTConfig`` from our config (the only place that maps our fields onto TRL's)."""
    t = cfg.train
    dtype = models.compute_dtype(device)
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
        # TRL's saved-tensor hooks: with checkpointing they hold the inputs each checkpointed layer keeps (CUDA only).
        activation_offloading=bool(t.activation_offloading) and device.startswith("cuda"),
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
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        disable_tqdm=False,
        save_only_model=False,
        remove_unused_columns=True,
    )


# ----------------------------------------------------------------------------------------------
# The trainer


class LeanSFTTrainer(SFTTrainer):
    """TRL's trainer with these additions.

    * ``label_only_logits`` (CPU): the model's own forward with ``logits_to_keep`` set to the
      positions whose next token is trained, so the 262k-wide LM head never runs on prompt or
      padding positions; token accuracy comes from those logits, entropy is not computed.
    * Multimodal Gemma 3 trained on text gets the ``token_type_ids`` it expects (all text).
    """

    label_only_logits: bool = False
    needs_token_type_ids: bool = False
    stop_token_lr: float | None = None  # learning rate of the trained stop-token row (its own optimizer group)

    def __init__(self, *args, example_max_length: int | None = None, **kwargs):
        # packing: cut each example to this before packing rows of max_length (read while __init__ prepares the data)
        self.example_max_length = example_max_length
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not packing or not self.example_max_length or self.example_max_length >= args.max_length:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

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

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the stop token's embedding row (if trained) in a group of its own:
        ``lora.stop_token_learning_rate``, no weight decay, the same schedule (the scheduler is built after this)."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        rows = {id(p) for _, p in stopping.trainable_token_params(self.model if model is None else model)}
        if not fresh or not rows or not self.stop_token_lr:
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in rows]
            group["params"] = [p for p in group["params"] if id(p) not in rows]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        optimizer.add_param_group({"params": moved, "lr": self.stop_token_lr, "weight_decay": 0.0})
        return optimizer

    # No 4-bit layer may enter bitsandbytes' CPU inference layout (no backward) while this trainer owns the
    # model: checked before every evaluation batch (where the packing would happen) and every training step.
    def training_step(self, model, *args, **kwargs):
        models.use_trainable_4bit_layout(model)
        return super().training_step(model, *args, **kwargs)

    def prediction_step(self, model, *args, **kwargs):
        models.use_trainable_4bit_layout(model)
        return super().prediction_step(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.needs_token_type_ids and "token_type_ids" not in inputs:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        if not self.label_only_logits or return_outputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        targets_mask = labels[:, 1:] != -100
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets_mask
        forward_inputs = {
            k: v
            for k, v in inputs.items()
            if k not in ("labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
        }
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
                n_tokens = (
                    inputs["position_ids"].size(1)
                    if "attention_mask" not in inputs
                    else int(inputs["attention_mask"].sum())
                )
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(torch.tensor(n_tokens)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


def build_trainer(cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, callbacks, micro_batch, grad_accum):
    args = sft_config(cfg, run_dir, device, micro_batch, grad_accum)
    if eval_ds is None:
        args.eval_strategy = "no"
    try:
        trainer = LeanSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
            example_max_length=cfg.train.max_example_length if cfg.train.packing else None,
        )
    except ImportError as exc:
        raise TrainingError(f"缺少訓練需要的套件：{exc}", hint="請執行 pip install -r requirements.txt。") from None
    trainer.label_only_logits = device == "cpu"
    trainer.stop_token_lr = cfg.lora.stop_token_learning_rate
    trainer.needs_token_type_ids = (
        getattr(model.config, "model_type", "") == "gemma3" or "vision_config" in model.config.to_dict()
    )
    if device == "cpu":
        # TRL stores QLoRA adapters in bf16 (a GPU recommendation); on CPU we compute in fp32, so keep them fp32.
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainer


# ----------------------------------------------------------------------------------------------
# The model as it trains


def prepare_model_for_training(
    cfg: RunConfig, model, profile, device: str, verbose: bool = True, token_ids: list[int] | None = None
):
    """The model as :func:`run_training` trains it: 4-bit layers in their trainable layout, Liger and
    varlen attention on CUDA, then LoRA (seeded; ``token_ids``: embedding rows trained too, kept in fp32
    so that small updates are not rounded away in bf16). A model that already has LoRA keeps it."""
    if (
        models.use_trainable_4bit_layout(model) and verbose
    ):  # a model passed in after it generated or evaluated on a CPU
        print(
            "注意：這個模型的 4 位元層曾被 bitsandbytes 轉成只能推論的 CPU 格式，已轉回可訓練的格式再開始訓練。",
            flush=True,
        )
    if device.startswith("cuda") and not isinstance(model, PeftModel):
        if cfg.train.use_liger_kernel:
            apply_liger(model, rms_norm=not cfg.train.fused_rms_norm)
        if cfg.train.packing or cfg.train.padding_free:
            use_varlen_attention(model, verbose=verbose)
    if not isinstance(model, PeftModel):
        set_seed(cfg.train.seed)  # the Trainer seeds only after the model exists: seed the LoRA init here
        model = get_peft_model(model, lora_config(cfg, profile, token_ids))
        for _, param in stopping.trainable_token_params(model):
            param.data = param.data.float()
        if token_ids:
            # TRL's fused LM head (CUDA) reads lm_head.weight (PEFT's wrapper gives the merged rows) and .bias, which
            # the wrapper does not pass through: expose the base layer's (None for Gemma).
            head = model.get_output_embeddings()
            if hasattr(head, "token_adapter"):
                object.__setattr__(head, "bias", head.token_adapter.base_layer.bias)
    if cfg.train.fused_rms_norm:
        norm_kernels.fuse_rms_norms(model)
    if cfg.train.fused_lora:
        n = lora_kernels.fuse_lora_layers(model)
        if verbose and cfg.lora.dropout > 0:
            print(
                f"注意：train.fused_lora 只用在 dropout 為 0 的 LoRA 層；lora.dropout={cfg.lora.dropout:g}，"
                f"這 {n} 層仍由 PEFT 計算。",
                flush=True,
            )
    if cfg.train.compile_layers and device.startswith("cuda"):
        compile_decoder_layers(model)
    elif cfg.train.compile_layers and verbose:
        print(
            "注意：train.compile_layers 只在 CUDA 上使用；CPU 上不編譯（以 AVX2 向量指令編譯時實測 loss 變成 NaN）。",
            flush=True,
        )
    return model


COMPILE_RECOMPILE_LIMIT = 64  # two layer kinds (sliding / full attention) × a few row lengths, with room


def compile_decoder_layers(model) -> int:
    """``torch.compile`` each decoder layer of the language model on its own (regional compilation; CUDA only).

    The compiled region is one layer's norms, LoRA linears, NF4 dequantisation, RoPE and MLP; the
    attention kernel over packed examples stays outside (:func:`medgemma_lib.models.attention.varlen_attention_forward`
    is excluded from compilation, as its per-example lengths are data). Layers of one kind share the
    compiled code, so a 62-layer model compiles twice (sliding and full attention), then once more when
    the row length first changes (shapes then become dynamic). Returns the number of layers compiled.

    :func:`prepare_model_for_training` calls it on CUDA only: on the CPU, torch 2.13's inductor with AVX2
    vectorisation (``ATEN_CPU_CAPABILITY=avx2`` on this project's CI machines) gave a NaN loss for the compiled
    Gemma 3 layers, while with AVX-512 it matched the fp32 reference to 6.5e-6 (2026-12-03).
    """
    import torch._dynamo  # noqa: PLC0415 - torch's compiler settings; imported only when compilation is asked for

    for key in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; set whichever exists
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), COMPILE_RECOMPILE_LIMIT))
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer") and "vision" not in type(module).__module__:
            if getattr(module, "_compiled_call_impl", None) is None:
                module.compile()
            n += 1
    return n


def apply_liger(model, rms_norm: bool = True) -> None:
    """Liger's Gemma 3 kernels (RMSNorm, RoPE, GeGLU) on ``model`` (CUDA, before LoRA), once.

    Not its fused linear cross-entropy: TRL 1.16 refuses it and computes the loss with its own fused,
    chunked LM head, which likewise never builds the full 262k-wide logits. ``rms_norm=False`` leaves the
    norms to :func:`medgemma_lib.models.norm_kernels.fuse_rms_norms` (``train.fused_rms_norm``).
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
    kernels = {
        "rope": True,
        "rms_norm": rms_norm,
        "geglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
    before = {(m, k): v for m in _liger_patched_modules() for k, v in vars(m).items()}
    if getattr(model.config, "model_type", "") == "gemma3":  # multimodal checkpoint (4B): text layers get the kernels
        apply_liger_kernel_to_gemma3(model=model, layer_norm=False, **kernels)
    else:
        apply_liger_kernel_to_gemma3_text(model=model, **kernels)
    for (module, name), value in before.items():
        if vars(module).get(name) is not value:
            _LIGER_GLOBALS.setdefault((module, name), value)
    model._medgemma_liger = True


# (module, attribute) -> transformers' own value, for each module-level name Liger replaced (RoPE function,
# RMSNorm and MLP classes): a model *built later in the same process* would otherwise be built from Liger's classes.
_LIGER_GLOBALS: dict = {}


def _liger_patched_modules() -> list:
    from transformers.models.gemma3 import modeling_gemma3

    return [modeling_gemma3]


def restore_liger_globals() -> int:
    """Put back transformers' Gemma 3 classes and functions that :func:`apply_liger` replaced module-wide.

    :func:`~.train.run_training` calls it when training ends, so that the evaluation that follows in the
    same process (``quality``, the demo) loads transformers' own model. Measured on an H100 (2026-12-06, the
    full-data adapter, 16 held-out questions, greedy, 384 tokens): a fresh process stopped 5 of 16 answers; a model
    loaded after Liger's patches stopped 1 of 16. The trained instance keeps its own patched modules.
    """
    n = len(_LIGER_GLOBALS)
    for (module, name), value in _LIGER_GLOBALS.items():
        setattr(module, name, value)
    _LIGER_GLOBALS.clear()
    return n


def use_varlen_attention(model, verbose: bool = True) -> str:
    """Attention within each packed example (flash varlen) when the installed torch has it, else sdpa."""
    if not varlen_support()["torch.nn.attention.varlen"]:
        if verbose:
            print(
                "注意：這個 PyTorch 沒有 torch.nn.attention.varlen，打包的資料改用 sdpa 注意力（較慢，結果相同）。",
                flush=True,
            )
        return getattr(model.config, "_attn_implementation", "sdpa")
    name = register_varlen_attention()
    configs = [
        model.config,
        getattr(model.config, "text_config", None),
        *(getattr(m, "config", None) for m in model.modules()),
    ]
    for config in {id(c): c for c in configs if c is not None}.values():
        if getattr(config, "model_type", "") == "gemma3_text":  # the language model only; the vision tower keeps sdpa
            config._attn_implementation = name
    return name


def tensorboard_callback(run_dir: Path):
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)))


def set_cpu_threads(cfg: RunConfig, device: str) -> int | None:
    """Use the configured (or all) cores, split between processes under ``accelerate launch``."""
    if device != "cpu":
        return None

    n = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // world_size())
    torch.set_num_threads(n)
    return n


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
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
        return False

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl+C: give the user back the usual immediate interrupt
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print(
                "\n收到中斷（Ctrl+C）：這一步結束後會儲存完整的檢查點並停止，之後可以用 --resume 接續。"
                "再按一次 Ctrl+C 會立即中止（不儲存）。",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self) -> bool:
        """Whether to stop now; with several processes, true when any of them was interrupted."""

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def callback(self) -> StopOnInterrupt:
        return StopOnInterrupt(self)


class StopOnInterrupt(TrainerCallback):
    """Save and stop at the end of the step in which a Ctrl+C arrived (see :class:`GracefulStop`)."""

    def __init__(self, stop: GracefulStop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.agreed():
            control.should_save = True
            control.should_training_stop = True
        return control


# ----------------------------------------------------------------------------------------------
# Progress in a terminal


def format_log_line(logs: dict, step: int, max_steps: int) -> str | None:
    """One Chinese line for a Trainer log record (terminal), or None for records the summary reports."""
    if "eval_loss" in logs:
        return f"第 {step}/{max_steps} 步：驗證集 loss {logs['eval_loss']:.4f}"
    if "loss" in logs:
        lr = logs.get("learning_rate")
        extra = f"，學習率 {float(lr):.2e}" if lr is not None else ""
        return f"第 {step}/{max_steps} 步：訓練 loss {float(logs['loss']):.4f}{extra}"
    return None


class ChineseProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with Chinese log lines instead of English dicts and no nested evaluation bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = format_log_line(logs, state.global_step, state.max_steps)
            if line:
                self.training_bar.write(line)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # no second bar under the training bar


class NotebookChineseProgress(TrainerCallback):
    """In a notebook: one Chinese status line updated in place, instead of the Trainer's English HTML table.

    While training: 「訓練中：第 12／20 步（60%）｜訓練 loss 2.2753｜驗證 loss 2.0740｜已用 52 秒，預估還要 35 秒」;
    at the end the stored line says 「訓練結束：第 20／20 步 ✓…（112 秒）」. The loss curve is drawn live by
    :class:`medgemma_lib.training.monitor.LiveLossPlotCallback`.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.handle = None
        self.started = None
        self.start_step = 0
        self.last_update = 0.0
        self.train_loss = None
        self.eval_loss = None

    def line(self, state, final: bool = False, evaluating: bool = False) -> str:
        step, total = state.global_step, state.max_steps or 0
        share = f"（{step / total:.0%}）" if total else ""
        parts = [f"{'訓練結束' if final else '訓練中'}：第 {step}／{total} 步{' ✓' if final else share}"]
        if self.train_loss is not None:
            parts.append(f"訓練 loss {self.train_loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"驗證 loss {self.eval_loss:.4f}")
        elapsed = time.time() - (self.started or time.time())
        if final:
            parts.append(f"共 {display.format_seconds(elapsed)}")
        else:
            done = step - self.start_step
            timing = f"已用 {display.format_seconds(elapsed)}"
            if done > 0 and total > step:
                timing += f"，預估還要 {display.format_seconds(elapsed / done * (total - step))}"
            parts.append(timing)
            if evaluating:
                parts.append("正在計算驗證 loss…")
        return "｜".join(parts)

    def _show(self, text: str) -> None:
        from IPython.display import display as ipy_display

        if self.handle is None:
            self.handle = ipy_display(display.Text(text), display_id=True)
        else:
            self.handle.update(display.Text(text))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.started, self.start_step = time.time(), state.global_step
            self._show(self.line(state))

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if state.is_world_process_zero and now - self.last_update >= self.interval:
            self.last_update = now
            self._show(self.line(state))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            self.eval_loss = float(metrics["eval_loss"])
            self._show(self.line(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            if "loss" in logs:
                self.train_loss = float(logs["loss"])
            if "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.started is not None:
            self._show(self.line(state, final=True))


def use_chinese_progress(trainer) -> None:
    """Replace the Trainer's English progress display by a Chinese one.

    In a terminal: :class:`ChineseProgressCallback` (the tqdm bar with Chinese log lines). In a notebook:
    :class:`NotebookChineseProgress` instead of transformers' ``NotebookProgressCallback`` HTML table
    ("Training Loss", "No log", "Epoch 0/1"), which a stored notebook would show in English.
    """
    callbacks = trainer.callback_handler.callbacks
    # By name: importing transformers.utils.notebook needs IPython, which a GPU server's environment may lack.
    notebook = next((type(cb) for cb in callbacks if type(cb).__name__ == "NotebookProgressCallback"), None)
    if notebook is not None:
        trainer.remove_callback(notebook)
        trainer.add_callback(NotebookChineseProgress())
        return
    if not any(type(cb) is ProgressCallback for cb in callbacks):
        return
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ChineseProgressCallback())


# ----------------------------------------------------------------------------------------------
# Out of memory and failed writes


def oom_error(cfg: RunConfig, micro_batch: int, grad_accum: int, device: str) -> ResourceError:
    """A Chinese explanation of a CUDA out-of-memory error, with the estimator's numbers and advice."""
    t = cfg.train
    estimate_text = ""
    advice_text = ""
    try:
        profile = cfg.model.profile
        setup = memory.setup_for_run(cfg, device, micro_batch)
        est = memory.estimate_training_memory(setup)
        estimate_text = (
            f"估算這個設定需要約 {est.needs_card_gib():.1f} GiB（峰值 allocated {est.peak_allocated_gib:.1f} GiB）。"
        )
        gpu_gib = None
        if device.startswith("cuda"):
            gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
            estimate_text += f"這張 GPU 有 {gpu_gib:.1f} GiB。"
            advice_text = memory.advise(profile, gpu_gib)["advice"]
    except Exception:  # noqa: BLE001 - the estimator is optional help; the OOM message must still appear
        pass
    hint_parts = [
        f"把 train.per_device_train_batch_size 減半（目前 {micro_batch}）"
        f"並把 train.gradient_accumulation_steps 加倍（目前 {grad_accum}），等效批次不變",
        "開啟 train.gradient_checkpointing=true"
        if not t.gradient_checkpointing
        else f"縮短 train.max_length（目前 {t.max_length}）",
        "或設定 train.auto_oom_retry=true 讓程式自動重試",
    ]
    if advice_text:
        hint_parts.insert(0, "估算器建議：" + advice_text)
    return ResourceError(
        f"訓練時記憶體不足（out of memory）：micro-batch {micro_batch}、"
        f"每列最多 {t.max_length} 個 token。{estimate_text}",
        hint="；".join(hint_parts) + "。可先執行 python -m medgemma_lib memory 查看估算。",
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_error(exc: OSError, what: str, ckpt_dir: Path, run_dir: Path):
    """A Chinese error for a failed write during training (disk full, quota, read-only, permissions).

    Whatever was being written is incomplete and will never be used (checkpoints and the adapter are
    only trusted with their completion marker); the newest complete checkpoint is named for ``--resume``.
    """
    reasons = {
        errno.ENOSPC: "磁碟空間不足",
        errno.EDQUOT: "超過磁碟配額",
        errno.EROFS: "磁碟是唯讀的",
        errno.EACCES: "沒有寫入權限",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    where = display_path(exc.filename) if getattr(exc, "filename", None) else display_path(run_dir)
    good = checkpoints.latest_complete_checkpoint(ckpt_dir)
    keep = (
        (
            f"之前完整的檢查點 {display_path(good)} 沒有受影響；清出空間後執行 python -m medgemma_lib train --config "
            f"{display_path(run_dir / CONFIG_FILE)} --resume 從它接續。"
        )
        if good
        else "清出空間後重新訓練。"
    )
    return OutputError(f"{what}時失敗：{reason}（{where}）。寫到一半的檔案不會被使用。", hint=keep)
