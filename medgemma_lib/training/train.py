"""LoRA / QLoRA training: one function, :func:`run_training`, behind the CLI, the demo and notebook 05.

Reads top to bottom like TRL's ``sft.py``: config → data → model (NF4) → LoRA → ``SFTTrainer`` →
train (with out-of-memory retry) → save the run folder (layout: :mod:`medgemma_lib.training.runs`). The
trainer's parts (TRL/PEFT configs, the ``SFTTrainer`` subclass, Ctrl+C, progress, Liger and varlen
attention, error messages) are in :mod:`medgemma_lib.training.trainer`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch

from medgemma_lib.core import display
from medgemma_lib.core.atomic import write_json
from medgemma_lib.core.config import RunConfig, save_config, validate_run
from medgemma_lib.core.errors import ConfigError, TrainingError, TrainingInterrupted
from medgemma_lib.core.paths import display_path
from medgemma_lib.data import prepare_from_config
from medgemma_lib.models import loading as models
from medgemma_lib.training import checkpoints, monitor, stopping
from medgemma_lib.training.runs import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    INITIAL_EVAL_FILE,
    LOG_FILE,
    LOSS_PNG,
    MEMORY_FILE,
    STOP_TOKEN_FILE,
    SUMMARY_FILE,
    default_run_name,
    is_main_process,
    prepare_run_dir,
    run_dir_for,
    write_data_split,
)
from medgemma_lib.training.trainer import (
    GracefulStop,
    build_trainer,
    free_memory,
    oom_error,
    prepare_model_for_training,
    restore_liger_globals,
    set_cpu_threads,
    tensorboard_callback,
    use_chinese_progress,
    write_error,
)


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
    stop_token: dict = field(default_factory=dict)  # stopping.StopTokenCheck: measured before training, decision

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
            lines.append(
                f"  每步 {self.seconds_per_step:.2f} 秒，每秒 {self.tokens_per_second or 0:.0f} 個訓練 token"
                f"（共 {self.tokens_trained} 個）。"
            )
        if self.initial_eval_loss is not None and self.final_eval_loss is not None:
            rel = self.eval_loss_drop / self.initial_eval_loss if self.initial_eval_loss else 0.0
            lines.append(
                f"  驗證集 loss：{self.initial_eval_loss:.3f} → {self.final_eval_loss:.3f}（下降 {rel:.1%}；"
                f"困惑度 {math.exp(self.initial_eval_loss):.1f} → {math.exp(self.final_eval_loss):.1f}）"
            )
        if self.oom_retries:
            lines.append(
                f"  曾因記憶體不足自動重試 {self.oom_retries} 次；"
                f"最後使用 micro-batch {self.micro_batch}、梯度累積 {self.gradient_accumulation_steps}。"
            )
        if self.stop_token:
            lines.append("  " + stopping.StopTokenCheck.from_dict(self.stop_token).message())
        if self.memory_advice:
            lines.append("  " + self.memory_advice)
        lines.append(f"  LoRA adapter：{display_path(self.adapter_dir)}")
        lines.append(f"  執行資料夾：{display_path(self.run_dir)}（loss.png、train_log.jsonl、tensorboard/）")
        return "\n".join(lines)


SETTINGS_SHOWN = (
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "per_device_train_batch_size",
    "max_length",
    "packing",
    "gradient_checkpointing",
    "eval_steps",
    "save_steps",
)


def settings_table(cfg: RunConfig) -> pd.DataFrame:
    """The settings that shape a run (training, LoRA, quantisation) as a two-column table (notebook 05)."""
    rows = [(k, getattr(cfg.train, k)) for k in SETTINGS_SHOWN]
    rows += [
        ("lora.r", cfg.lora.r),
        ("lora.alpha", cfg.lora.alpha),
        ("lora.target_modules", cfg.lora.target_modules),
        ("model.quantization", cfg.model.quantization),
    ]
    return pd.DataFrame(rows, columns=["設定", "值"]).set_index("設定")


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
    model_source: models.ResolvedModel | None = None,
    data_report: dict | None = None,
) -> TrainResult:
    """Train LoRA on ``cfg`` and write the run folder; the CLI, the demo and notebook 05 all call this.

    ``datasets``: a prepared ``DatasetDict`` (train/validation[/test]); when None the data is prepared
    from ``cfg.data``; ``data_report``: its prepare report, kept in the run's ``data_split.json`` with the
    held-out splits, the train ids and the data's SHA-256 (:func:`~medgemma_lib.training.runs.write_data_split`).
    ``model``/``tokenizer``: already loaded ones (e.g. a notebook that loaded them earlier); when None they
    are loaded from ``cfg.model``. ``resume``: continue from the newest complete checkpoint of
    ``results/<run_name>/``. ``notebook``: draw the loss curve live, show Chinese
    status lines instead of the progress bars of TRL, datasets and transformers. ``model_source``: what
    :func:`~medgemma_lib.core.config.validate_run` returned for ``cfg`` (the CLI checked it already); the model
    is resolved once and that one object is loaded, so a local folder is not read again.
    """
    if notebook:
        display.quiet_progress_bars()
    # Everything `config check` checks, before anything is created (no run folder for a refused config).
    model_source = validate_run(cfg, check_data=datasets is None, model=model_source)
    run_dir, resume_from = run_folder_and_checkpoint(cfg, resume, verbose)
    device = models.default_device()
    threads = set_cpu_threads(cfg, device)
    model_source = models.resolve_model(model_source)  # the demo converted once; nothing below resolves it again
    tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(model_source)
    if datasets is None:
        datasets, data_report = prepare_from_config(cfg.data, output_dir=None, tokenizer=tokenizer)
    train_ds, eval_ds = training_splits(datasets)
    start_run_folder(run_dir, cfg, datasets, data_report, resume)  # only now: data and tokenizer were accepted
    model, check, params = model_for_training(
        cfg, model, model_source, device, tokenizer, train_ds, eval_ds, run_dir, resume, verbose
    )
    session = train_with_retries(
        cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, callbacks, notebook, resume_from, evaluate_before,
        verbose,
    )  # fmt: skip
    restore_liger_globals()  # what is loaded after training (evaluation, export) is transformers' own Gemma 3
    stop_if_interrupted(session, run_dir)
    final_eval = final_evaluation(session.trainer, eval_ds)
    adapter_dir = save_adapter(session.trainer, run_dir)
    result = training_result(cfg, session, run_dir, adapter_dir, device, threads, final_eval, params, check)
    write_summaries(run_dir, result, session.monitor.records)
    if verbose:
        print(result.summary_text(), flush=True)
    result.trainer = session.trainer  # for notebooks and the demo's held-out evaluation (not serialised)
    return result


def run_folder_and_checkpoint(cfg: RunConfig, resume: bool, verbose: bool) -> tuple[Path, Path | None]:
    """The run folder (named now when ``train.run_name`` is empty) and, with ``resume``, its newest complete
    checkpoint (damaged ones removed first); refused in Chinese when there is none."""
    if resume and not cfg.train.run_name:
        raise ConfigError(
            "--resume 需要知道要接續哪一次執行。",
            hint="請加上 train.run_name=先前的執行名稱（results/ 底下的資料夾名）。",
        )
    if not cfg.train.run_name:
        cfg.train.run_name = default_run_name(cfg)
    run_dir = run_dir_for(cfg)
    if not resume:
        return run_dir, None
    ckpt_dir = run_dir / CHECKPOINT_DIR
    removed = checkpoints.remove_incomplete_checkpoints(ckpt_dir) if is_main_process() else []
    resume_from = checkpoints.latest_complete_checkpoint(ckpt_dir)
    if verbose:
        for ckpt, reason in removed:
            print(f"已移除無法使用的檢查點 {ckpt.name}（未寫完或已損壞）：{reason}", flush=True)
    if resume_from is None:
        raise TrainingError(
            f"在 {display_path(ckpt_dir)} 找不到完整的檢查點，無法接續訓練。",
            hint="請確認 train.run_name，或不加 --resume 重新開始。",
        )
    if verbose:
        print(f"從檢查點 {display_path(resume_from)} 接續訓練。", flush=True)
    return run_dir, resume_from


def training_splits(datasets):
    """The train split and the validation split (None when empty), as prompt/completion only."""
    train_ds = conversational_only(datasets["train"])
    has_validation = "validation" in datasets and len(datasets["validation"])
    eval_ds = conversational_only(datasets["validation"]) if has_validation else None
    if len(train_ds) == 0:
        raise TrainingError("訓練集是空的，無法訓練。", hint="請檢查 data.input 與 data.max_train_examples。")
    return train_ds, eval_ds


def start_run_folder(run_dir: Path, cfg: RunConfig, datasets, data_report: dict | None, resume: bool) -> None:
    """Create (or reuse, when resuming) the run folder; write the config and what the run trains and is tested on."""
    prepare_run_dir(run_dir, resume)
    if is_main_process():
        save_config(cfg, run_dir / CONFIG_FILE)
        write_data_split(run_dir, cfg, datasets, data_report)  # evaluation scores this split, not a new one


def model_for_training(cfg, model, model_source, device, tokenizer, train_ds, eval_ds, run_dir, resume, verbose):
    """The model loaded (unless given), its stop token checked (``stop_token.json``) and LoRA attached."""
    if model is None:
        if verbose:
            print(f"載入模型 {cfg.model.profile}（{cfg.model.quantization}，{device}）…", flush=True)
        model = models.load_model(
            model_source, cfg.model.quantization, device, attn_implementation=cfg.model.attn_implementation
        )
    check = stop_token_check(cfg, model, tokenizer, eval_ds if eval_ds is not None else train_ds, run_dir, resume)
    if check is not None and verbose:
        print(check.message(), flush=True)
    token_ids = check.trained_token_ids if check is not None else None
    model = prepare_model_for_training(cfg, model, model_source.profile, device, verbose=verbose, token_ids=token_ids)
    trainable, total = model.get_nb_trainable_parameters()
    if verbose:
        print(
            f"可訓練參數：{trainable:,}／全部 {total:,}（{trainable / total:.3%}），"
            f"LoRA r={cfg.lora.r}、alpha={cfg.lora.alpha}",
            flush=True,
        )
    return model, check, (int(trainable), int(total))


@dataclass
class TrainSession:
    """What the training loop leaves: the trainer, its monitor, the batch it ended with and the times."""

    trainer: Any
    monitor: Any
    stop: GracefulStop
    initial_eval: dict | None
    micro_batch: int
    grad_accum: int
    oom_retries: int
    seconds: float
    cpu_seconds: float
    resume_from: Path | None  # the checkpoint the last attempt started from (None: from the start)
    resumed: bool  # the run went on from an earlier one (--resume)


def train_with_retries(
    cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, callbacks, notebook, resume_from, evaluate_before,
    verbose,
) -> TrainSession:  # fmt: skip
    """Build the trainer, evaluate before the first step, train; on out-of-memory halve the micro-batch (same
    effective batch) and go on from the last complete checkpoint; Ctrl+C stops after the step and saves."""
    ckpt_dir, log_path = run_dir / CHECKPOINT_DIR, run_dir / LOG_FILE
    resumed = resume_from is not None
    initial_eval = _read_json(run_dir / INITIAL_EVAL_FILE) if resumed else None
    micro_batch, grad_accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    previous_records = monitor.read_log(log_path) if resumed else []
    oom_retries = 0
    started, cpu_started = time.time(), time.process_time()
    stop = GracefulStop(verbose=verbose)
    with stop:
        while True:
            mon = monitor.MonitorCallback(log_path, device, previous_records)
            cbs = training_callbacks(cfg, run_dir, mon, notebook, callbacks, stop)
            n_examples = len(train_ds) + (len(eval_ds) if eval_ds is not None else 0)
            prep = display.Progress(
                "準備訓練與驗證資料（套用對話模板、分詞、標出答案、打包）",
                total=n_examples,
                enabled=notebook and verbose and is_main_process(),
            )
            trainer = build_trainer(
                cfg, run_dir, device, model, tokenizer, train_ds, eval_ds, cbs, micro_batch, grad_accum
            )
            prep.update(n_examples)
            prep.close(note=f"訓練集打包成 {len(trainer.train_dataset):,} 列")
            use_chinese_progress(trainer)
            try:
                if evaluate_before and eval_ds is not None and initial_eval is None:
                    initial_eval = trainer.evaluate()
                    if is_main_process():
                        # the monitor callback already logged it as step 0 of the curve
                        write_json(run_dir / INITIAL_EVAL_FILE, initial_eval)
                    if verbose:
                        print(f"訓練前驗證集 loss：{initial_eval['eval_loss']:.4f}", flush=True)
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                break
            except OSError as exc:
                raise write_error(exc, "寫入檢查點或訓練紀錄", ckpt_dir, run_dir) from None
            except torch.OutOfMemoryError:
                del trainer
                free_memory()
                if not cfg.train.auto_oom_retry or micro_batch <= 1:
                    raise oom_error(cfg, micro_batch, grad_accum, device) from None
                oom_retries += 1
                micro_batch, grad_accum = micro_batch // 2, grad_accum * 2
                if verbose:
                    print(
                        f"記憶體不足：自動改用 micro-batch {micro_batch}、梯度累積 {grad_accum}（等效批次不變）重試。",
                        flush=True,
                    )
                resume_from = checkpoints.latest_complete_checkpoint(ckpt_dir)
                previous_records = monitor.read_log(log_path)
    return TrainSession(
        trainer, mon, stop, initial_eval, micro_batch, grad_accum, oom_retries,
        time.time() - started, time.process_time() - cpu_started, resume_from, resumed,
    )  # fmt: skip


def training_callbacks(cfg, run_dir, mon, notebook: bool, callbacks: list | None, stop: GracefulStop) -> list:
    """The monitor, TensorBoard, the live plot, the user's callbacks, Ctrl+C, and last the completion marker."""
    cbs = [mon]
    if "tensorboard" in (cfg.train.report_to or []) and is_main_process():
        cbs.append(tensorboard_callback(run_dir))
    if notebook:
        cbs.append(monitor.LiveLossPlotCallback(mon))
    cbs.extend(callbacks or [])
    cbs.append(stop.callback())  # after the user's callbacks, before the marker: a Ctrl+C stop saves at this step
    cbs.append(checkpoints.CompletionMarkerCallback())  # last: marks a checkpoint complete after everything else
    return cbs


