"""The run folder: its layout, opening a finished run, and loading it for inference.

``train`` writes it; ``evaluate``, ``chat`` and ``export`` read it, all through this module. A finished run is
opened once (:func:`open_run`: config read, adapter verified and hashed, base model resolved) and the
:class:`Run` is passed on; nothing after the opening reads, verifies or resolves those again::

    results/<run-name>/
        adapter/                 LoRA weights (adapter_model.safetensors) + adapter_config.json + completion marker
        config.yaml              the resolved config (evaluation reads model.profile from it)
        train_log.jsonl          every logged loss / learning rate / validation loss, with memory
        loss.png                 train and validation loss curve
        memory.json              peak memory and the advice derived from it
        train_summary.json       initial and final validation loss, steps, timings, tokens/s
        initial_eval.json        validation loss before training (a resumed run reuses it)
        data_split.json          what it trained on (ids) and is tested on (held-out records), the data's SHA-256
        tensorboard/             TensorBoard event files
        checkpoints/checkpoint-N resumable checkpoints (the last K), each marked complete when fully written
        eval.json, eval.md, eval.png   written by ``evaluate``
        merged/, merged-float32/       written by ``export``

The completion marker and checkpoint format belong to :mod:`medgemma_lib.training.checkpoints`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from safetensors import safe_open

from medgemma_lib.core.atomic import write_json
from medgemma_lib.core.config import RunConfig, load_config
from medgemma_lib.core.errors import ConfigError, DataError, ModelError, OutputError
from medgemma_lib.core.paths import display_path, resolve_path
from medgemma_lib.core.profiles import (
    ResolvedModel,
    architecture,
    architecture_shape,
    base_identity,
    folder_shape,
    resolve_source,
)
from medgemma_lib.core.weightfiles import folder_fingerprint
from medgemma_lib.data import answer_of, question_of
from medgemma_lib.data.formatting import record_id
from medgemma_lib.data.pipeline import file_sha256
from medgemma_lib.models import loading as models
from medgemma_lib.training import stopping
from medgemma_lib.training.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, sha256_of, verify_adapter

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train_log.jsonl"
LOSS_PNG = "loss.png"
MEMORY_FILE = "memory.json"
SUMMARY_FILE = "train_summary.json"
INITIAL_EVAL_FILE = "initial_eval.json"
STOP_TOKEN_FILE = "stop_token.json"  # the check before training: can the base end an answer, what was trained
DATA_SPLIT_FILE = "data_split.json"  # the split trained and tested on, the source data's SHA-256, the prepare report
DATA_SPLIT_FORMAT = 1
TENSORBOARD_DIR = "tensorboard"
DEMO_SUMMARY_FILE = "demo_summary.json"
EVAL_JSON, EVAL_MD, EVAL_PNG = "eval.json", "eval.md", "eval.png"
MERGED_DIR = "merged"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
ADAPTER_SUBDIRS = (ADAPTER_DIR, ".")  # train writes <run>/adapter/; a bare adapter folder also works
# What a fresh run replaces; an old evaluation describes an adapter that no longer exists, so it goes too.
RUN_ARTEFACTS = (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    TENSORBOARD_DIR,
    LOG_FILE,
    LOSS_PNG,
    MEMORY_FILE,
    SUMMARY_FILE,
    CONFIG_FILE,
    INITIAL_EVAL_FILE,
    STOP_TOKEN_FILE,
    DATA_SPLIT_FILE,
    DEMO_SUMMARY_FILE,
    EVAL_JSON,
    EVAL_MD,
    EVAL_PNG,
    MERGED_DIR,
    f"{MERGED_DIR}-float32",
)


# ----------------------------------------------------------------------------------------------
# Layout (the writing side)


def default_run_name(cfg: RunConfig) -> str:
    profile = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.model.profile).name).strip("-") or "run"
    return f"{profile}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir_for(cfg: RunConfig) -> Path:
    if not cfg.train.run_name:
        raise ConfigError("沒有指定執行名稱 train.run_name。", hint="請在設定檔或命令列加上 train.run_name=名稱。")
    return Path(cfg.train.output_dir) / cfg.train.run_name


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Create the run folder; re-running a name (without resume) removes only what an earlier run of ours wrote."""
    if not is_main_process():
        return
    if run_dir.exists() and not resume:
        for name in RUN_ARTEFACTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"無法建立執行資料夾 {run_dir}：{exc.strerror or exc}",
            hint="請確認磁碟空間與寫入權限，或改用 train.output_dir=其他資料夾。",
        ) from None


