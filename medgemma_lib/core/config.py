"""One run configuration: model, data, LoRA, training, evaluation.

A run is described by :class:`RunConfig`, a tree of dataclasses whose fields carry their own
documentation (the ``help`` metadata, in Traditional Chinese, shown in error messages and in
``configs/*.yaml`` comments). It loads from YAML; ``section.field=value`` overrides from the
command line win over the file; :func:`save_config` writes the resolved config beside results.

Validation is strict: unknown keys, wrong types and out-of-range values raise
:class:`~medgemma_lib.core.errors.ConfigError` with a Chinese message naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medgemma_lib.core.atomic import write_text
from medgemma_lib.core.errors import ConfigError, OutputError
from medgemma_lib.core.paths import resolve_path
from medgemma_lib.core.profiles import ResolvedModel, resolve_source


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with a Chinese help text and optional range checks (min, max, choices)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    profile: str = _f(
        "demo",
        "模型設定檔：demo、medgemma-1.5-4b-it、medgemma-4b-it、medgemma-27b-text-it、medgemma-27b-it，或本機模型資料夾路徑",
    )
    quantization: str = _f(
        "nf4", "權重量化方式：nf4（4 位元，預設）、int8 或 none（不量化）", choices=["nf4", "int8", "none"]
    )
    attn_implementation: str | None = _f(
        None,
        "注意力實作：不填則使用設定檔建議值（eager 或 sdpa）",
        choices=[None, "eager", "sdpa", "flash_attention_2"],
    )


_CONVERSIONS = [None, "s2t", "s2tw", "s2twp", "t2s", "tw2s"]
_CONVERSION_HELP = "OpenCC 繁簡轉換，例如 s2twp（簡轉台灣正體）"
MAX_MIX_FRACTION = 0.9  # data.mix fractions (each and their sum) stay below this: the main input keeps > 10%


@dataclass
class DataSection:
    input: str = _f("data/medquad_sample.csv", "輸入資料檔（CSV、JSONL 或 MedQuAD XML 資料夾）")
    prepared_dir: str | None = _f(None, "已準備好的資料夾（data prepare 的輸出）；填寫時略過準備步驟")
    columns: dict = _f({}, "欄位對應，例如 {question: ask, answer: answer}", item_type=str)
    encoding: str | None = _f(None, "檔案編碼；不填則自動偵測")
    system_prompt: str | None = _f(None, "可選的系統指示，會放在第一個使用者回合之前")
    chinese_conversion: str | None = _f(None, _CONVERSION_HELP, choices=_CONVERSIONS)
    max_answer_chars: int = _f(8000, "答案長度上限（字元）", min=1)
    long_answer_policy: str = _f(
        "truncate", "超長答案的處理：truncate（在句子邊界截斷）或 drop（捨棄）", choices=["truncate", "drop"]
    )
    validation_fraction: float = _f(0.1, "驗證集比例", min=0.0, max=0.9)
    test_fraction: float = _f(0.1, "測試集比例", min=0.0, max=0.9)
    max_train_examples: int | None = _f(None, "最多使用幾筆訓練資料（示範時縮短時間）", min=1)
    max_eval_examples: int | None = _f(None, "驗證集最多幾筆", min=1)
    deidentify: str = _f(
        "report", "個資處理：report（只回報）、mask（遮蔽）、refuse（發現即停止）", choices=["report", "mask", "refuse"]
    )
    seed: int = _f(42, "切分資料用的亂數種子")
    mix: list = _f(
        [],
        "資料混合：其他來源的清單，每項 {input: 檔案, fraction: 佔最終訓練集的比例（0 以上、小於 0.9）, "
        "chinese_conversion: s2twp, columns: {...}, encoding: ..., max_answer_chars: ...}；"
        "每個來源的測試題另存為 test_mix（fraction 為 0 時只用來評估）",
    )


@dataclass
class MixEntry:
    """One entry of ``data.mix`` (validated field by field like a section; stored as a plain dict)."""

    input: str = _f("", "混合來源的資料檔（CSV、JSONL 或 MedQuAD XML 資料夾），路徑規則與 data.input 相同")
    fraction: float = _f(0.0, "這個來源佔最終訓練集的比例（0 以上、小於 0.9；0 表示不訓練，只保留測試題）", min=0.0)
    chinese_conversion: str | None = _f(None, _CONVERSION_HELP, choices=_CONVERSIONS)
    columns: dict = _f({}, "欄位對應，例如 {question: ask, answer: answer}", item_type=str)
    encoding: str | None = _f(None, "檔案編碼；不填則自動偵測")
    max_answer_chars: int | None = _f(None, "答案長度上限（字元）；不填則用 data.max_answer_chars", min=1)


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA 秩（rank）：越大可學的越多，記憶體也越多", min=1, max=1024)
    alpha: int = _f(32, "LoRA 縮放係數 alpha（通常為 r 的兩倍）", min=1)
    dropout: float = _f(0.05, "LoRA dropout 比例", min=0.0, max=0.9)
    target_modules: str | list = _f(
        "all-linear",
        "要加上 LoRA 的層：all-linear（語言模型所有線性層）或名稱清單，例如 [q_proj, v_proj]",
        item_type=str,
    )
    train_stop_token: str = _f(
        "auto",
        "停止符號 <end_of_turn>：auto（訓練前先量基礎模型會不會產生它，不會才一併訓練它的嵌入列）、"
        "always（一定訓練）、never（只訓練 LoRA）",
        choices=["auto", "always", "never"],
    )
    stop_token_learning_rate: float = _f(
        1e-3,
        "停止符號嵌入列的學習率（只在訓練它時使用；LoRA 仍用 train.learning_rate）",
        min=1e-8,
        max=1.0,
    )


@dataclass
class TrainSection:
    output_dir: str = _f("results", "輸出根目錄；每次執行在其下建立一個子資料夾")
    run_name: str | None = _f(None, "執行名稱（子資料夾名）；不填則依時間自動命名")
    num_train_epochs: float = _f(1.0, "訓練幾個 epoch", min=0.0)
    max_steps: int = _f(-1, "最多訓練幾步；-1 表示由 epoch 決定", min=-1)
    learning_rate: float = _f(2e-4, "學習率", min=1e-8, max=1.0)
    lr_scheduler_type: str = _f(
        "cosine",
        "學習率排程：cosine、linear、constant_with_warmup",
        choices=["cosine", "linear", "constant_with_warmup", "constant"],
    )
    warmup_ratio: float = _f(0.05, "暖身步數佔總步數的比例", min=0.0, max=0.5)
    per_device_train_batch_size: int = _f(4, "每張卡每步的樣本數（micro-batch）", min=1, max=4096)
    gradient_accumulation_steps: int = _f(1, "梯度累積步數", min=1, max=4096)
    max_length: int = _f(1024, "每筆樣本最多幾個 token（超過則截斷）", min=8, max=131072)
    max_example_length: int | None = _f(
        None, "packing 前每筆樣本最多幾個 token（超過則截斷）；不填則以 max_length（列長）為上限", min=8, max=131072
    )
    packing: bool = _f(False, "把多筆樣本接成一列以免填充（padding-free packing）")
    padding_free: bool = _f(True, "不填充：一個批次的樣本首尾相接，省去 padding 的計算")
    use_liger_kernel: bool = _f(False, "使用 Liger 核心（需要 CUDA 與 liger-kernel 套件）")
    gradient_checkpointing: bool = _f(True, "梯度檢查點：以重算換取記憶體")
    activation_offloading: bool = _f(
        False,
        "把梯度檢查點存下的每層輸入移到 CPU 記憶體（TRL 的 activation offloading，另一條 CUDA stream 重疊搬運）；"
        "只在 CUDA 上有效，CPU 上忽略",
    )
    compile_layers: bool = _f(
        False,
        "以 torch.compile 逐層編譯語言模型的每一層解碼器（含 LoRA 與 NF4 反量化）；第一步多花編譯時間；"
        "只在 CUDA 上有效，CPU 上忽略",
    )
    fused_lora: bool = _f(
        False,
        "NF4 線性層的 LoRA 以一個 autograd 函式計算（LoRA 乘積直接加進基礎矩陣乘法的輸出，省掉 PEFT 的複製、"
        "乘法與加法）；只用在 lora.dropout 為 0 的一般 LoRA 層，結果與 PEFT 相同",
    )
    fused_rms_norm: bool = _f(
        False,
        "語言模型的 RMSNorm 改用 PyTorch 內建的融合核心（torch.nn.functional.rms_norm），取代 Liger 的 RMSNorm："
        "公式與 transformers 相同（fp32 計算、1 + w）；Liger 的 RMSNorm 在 GPU 訓練時每次呼叫佔主機 CPU 0.2–0.5 毫秒，"
        "這個選項在 GPU 上是否較快尚未實測（docs/benchmarks.md）",
    )
    optim: str = _f("adamw_torch", "最佳化器，例如 adamw_torch、adamw_torch_fused、paged_adamw_8bit")
    weight_decay: float = _f(0.0, "權重衰減", min=0.0, max=1.0)
    max_grad_norm: float = _f(1.0, "梯度裁剪上限", min=0.0)
    logging_steps: int = _f(5, "每幾步記錄一次 loss", min=1)
    eval_steps: int = _f(20, "每幾步在驗證集上評估一次", min=1)
    save_steps: int = _f(20, "每幾步存一次檢查點", min=1)
    save_total_limit: int = _f(2, "最多保留幾個檢查點", min=1)
    seed: int = _f(42, "訓練亂數種子")
    auto_oom_retry: bool = _f(True, "CUDA 記憶體不足時，自動以一半 micro-batch、兩倍梯度累積重試")
    report_to: list = _f(
        ["tensorboard"], "紀錄工具清單，例如 [tensorboard]；[] 表示不紀錄", item_choices=["tensorboard", "none"]
    )
    num_threads: int | None = _f(None, "CPU 執行緒數；不填則使用全部核心", min=1)


@dataclass
class EvalSection:
    max_new_tokens: int = _f(128, "評估時每題最多產生幾個 token", min=1, max=8192)
    num_generate: int = _f(16, "產生答案並計算 ROUGE/BLEU/chrF 的測試題數", min=0)
    batch_size: int = _f(8, "產生答案時的批次大小", min=1)
    max_eval_examples: int | None = _f(None, "計算 loss 時最多用幾筆測試資料", min=1)
    num_generate_chinese: int = _f(
        0, "從資料混合（data.mix）保留的中文測試題取幾題產生答案；0 表示用原始指南的三題與隨附樣本", min=0
    )
    bootstrap_resamples: int = _f(0, "配對 bootstrap 重抽次數，用來算差異的 95% 信賴區間（0 表示不算）", min=0)
    thinking: bool = _f(
        False,
        "評估與對話時是否加上思考系統指示 SYSTEM INSTRUCTION: think silently if needed.（預設 false：不加）；"
        "思考過程 <unused94>…<unused95> 一律與答案分開，只為答案評分",
    )


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check ``value`` against a field annotation, coercing ints to floats. Returns (ok, value)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "dict": dict, "None": None})  # noqa: S307 - own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if annotation is list:
        return isinstance(value, list), value
    if annotation is dict:
        return isinstance(value, dict), value
    return True, value


_TYPE_NAMES = {"int": "整數", "float": "數字", "str": "文字", "bool": "true 或 false", "list": "清單", "dict": "對應表"}


def _describe(annotation: Any) -> str:
    text = str(annotation)
    for k, v in _TYPE_NAMES.items():
        text = text.replace(k, v)
    return text.replace(" | None", "（或留空）").replace("None", "留空")


def _check_field(section: str, f: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{f.name}"
    ok, value = _type_ok(value, f.type)
    if not ok:
        raise ConfigError(
            f"設定 {key} 的值 {value!r} 型別不對：應為 {_describe(f.type)}。",
            hint=f"{key}：{f.metadata.get('help', '')}",
        )
    meta = f.metadata
    items = (
        list(value.values()) + list(value.keys())
        if isinstance(value, dict)
        else value
        if isinstance(value, list)
        else []
    )
    if "item_type" in meta and not all(isinstance(v, meta["item_type"]) and v for v in items):
        raise ConfigError(
            f"設定 {key} 的內容 {value!r} 有空白或型別不對的項目（每一項都必須是非空白的文字）。",
            hint=f"{key}：{meta.get('help', '')}",
        )
    if "item_choices" in meta and any(v not in meta["item_choices"] for v in items):
        raise ConfigError(
            f"設定 {key} 的內容 {value!r} 有不認識的項目。", hint=f"可用的項目：{'、'.join(meta['item_choices'])}"
        )
    if isinstance(value, str) and f.name == "target_modules" and not value.strip():
        raise ConfigError(f"設定 {key} 不能是空白。", hint=f"{key}：{meta.get('help', '')}")
    if "choices" in meta and value not in meta["choices"]:
        shown = "、".join("（留空）" if c is None else str(c) for c in meta["choices"])
        raise ConfigError(f"設定 {key} 的值 {value!r} 不在允許的選項中。", hint=f"請改用：{shown}")
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ConfigError(f"設定 {key} 的值 {value!r} 不是有限的數字。", hint=f"{key}：{meta.get('help', '')}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(
                f"設定 {key} 的值 {value} 太小（最小 {meta['min']}）。", hint=f"{key}：{meta.get('help', '')}"
            )
        if "max" in meta and value > meta["max"]:
            raise ConfigError(
                f"設定 {key} 的值 {value} 太大（最大 {meta['max']}）。", hint=f"{key}：{meta.get('help', '')}"
            )
    return value


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"您是不是要寫 {close[0]}？" if close else f"可用的鍵：{', '.join(known)}"
    return ConfigError(f"設定中有不認識的鍵 {where}{key}。", hint=hint)


def config_from_dict(data: dict | None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a nested dict (e.g. parsed YAML)."""
    cfg = RunConfig()
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(
            "設定檔的最上層必須是對應表（model:、data:、lora:、train:、eval:）。",
            hint="請參考 configs/demo.yaml 的格式。",
        )
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for sec_name, sec_values in data.items():
        if sec_name not in sections:
            raise _unknown_key("", str(sec_name), list(sections))
        if sec_values is None:
            continue
        if not isinstance(sec_values, dict):
            raise ConfigError(
                f"設定區段 {sec_name} 必須是對應表，卻是 {type(sec_values).__name__}。",
                hint="例如：\n" + f"{sec_name}:\n  鍵: 值",
            )
        section = getattr(cfg, sec_name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in sec_values.items():
            if key not in fields:
                raise _unknown_key(f"{sec_name}.", str(key), list(fields))
            setattr(section, key, _check_field(sec_name, fields[key], value))
    _cross_checks(cfg)
    return cfg


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def mix_source_name(path: str | os.PathLike) -> str:
    """The name a mix source goes by (``mix_source`` of its records): the file name without its extensions."""
    name = Path(path).name
    for suffix in (".tar.gz", ".tgz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def check_mix(mix: Any) -> list[dict]:
    """Validate ``data.mix`` and return it with every key filled in (defaults where an entry leaves one out)."""
    example = (
        "例如：\nmix:\n  - input: ../shared/data/cmb_clin/cmb_clin_qa.csv\n    fraction: 0.02\n"
        "    chinese_conversion: s2twp"
    )
    if mix is None:
        return []
    if not isinstance(mix, list):
        raise ConfigError(f"設定 data.mix 的值 {mix!r} 型別不對：應為清單（每一項是一個來源）。", hint=example)
    fields = {f.name: f for f in dataclasses.fields(MixEntry)}
    entries: list[dict] = []
    for i, entry in enumerate(mix):
        where = f"data.mix[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"設定 {where} 的值 {entry!r} 型別不對：應為對應表（input、fraction…）。", hint=example)
        for key in entry:
            if key not in fields:
                raise _unknown_key(f"{where}.", str(key), list(fields))
        if "input" not in entry:
            raise ConfigError(f"設定 {where} 缺少 input（混合來源的資料檔）。", hint=example)
        checked = {
            name: _check_field(where, f, entry[name] if name in entry else _default(f)) for name, f in fields.items()
        }
        if not checked["input"].strip():
            raise ConfigError(f"設定 {where}.input 不能是空白。", hint=example)
        if checked["fraction"] >= MAX_MIX_FRACTION:
            raise ConfigError(
                f"設定 {where}.fraction 的值 {checked['fraction']} 太大（必須小於 {MAX_MIX_FRACTION}）。",
                hint="fraction 是這個來源佔最終訓練集的比例，例如 0.1 表示 10%；0 表示只保留測試題、不訓練。",
            )
        checked["columns"] = dict(checked["columns"])
        entries.append(checked)
    total = sum(e["fraction"] for e in entries)
    if total >= MAX_MIX_FRACTION:
        shown = " + ".join(f"{e['fraction']:g}" for e in entries)
        raise ConfigError(
            f"data.mix 的 fraction 加起來是 {shown} = {total:g}，太大（必須小於 {MAX_MIX_FRACTION}），"
            "主要資料會幾乎不剩。",
            hint="請調低各來源的 fraction，例如 0.1 與 0.02。",
        )
    names = [mix_source_name(e["input"]) for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"data.mix 中有檔名相同的來源：{'、'.join(repeated)}（記錄以檔名標示 mix_source，必須能分辨）。",
            hint="請把其中一個檔案改名，或合併成一個檔案。",
        )
    return entries


def _cross_checks(cfg: RunConfig) -> None:
    cfg.data.mix = check_mix(cfg.data.mix)
    name = cfg.train.run_name
    if name is not None and (not name.strip() or Path(name).name != name or name in (".", "..") or "\\" in name):
        raise ConfigError(
            f"設定 train.run_name 的值 {name!r} 不是單一資料夾名稱（不能空白，也不能含 / 或 \\ 或是 . 與 ..）。",
            hint="執行資料夾會建立在 train.output_dir 底下；請用簡單的名稱，例如 train.run_name=my-run。",
        )
    if not cfg.model.profile.strip():
        raise ConfigError("設定 model.profile 不能是空白。", hint="例如 model.profile=demo。")
    if not cfg.data.input.strip() and cfg.data.prepared_dir is None:
        raise ConfigError("設定 data.input 不能是空白。", hint="例如 data.input=data/medquad_sample.csv。")
    if cfg.data.validation_fraction + cfg.data.test_fraction >= 0.9:
        raise ConfigError(
            "data.validation_fraction 與 data.test_fraction 加起來太大，訓練集幾乎沒有資料。",
            hint="兩者相加請小於 0.9，例如各 0.1。",
        )
    if cfg.train.compile_layers and cfg.train.activation_offloading:
        raise ConfigError(
            "train.compile_layers 與 train.activation_offloading 目前不能同時開啟：在 H200 上實測（2026-12-03），"
            "編譯過的層在反向傳播時讀到從 CPU 移回的張量會中止（torch inductor 的步幅檢查失敗）。",
            hint="二選一：train.activation_offloading=true 省 1.2–1.6 GiB、速度幾乎不變（4B 8 GB 預設用這個）；"
            "train.compile_layers=true 在 H200 上實測每步中位數差 −10% 到 +18%，多用約 1.5 GiB。",
        )
    if cfg.train.max_steps == 0 or (cfg.train.max_steps < 0 and cfg.train.num_train_epochs <= 0):
        raise ConfigError(
            "訓練步數為 0：train.max_steps 與 train.num_train_epochs 都沒有指定要訓練。",
            hint="設定 train.max_steps（例如 40）或 train.num_train_epochs（例如 1）。",
        )


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (YAML-parsed values) onto a nested dict copy."""
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"無法解讀覆寫設定 {item!r}。", hint="格式為 區段.鍵=值，例如 train.learning_rate=1e-4")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        sec = result.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"設定區段 {section} 不是對應表，無法覆寫 {dotted}。")
        sec[key] = _parse_scalar(raw)
    return result


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""

    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"找不到設定檔 {p}。", hint="請確認路徑，或從 configs/ 中選一個，例如 configs/demo.yaml。"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"無法讀取設定檔 {p}：{exc}", hint="設定檔必須是 UTF-8 編碼的 YAML 文字檔。") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"第 {mark.line + 1} 行第 {mark.column + 1} 欄" if mark else "某處"
            raise ConfigError(
                f"設定檔 {p} 的 YAML 格式錯誤（{where}）。", hint="檢查縮排（只能用空格）與冒號後的空格。"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"設定檔 {p} 的最上層必須是對應表（model:、data:、lora:、train:、eval:），"
                f"卻是{_SHAPE_NAMES.get(type(data).__name__, type(data).__name__)}。",
                hint="請參考 configs/demo.yaml 的格式：每個區段名稱後接冒號，底下縮排寫「鍵: 值」。",
            )
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


_SHAPE_NAMES = {
    "list": "清單",
    "str": "一段文字",
    "int": "整數",
    "float": "數字",
    "bool": "true/false",
    "date": "日期",
    "datetime": "日期時間",
    "bytes": "二進位資料",
    "set": "集合",
}


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return write_text(
        path,
        "# 本次執行實際使用的完整設定（由 medgemma_lib 自動寫入）\n"
        + yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False),
    )


def check_paths(cfg: RunConfig) -> None:
    """Fail early, in Chinese, when the input is missing or the output folder is not writable.

    Data paths are found as the data step finds them (:func:`~medgemma_lib.core.paths.resolve_path`)."""
    if cfg.data.prepared_dir is None:
        src = resolve_path(cfg.data.input)
        if src.exists() and not os.access(src, os.R_OK):
            raise ConfigError(
                f"資料檔 data.input = {cfg.data.input} 無法讀取（沒有讀取權限）。", hint="請檢查檔案權限。"
            )
        if not src.exists():
            raise ConfigError(
                f"找不到資料檔 data.input = {cfg.data.input}。",
                hint="請確認路徑（相對於目前資料夾），例如 data/medquad_sample.csv。",
            )
        for i, entry in enumerate(cfg.data.mix):
            if not resolve_path(entry["input"]).exists():
                raise ConfigError(
                    f"找不到資料檔 data.mix[{i}].input = {entry['input']}。",
                    hint="請確認路徑（規則與 data.input 相同），或從 data.mix 移除這個來源。",
                )
    else:
        prepared = resolve_path(cfg.data.prepared_dir)
        if not prepared.is_dir():
            raise ConfigError(
                f"找不到已準備的資料夾 data.prepared_dir = {cfg.data.prepared_dir}。",
                hint="請先執行 python -m medgemma_lib data prepare，或把 data.prepared_dir 留空。",
            )
    _check_output(cfg, Path.cwd())


def _check_output(cfg: RunConfig, base: Path) -> None:
    out = Path(cfg.train.output_dir)
    out = out if out.is_absolute() else base / out
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"無法寫入輸出資料夾 train.output_dir = {cfg.train.output_dir}（{probe} 不是可寫入的資料夾）。",
            hint="請改用可寫入的路徑，例如 results。",
        )


def check_model_source(profile: str) -> ResolvedModel:
    """Refuse, in Chinese, a model that loading would refuse: unknown name, a folder without a readable
    ``config.json``, or with missing or truncated safetensors files.

    The one check :func:`medgemma_lib.models.loading.resolve_model` runs before loading
    (:func:`medgemma_lib.core.profiles.model_source`), here without loading or converting anything.
    Returns the model resolved, for loading to use without checking it again.
    """
    return resolve_source(profile)


def validate_run(
    cfg: RunConfig, *, check_data: bool = True, check_model: bool = True, model: ResolvedModel | None = None
) -> ResolvedModel | None:
    """The one validation of a training run, before anything is created: ``config check`` and ``train`` call it.

    The config itself was validated when it was built (:func:`config_from_dict`); this adds what
    lies outside it: the model (known profile, or a folder with a readable ``config.json``), the
    input files (``check_data``; off when the caller passes prepared datasets) and a writable
    output location (including the run folder when ``train.run_name`` is set).

    Returns the model resolved once (None when ``check_model`` is off): hand it to ``run_training`` and
    loading so that nothing reads the model folder again. ``model``: one this function returned earlier
    for the same ``cfg.model.profile``; it is reused, not checked again.
    """
    resolved = None
    if check_model:
        reuse = model is not None and model.name == cfg.model.profile
        resolved = model if reuse else check_model_source(cfg.model.profile)
    if check_data:
        check_paths(cfg)
    else:
        _check_output(cfg, Path.cwd())
    if cfg.train.run_name:
        run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
        if run_dir.exists() and not run_dir.is_dir():
            raise OutputError(
                f"執行資料夾 {run_dir} 已存在，但它是檔案而不是資料夾。",
                hint="請換一個 train.run_name，或移走這個檔案。",
            )
        if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
            raise OutputError(f"執行資料夾 {run_dir} 無法寫入。", hint="請換一個 train.run_name 或檢查權限。")
    return resolved


def config_headlines(folder: str | os.PathLike) -> str:
    """Each ``*.yaml`` in ``folder`` beside its first line, the comment that says what it is for (notebook 05)."""
    lines = []
    for path in sorted(Path(folder).glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ") if path.stat().st_size else ""
        lines.append(f"{path.name:<28}{first}")
    return "\n".join(lines)