def stop_if_interrupted(session: TrainSession, run_dir: Path) -> None:
    """After Ctrl+C: raise :class:`TrainingInterrupted` naming the checkpoint to resume from (CLI exit 130)."""
    state = session.trainer.state
    if session.stop.requested and state.global_step < state.max_steps:
        good = checkpoints.latest_complete_checkpoint(run_dir / CHECKPOINT_DIR)
        raise TrainingInterrupted(
            state.global_step,
            good,
            run_dir,
            checkpoint_shown=display_path(good) if good else None,
            config_shown=display_path(run_dir / CONFIG_FILE),
        )


def final_evaluation(trainer, eval_ds) -> dict | None:
    """The validation loss at the last step (the one logged there, else evaluated now)."""
    if eval_ds is None:
        return None
    last = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == trainer.state.global_step]
    return last[-1] if last else trainer.evaluate()


def save_adapter(trainer, run_dir: Path) -> Path:
    """Save the adapter and mark it complete (sizes and SHA-256: evaluation refuses a damaged adapter)."""
    adapter_dir = run_dir / ADAPTER_DIR
    if is_main_process() and (adapter_dir / checkpoints.MARKER).exists():
        (
            adapter_dir / checkpoints.MARKER
        ).unlink()  # a resumed run rewrites the adapter: the old marker no longer holds
    try:
        trainer.save_model(str(adapter_dir))  # adapter_model.safetensors + adapter_config.json (main process)
        if is_main_process():
            checkpoints.write_completion_marker(adapter_dir)
    except OSError as exc:
        raise write_error(exc, "寫入 LoRA 轉接器", run_dir / CHECKPOINT_DIR, run_dir) from None
    return adapter_dir