# ----------------------------------------------------------------------------------------------
# Opening a finished run (the reading side)


@dataclass
class Run:
    """A finished run, opened once by :func:`open_run`: pass it to evaluate, chat and export instead of the path.

    ``config`` is the run's ``config.yaml`` as read at opening; ``adapter_dir`` holds the adapter verified at
    opening (:func:`~medgemma_lib.training.checkpoints.verify_adapter`), whose weights' SHA-256 is
    ``adapter_sha256`` (from that verification; None for an adapter without a completion marker until
    :meth:`adapter_digest` hashes it, once); ``base`` is the base model resolved at opening.
    """

    path: Path
    adapter_dir: Path
    config: RunConfig
    base: ResolvedModel | None = None
    adapter_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def base_model(self) -> ResolvedModel:
        """The base model ready to load (the demo converted on first use), resolved once for this run."""
        if self.base is None or self.base.source is None:
            self.base = models.resolve_model(self.base or self.config.model.profile)
        return self.base

    def adapter_digest(self) -> str:
        """SHA-256 of the adapter weights: the one verified at opening, or computed here once (no marker)."""
        if self.adapter_sha256 is None:
            self.adapter_sha256 = sha256_of(self.adapter_dir / ADAPTER_WEIGHTS)
        return self.adapter_sha256


def find_adapter_dir(run_dir: str | Path) -> Path | None:
    """The folder holding ``adapter_config.json`` + ``adapter_model.safetensors``, or None."""
    run_dir = Path(run_dir)
    for sub in ADAPTER_SUBDIRS:
        folder = (run_dir / sub).resolve() if sub != "." else run_dir
        if all((folder / f).is_file() for f in ADAPTER_FILES):
            return folder
    return None