def training_result(cfg, session: TrainSession, run_dir, adapter_dir, device, threads, final_eval, params,
                    check) -> TrainResult:  # fmt: skip
    """The numbers of this run: losses, steps, time, tokens per second, memory and its advice, the stop token."""
    trainer = session.trainer
    log_history = trainer.state.log_history
    mem = monitor.memory_summary(session.monitor.records, device)
    advice = monitor.memory_advice(mem, session.micro_batch, cfg.train.gradient_checkpointing, cfg.train.max_length)
    steps_this_session = trainer.state.global_step - (_step_of(session.resume_from) or 0)
    train_metrics = [h for h in log_history if "loss" in h]
    tokens = int(trainer._total_train_tokens)
    runtime = sum(h.get("train_runtime", 0.0) for h in log_history if "train_runtime" in h)
    pure_train = max(1e-9, runtime or session.seconds)
    trainable, total = params
    return TrainResult(
        run_dir=str(run_dir),
        adapter_dir=str(adapter_dir),
        profile=cfg.model.profile,
        device=device + (f"，{threads} 執行緒" if threads else ""),
        initial_eval_loss=session.initial_eval["eval_loss"] if session.initial_eval else None,
        final_eval_loss=final_eval["eval_loss"] if final_eval else None,
        global_step=trainer.state.global_step,
        final_train_loss=train_metrics[-1]["loss"] if train_metrics else None,
        train_seconds=round(session.seconds, 1),
        train_cpu_seconds=round(session.cpu_seconds, 1),
        seconds_per_step=round(pure_train / steps_this_session, 3) if steps_this_session > 0 else None,
        tokens_trained=tokens,
        tokens_per_second=round(tokens / pure_train, 1) if tokens else None,
        micro_batch=session.micro_batch,
        gradient_accumulation_steps=session.grad_accum,
        trainable_params=int(trainable),
        total_params=int(total),
        resumed_from=str(session.resume_from) if session.resumed else None,
        oom_retries=session.oom_retries,
        memory=mem,
        memory_advice=advice,
        stop_token=check.to_dict() if check is not None else {},
    )


def write_summaries(run_dir: Path, result: TrainResult, records: list[dict]) -> None:
    """``memory.json``, ``loss.png`` and ``train_summary.json`` (main process only)."""
    if not is_main_process():
        return
    per_log = [{k: v for k, v in r.items() if "gib" in k or k == "step"} for r in records]
    write_json(run_dir / MEMORY_FILE, {**result.memory, "advice": result.memory_advice, "per_log": per_log})
    plt.close(monitor.plot_loss_curve(records, run_dir / LOSS_PNG))
    write_json(run_dir / SUMMARY_FILE, result.to_dict())


def stop_token_check(cfg: RunConfig, model, tokenizer, records, run_dir: Path, resume: bool):
    """Before the first step: can the base end an answer? (:mod:`medgemma_lib.training.stopping`; ``stop_token.json``).

    A resumed run keeps the decision it started with, since its checkpoints hold those rows. A model that
    already carries an adapter (a notebook that passed one in) is trained as it is.
    """
    if hasattr(model, "peft_config"):
        return None
    path = run_dir / STOP_TOKEN_FILE
    stored = _read_json(path) if resume else None
    if stored:
        return stopping.StopTokenCheck.from_dict(stored)
    check = stopping.check_stop_token(
        model,
        tokenizer,
        [records[i] for i in range(min(len(records), stopping.CHECK_EXAMPLES))],
        mode=cfg.lora.train_stop_token,
        max_length=cfg.train.max_length,
    )
    if is_main_process():
        write_json(path, check.to_dict())
    return check


def conversational_only(ds):
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
    return checkpoints.checkpoint_step(Path(path))