def check_adapter_file(adapter_dir: Path, run_dir: Path | None = None) -> dict[str, str]:
    """Refuse a damaged adapter with a ModelError (what is wrong, and how to get it back).

    :func:`medgemma_lib.training.checkpoints.verify_adapter` checks the files (safetensors only, header and
    size, and the SHA-256 recorded when training saved it); then two tensors are read for real. Returns the
    verified ``{file: SHA-256}`` (``{}`` without a completion marker).
    """
    hashes = verify_adapter(adapter_dir, run_dir=run_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            for name in names[:2]:  # touch real data
                handle.get_tensor(name)
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise ModelError(
            f"LoRA 轉接器權重檔 {adapter_dir.name}/{ADAPTER_WEIGHTS} 已損毀或不完整"
            f"（{str(exc).splitlines()[0][:120]}）。",
            hint=(
                "檔案可能在複製或訓練中途被截斷；"
                "請重新訓練（python -m medgemma_lib train ...）或重新複製整個執行資料夾。"
            ),
        ) from None
    if not names:
        raise ModelError(f"LoRA 轉接器權重檔 {weights.name} 是空的（沒有任何權重）。", hint="請重新訓練。")
    return hashes


def open_run(run_dir: str | Path) -> Run:
    """Open a run folder once: check it (exists, has an intact adapter and config.yaml), read its config,
    verify and hash the adapter, and resolve the base model. Pass the :class:`Run` on (see :func:`as_run`)."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        parent = path.parent if str(path.parent) not in ("", ".") else Path("results")
        found = (
            sorted(p.name for p in parent.glob("*") if p.is_dir() and find_adapter_dir(p)) if parent.is_dir() else []
        )
        listing = (
            f"{parent} 底下有訓練結果的資料夾：{'、'.join(found)}"
            if found
            else "請先執行 notebook 05 或 python -m medgemma_lib demo 訓練一次"
        )
        raise ModelError(f"找不到執行資料夾 {path}。", hint=listing + "。")
    adapter_dir = find_adapter_dir(path)
    if adapter_dir is None and (path / ADAPTER_DIR).is_dir():
        check_adapter_file(path / ADAPTER_DIR, path)  # says what is missing (e.g. only a pickle .bin)
    if adapter_dir is None:
        raise ModelError(
            f"執行資料夾 {path} 裡沒有 LoRA 轉接器（找不到 adapter/{ADAPTER_CONFIG} 與 adapter/{ADAPTER_WEIGHTS}）。",
            hint="訓練可能沒有完成；請重新訓練，或指向含有 adapter/ 的執行資料夾（results/<執行名稱>）。",
        )
    hashes = check_adapter_file(adapter_dir, path)
    cfg_file = path / CONFIG_FILE
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if cfg_file.is_file():
        config = load_config(cfg_file)
    else:  # a bare adapter folder: fall back to the base model named in the adapter config
        config = RunConfig()
        if recorded:
            config.model.profile = recorded
    base = resolve_source(config.model.profile)  # known, or a local folder whose files are whole: before any load
    if isinstance(recorded, str) and recorded:
        check_adapter_base(config.model.profile, recorded, path)
    return Run(path=path, adapter_dir=adapter_dir, config=config, base=base, adapter_sha256=hashes.get(ADAPTER_WEIGHTS))


def as_run(run: str | Path | Run) -> Run:
    """``run`` itself when it is an opened :class:`Run`; a path is opened here (once) with :func:`open_run`."""
    return run if isinstance(run, Run) else open_run(run)


def check_adapter_base(profile: str, recorded: str, run_dir: Path) -> None:
    """Refuse a base model other than the one the adapter was trained on (``base_model_name_or_path``).

    PEFT attaches an adapter to any base whose layer shapes match, so MedGemma 1.0's adapter on 1.5, or a
    folder with other weights, would load without complaint and give wrong answers. Names are compared
    through :func:`medgemma_lib.core.profiles.base_identity` (profile, Hub id, demo cache folder on any machine,
    Hub cache snapshot); two local folders through their weights (:func:`~.weightfiles.folder_fingerprint`);
    a local folder and a named model through the layer shapes in ``config.json``. When the recorded base cannot
    be identified on this machine (a folder elsewhere, an unknown Hub id), nothing is refused.
    """
    ours, theirs = base_identity(profile), base_identity(recorded)
    here, there = Path(profile).expanduser(), Path(recorded).expanduser()
    if ours is not None and theirs is not None:
        same = ours == theirs
    elif here.is_dir() and there.is_dir():
        try:
            same = here.resolve() == there.resolve() or folder_fingerprint(here) == folder_fingerprint(there)
        except ModelError:
            return  # the recorded folder is damaged: it cannot be compared, ours was checked already
    else:  # a local folder against a named model: a folder of another shape is surely another model
        folder, name = (here, theirs) if here.is_dir() else (there, ours) if there.is_dir() else (None, None)
        arch = architecture(name) if name else None
        if folder is None or arch is None or folder_shape(folder) is None:
            return  # nothing to compare on this machine
        same = folder_shape(folder) == architecture_shape(arch)
    if same:
        return
    where = display_path(run_dir / CONFIG_FILE)
    raise ModelError(
        f"LoRA 轉接器是在基礎模型 {display_path(recorded)} 上訓練的，但 {where} 的 model.profile 是 "
        f"{display_path(profile)}：兩者不是同一個模型。層的形狀相同時轉接器也掛得上去，但結果會是錯的。",
        hint=f"請把 {where} 的 model.profile 改回 {theirs or display_path(recorded)}，或用這個基礎模型重新訓練。",
    )


def read_stop_token_check(run_dir: str | Path) -> stopping.StopTokenCheck | None:
    """What the run measured before training: can the base end an answer, and what was trained (``stop_token.json``)."""
    path = Path(run_dir) / STOP_TOKEN_FILE
    if not path.is_file():
        return None
    return stopping.StopTokenCheck.from_dict(json.loads(path.read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------------------------
# What the run trained on and is tested on (data_split.json)


def data_sources(cfg: RunConfig) -> list[tuple[str, str]]:
    """The files (or the prepared folder) a run's data section reads: ``(config key, path as given)``."""
    data = cfg.data
    if data.prepared_dir:
        return [("data.prepared_dir", str(data.prepared_dir))]
    mix = [(f"data.mix[{i}].input", str(entry["input"])) for i, entry in enumerate(data.mix or [])]
    return [("data.input", str(data.input)), *mix]


def _record_key(record: dict) -> str:
    return record.get("id") or record_id(question_of(record), answer_of(record))


def write_data_split(run_dir: str | Path, cfg: RunConfig, datasets, report: dict | None = None) -> Path:
    """Record in the run folder what it trains on and is tested on (``data_split.json``, written atomically).

    The held-out splits (``validation``, ``test``, the mix's ``test_mix``) in full, as evaluation scores them;
    the train split as record ids (a content hash of question and answer,
    :func:`~medgemma_lib.data.formatting.record_id`);
    each source's path as given and SHA-256; the prepare report when the caller has it. ``evaluate`` reads
    this instead of cleaning and splitting the data again, so a changed file cannot change the test set.
    """
    sources = []
    for key, given in data_sources(cfg):
        path = resolve_path(given)
        sources.append({"key": key, "path": given, "sha256": file_sha256(path) if path.exists() else None})
    record = {
        "format": DATA_SPLIT_FORMAT,
        "sources": sources,
        "counts": {name: len(ds) for name, ds in datasets.items()},
        "train_ids": [_record_key(r) for r in datasets["train"]],
        "held_out": {name: [dict(r) for r in ds] for name, ds in datasets.items() if name != "train"},
        "prepare_report": report,
    }
    return write_json(Path(run_dir) / DATA_SPLIT_FILE, record, indent=None)  # one line: the file can be MBs


def read_data_split(run_dir: str | Path) -> dict | None:
    """The run's ``data_split.json`` (:func:`write_data_split`), or None for a run trained before runs kept one."""
    path = Path(run_dir) / DATA_SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        record, reason = None, str(exc).splitlines()[0][:120]
    else:
        reason = "格式不符"
    if not isinstance(record, dict) or record.get("format") != DATA_SPLIT_FORMAT or "held_out" not in record:
        raise DataError(
            f"執行資料夾裡的資料切分紀錄 {display_path(path)} 無法使用（{reason}）。",
            hint="這個檔案由訓練寫入，記錄測試集；請從備份還原整個執行資料夾，或重新訓練。",
        )
    return record


def changed_sources(record: dict) -> list[tuple[str, str]]:
    """``(path as given, "missing" | "changed")`` for each recorded source that is gone or whose SHA-256 differs."""
    changes = []
    for source in record.get("sources", []):
        path = resolve_path(source["path"])
        if not path.exists():
            changes.append((source["path"], "missing"))
        elif source.get("sha256") and file_sha256(path) != source["sha256"]:
            changes.append((source["path"], "changed"))
    return changes


def attach_adapter(base, adapter: str | Path | Run):
    """``PeftModel`` around ``base`` with the adapter of an opened :class:`Run` or from a folder (inference mode).

    A folder is verified here; a :class:`Run`'s adapter was verified when it was opened.
    """
    if isinstance(adapter, Run):
        adapter_dir = adapter.adapter_dir
    else:
        adapter_dir = Path(adapter)
        verify_adapter(adapter_dir)  # safetensors only, whole, as saved
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # mismatched shapes, wrong base model, damaged file
        raise ModelError(
            f"無法把 LoRA 轉接器 {display_path(adapter_dir)} 掛到基礎模型上：{str(exc).splitlines()[0][:200]}",
            hint="請確認轉接器是用同一個模型設定檔（config.yaml 的 model.profile）訓練的，且檔案完整。",
        ) from None
    model.eval()
    return model


def load_for_inference(
    run_dir: str | Path | Run, quantization: str | None = None, device: str | None = None, verbose: bool = True
):
    """Load the base model once and attach the run's adapter. Returns ``(model, tokenizer, run)``.

    ``run_dir``: an opened :class:`Run` (nothing is read or verified again) or a folder (opened here once).
    ``quantization`` defaults to the one the run was trained with (usually ``nf4``): the adapter
    is measured on the base it learned on.
    """
    run = as_run(run_dir)
    quantization = quantization or run.config.model.quantization
    device = device or models.default_device()
    started = time.time()
    if verbose:
        print(f"載入基礎模型 {run.config.model.profile}（{quantization}，{device}），只載入一次…", flush=True)
    source = run.base_model()
    tokenizer = models.load_tokenizer(source)
    base = models.load_model(source, quantization, device, attn_implementation=run.config.model.attn_implementation)
    model = attach_adapter(base, run)
    if verbose:
        print(f"已掛上 LoRA 轉接器 {run.name}/{run.adapter_dir.name}（{time.time() - started:.0f} 秒）。", flush=True)
    return model, tokenizer, run
