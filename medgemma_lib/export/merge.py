"""Merge a run's LoRA adapter into the base model and export a standalone folder (notebook 07).

Why the base is loaded *unquantised* for merging: QLoRA trains the adapter on top of NF4 weights,
but adding the LoRA update ``B·A`` into 4-bit weights would round it away again (NF4 has 16
levels per block), and PEFT would have to dequantise, add and re-quantise — a lossy round trip.
So the base is loaded in bf16 (or fp32 on CPU), the adapter is added exactly, and the merged
weights are saved as safetensors. The folder (weights, tokenizer, chat template, generation
config with both stop tokens, a model card) loads with plain ``transformers``::

    AutoModelForCausalLM.from_pretrained("results/<run>/merged")

Memory: merging needs the whole base in bf16 in CPU RAM (about 2 bytes per parameter: 0.6 GB for
the demo model, 9 GB for 4B, 55 GB for 27B) plus the same on disk.

Every step takes the run opened once (:class:`~medgemma_lib.training.runs.Run`; a path is opened once at the
public entry point): its config is not read, its adapter not verified or hashed, its base not resolved again.

:func:`verify_export` checks that the exported folder gives the same greedy answer as base +
adapter, and :func:`verify_passed` decides against :data:`MAX_MERGE_ERROR_RATIO`. :func:`push_to_hub`
uploads the folder (private by default) with a token from ``medgemma_lib.setup.auth.find_token``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import peft
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.atomic import atomic_folder, write_json
from medgemma_lib.core.errors import AuthError, ConfigError, ModelError, OutputError, ResourceError
from medgemma_lib.core.weightfiles import SAFETENSORS_INDEX, model_shards
from medgemma_lib.models.generation import _generate_kwargs, build_prompt
from medgemma_lib.models.loading import (
    BOS_ID,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    ResolvedModel,
    check_dtype_allowed,
    load_model,
    load_tokenizer,
    resolve_model,
)
from medgemma_lib.setup.auth import TOKENS_PAGE, classify_hub_error, find_token, mask_token
from medgemma_lib.training.runs import Run, as_run, attach_adapter

MERGED_DIR = "merged"
EXPORT_MANIFEST = "medgemma_export.json"
DTYPES = ("bfloat16", "float32")
VERIFY_QUESTIONS = ["What are the symptoms of diabetes?", "糖尿病的症狀是什麼?"]
MAX_MERGE_ERROR_RATIO = 0.25
"""The pass/fail cutoff of ``export --verify`` (and notebook 07) on ``verify_export(...)["merge_error_ratio"]``.

That ratio compares two L2 distances between next-token logits of the verify questions: exported folder vs
unmerged base + adapter, over base + adapter vs the base alone (adapter disabled). 0 is an exact merge, 1 is as
if the merge had been skipped. bf16 rounding of W + ΔW gives a few percent (6 % on the demo run of notebook
07); 25 % or more means the merge did not take. float32 must also give the same greedy answers
(:func:`verify_passed`).
"""
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def default_output_dir(run_dir: str | Path | Run, dtype: str = "bfloat16") -> Path:
    """``results/<run>/merged`` (bf16) or ``results/<run>/merged-float32``."""
    folder = run_dir.path if isinstance(run_dir, Run) else Path(run_dir)
    return folder / (MERGED_DIR if dtype == "bfloat16" else f"{MERGED_DIR}-{dtype}")


def load_merge_pair(run_dir: str | Path | Run, dtype: str = "bfloat16", device: str = "cpu"):
    """Unquantised base + adapter (a ``PeftModel``), the tokenizer and the run; nothing merged yet.

    ``run_dir``: an opened :class:`~medgemma_lib.training.runs.Run`, or a folder (opened here once).
    """

    if dtype not in DTYPES:
        check_dtype_allowed(dtype)  # fp16 gets its own explanation
        raise ConfigError(
            f"不支援的匯出精度 {dtype!r}。", hint="請用 bfloat16（預設）或 float32（只在 CPU 上需要完全精確時）。"
        )
    run = as_run(run_dir)
    source = run.base_model()
    tokenizer = load_tokenizer(source)
    base = load_model(source, "none", device, dtype=dtype)  # never NF4: see module docstring
    return attach_adapter(base, run), tokenizer, run


def merge_adapter(
    run_dir: str | Path | Run,
    output_dir: str | Path | None = None,
    dtype: str = "bfloat16",
    device: str = "cpu",
    overwrite: bool = False,
    verbose: bool = True,
    method: str = "auto",
) -> Path:
    """Merge the run's adapter into an unquantised copy of the base and save a standalone folder.

    ``method``: ``memory`` (PEFT ``merge_and_unload`` on the whole model), ``stream`` (:func:`stream_merge`,
    one shard at a time) or ``auto`` (stream when the whole model would not fit in the available RAM).
    ``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when present). The path taken is printed and
    recorded in the manifest. The folder is written to a temporary sibling and renamed into place
    only when complete. ``run_dir``: an opened :class:`~medgemma_lib.training.runs.Run`, or a folder (opened
    here once). Returns the output folder.
    """
    started = time.time()
    out = Path(output_dir) if output_dir else default_output_dir(run_dir, dtype)
    if out.exists() and not overwrite:
        raise OutputError(f"匯出資料夾 {out} 已經存在。", hint="請換一個 --output，或加上 --overwrite 覆蓋。")
    if dtype not in DTYPES:
        check_dtype_allowed(dtype)
        raise ConfigError(
            f"不支援的匯出精度 {dtype!r}。", hint="請用 bfloat16（預設）或 float32（只在 CPU 上需要完全精確時）。"
        )
    device = merge_device(device)
    run = as_run(run_dir)
    base_dir = base_folder(run.base_model())
    chosen, reason = choose_merge_method(base_dir, dtype, method)
    if verbose:
        print(f"合併方式：{reason}", flush=True)
    hint = "請確認磁碟空間（約為模型大小）與寫入權限；"
    if chosen == "memory":
        if verbose:
            print(f"載入未量化的基礎模型（{dtype}，{device}）並掛上轉接器…", flush=True)
        model, tokenizer, run = load_merge_pair(run, dtype, device)
        merged = model.merge_and_unload()
        _check_merged(merged)
        with atomic_folder(out, what="匯出資料夾", hint=hint) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
            _write_folder_files(tmp, tokenizer, merged, run, dtype, started, chosen, device)
    else:
        tokenizer = load_tokenizer(run.base_model())
        with atomic_folder(out, what="匯出資料夾", hint=hint) as tmp:
            stream_merge(base_dir, run.adapter_dir, tmp, dtype, device)
            config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))  # JSON only, no pickle
            config["dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            gen_file = base_dir / "generation_config.json"
            gc = (
                GenerationConfig.from_dict(json.loads(gen_file.read_text(encoding="utf-8")))
                if gen_file.is_file()
                else GenerationConfig()
            )
            _write_folder_files(
                tmp, tokenizer, SimpleNamespace(generation_config=gc), run, dtype, started, chosen, device
            )
    if verbose:
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e9
        print(f"已匯出合併後的模型：{out}（{size:.2f} GB，{time.time() - started:.0f} 秒）", flush=True)
    return out


def _write_folder_files(tmp: Path, tokenizer, model, run, dtype, started, method, device) -> None:
    tokenizer.save_pretrained(tmp)
    _write_generation_config(model, tmp)
    (tmp / "README.md").write_text(model_card(run, dtype), encoding="utf-8")
    manifest = {**_manifest(run, dtype, started), "merge_method": method, "merge_device": device}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def merge_device(device: str) -> str:
    """``cpu``, ``cuda`` (refused in Chinese without a GPU) or ``auto`` (CUDA when present)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ResourceError(
            "指定了 --device cuda，但這台電腦沒有可用的 CUDA GPU。", hint="請改用 --device cpu 或 auto。"
        )
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"不認識的合併裝置 {device!r}。", hint="請用 cpu、cuda 或 auto。")
    return device


def base_folder(profile_name: str | ResolvedModel) -> Path:
    """The local folder of the base model's files (the Hub cache for a Hub id)."""
    source = resolve_model(profile_name).source
    if Path(source).is_dir():
        return Path(source)
    try:
        return Path(
            huggingface_hub.snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"])
        )
    except Exception as exc:  # offline without a cached copy, no access
        raise ModelError(
            f"無法取得基礎模型 {source} 的檔案：{str(exc).splitlines()[0][:160]}",
            hint="請確認網路與存取權（python -m medgemma_lib auth check），或先下載到本機資料夾。",
        ) from None


def files_table(folder: str | Path):
    """The files of an exported folder with readable sizes (notebook 07): 「536.2 MB」, 「4.2 KB」, not 「0.00 MB」."""
    import pandas as pd

    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    rows = [{"檔案": p.name, "大小": display.human_size(p.stat().st_size), "位元組": p.stat().st_size} for p in files]
    return pd.DataFrame(rows).set_index("檔案")


def _check_merged(model) -> None:
    leftover = [n for n, _ in model.named_modules() if n.endswith("lora_A") or n.endswith("lora_B")]
    if leftover:
        raise ModelError(f"合併後仍有 LoRA 層（例如 {leftover[0]}）。", hint="請回報此問題並附上 peft 版本。")


def _write_generation_config(model, folder: Path) -> None:
    """Stop on both ``<eos>`` and ``<end_of_turn>``, pad with ``<pad>``, greedy by default."""

    gc = getattr(model, "generation_config", None) or GenerationConfig()
    eos = (
        gc.eos_token_id
        if isinstance(gc.eos_token_id, list)
        else [gc.eos_token_id]
        if gc.eos_token_id is not None
        else []
    )
    gc.eos_token_id = sorted({*eos, EOS_ID, END_OF_TURN_ID})
    gc.pad_token_id = PAD_ID if gc.pad_token_id is None else gc.pad_token_id
    gc.bos_token_id = BOS_ID if gc.bos_token_id is None else gc.bos_token_id
    gc.save_pretrained(folder)


def _manifest(run: Run, dtype: str, started: float) -> dict:
    digest = run.adapter_digest()  # verified when the run was opened: not hashed again
    return {
        "run": run.name,
        "base_model": run.config.model.profile,
        "trained_quantization": run.config.model.quantization,
        "dtype": dtype,
        "adapter_sha256": digest,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1),
    }


def model_card(run, dtype: str) -> str:
    """A short Traditional Chinese model card (also the Hub README)."""
    base = run.config.model.profile
    return f"""---
language: [zh, en]
library_name: transformers
tags: [medgemma, gemma3, lora, medquad, medgemma-zh]
---

# {run.name}（合併後的 LoRA 微調模型）

- 基礎模型：`{base}`（訓練時以 {run.config.model.quantization} 載入）
- 微調資料：`{run.config.data.input}`；LoRA r={run.config.lora.r}、alpha={run.config.lora.alpha}
- 權重精度：{dtype}；轉接器已合併，可直接以 `transformers` 載入：

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("這個資料夾")
tokenizer = AutoTokenizer.from_pretrained("這個資料夾")
```

> {MEDICAL_DISCLAIMER}

使用本模型須遵守基礎模型的授權條款（Gemma 使用條款；MedGemma 另受 Health AI Developer Foundations 條款約束）。
本模型由 medgemma-zh 課程產生，僅供教學與研究，未經臨床驗證。
"""


# ----------------------------------------------------------------------------------------------
# Verification


def greedy_token_ids(model, tokenizer, questions: list[str], max_new_tokens: int = 24) -> list[list[int]]:
    """Greedy answer token ids, one question at a time (no padding: exact comparisons)."""

    device = model.device
    kwargs = _generate_kwargs(model, tokenizer, max_new_tokens, False, 1.0, 1.0)
    out = []
    for q in questions:
        enc = tokenizer(build_prompt(tokenizer, q), return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            ids = model.generate(**enc, **kwargs)
        out.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return out


def verify_export(
    export_dir: str | Path,
    run_dir: str | Path | Run,
    questions: list[str] | None = None,
    max_new_tokens: int = 24,
    verbose: bool = True,
) -> dict:
    """Compare greedy answers of the exported folder with base + adapter (same dtype, unmerged).

    Returns ``{"same": bool, "questions": [...], "exported": [...], "adapter": [...], "base": [...]}``;
    ``base`` (adapter disabled) shows that the adapter really changes the answers. ``run_dir``: the opened
    :class:`~medgemma_lib.training.runs.Run` that was merged, or a folder (opened here once).
    :func:`verify_passed` says whether the result passes.
    """

    export_dir = Path(export_dir)
    manifest = (
        json.loads((export_dir / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        if (export_dir / EXPORT_MANIFEST).is_file()
        else {}
    )
    dtype = manifest.get("dtype", "bfloat16")
    questions = questions or VERIFY_QUESTIONS
    display.quiet_progress_bars()  # in a notebook only
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    exported = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=getattr(torch, dtype), use_safetensors=True)
    exported.eval()
    got = greedy_token_ids(exported, tok, questions, max_new_tokens)
    got_logits = _next_token_logits(exported, tok, questions)
    del exported
    pair, tokenizer, _ = load_merge_pair(as_run(run_dir), dtype, "cpu")
    want = greedy_token_ids(pair, tokenizer, questions, max_new_tokens)
    want_logits = _next_token_logits(pair, tokenizer, questions)
    with pair.disable_adapter():
        base = greedy_token_ids(pair, tokenizer, questions, max_new_tokens)
        base_logits = _next_token_logits(pair, tokenizer, questions)
    merge_error = (got_logits - want_logits).norm().item()  # L2 over all questions' next-token logits
    adapter_effect = (want_logits - base_logits).norm().item()
    decode = lambda rows: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]  # noqa: E731
    result = {
        "same": got == want,
        "adapter_changes_answers": base != want,
        # How far the exported logits are from base+adapter, relative to how far the adapter moves them:
        # 0 = exact; 1 = as if the merge had been skipped. bf16 rounding of W + ΔW gives a small non-zero value.
        "merge_error_ratio": merge_error / adapter_effect if adapter_effect > 0 else float("inf"),
        "dtype": dtype,
        "questions": questions,
        "exported": decode(got),
        "adapter": decode(want),
        "base": decode(base),
        "exported_ids": got,
        "adapter_ids": want,
    }
    if verbose:
        print(
            "匯出模型與「基礎模型＋轉接器」的貪婪答案" + ("完全相同 ✓" if result["same"] else "不完全相同"), flush=True
        )
        print(
            f"下一個 token 的 logits 差距：轉接器造成的變化的 {result['merge_error_ratio']:.1%}"
            "（0% 表示完全一致；100% 等於沒有合併）",
            flush=True,
        )
    return result


def verify_passed(result: dict) -> bool:
    """Whether a :func:`verify_export` result passes: ``merge_error_ratio`` below :data:`MAX_MERGE_ERROR_RATIO`,
    and for float32 the same greedy answers as base + adapter."""
    if not result["merge_error_ratio"] < MAX_MERGE_ERROR_RATIO:
        return False
    return result["same"] or result.get("dtype") != "float32"


def _next_token_logits(model, tokenizer, questions: list[str]):
    """Last-position logits (float32) of each question's prompt, stacked."""

    rows = []
    for q in questions:
        ids = tokenizer(build_prompt(tokenizer, q), return_tensors="pt", add_special_tokens=False).input_ids.to(
            model.device
        )
        with torch.inference_mode():
            rows.append(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().cpu())
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Hub


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` with Hub-legal characters, else ConfigError."""
    repo_id = (repo_id or "").strip()
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConfigError(
            f"Hub 儲存庫名稱 {repo_id!r} 格式不正確。",
            hint="格式為 使用者或組織/模型名稱，例如 my-name/medgemma-zh-demo（只能用英數字、-、_、.）。",
        )
    return repo_id


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = True,
    endpoint: str | None = None,
    verbose: bool = True,
) -> str:
    """Upload an exported folder to the Hugging Face Hub (private by default); returns the repo URL."""
    export_dir = Path(export_dir)
    repo_id = check_repo_id(repo_id)
    if not (export_dir / "config.json").is_file() or not any(export_dir.glob("*.safetensors")):
        raise ModelError(
            f"{export_dir} 不是匯出的模型資料夾（缺少 config.json 或 *.safetensors）。",
            hint="請先執行 python -m medgemma_lib export --run 執行資料夾。",
        )

    token, source = find_token(token)
    if not token:
        raise AuthError(
            "上傳到 Hugging Face Hub 需要具有寫入權限的存取權杖（token），但沒有找到。",
            hint="請執行 hf auth login，或設定環境變數 HF_TOKEN（權杖需要 write 權限）。",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise AuthError(
            "目前是離線模式（HF_HUB_OFFLINE=1），無法上傳。", hint="請在有網路的環境取消 HF_HUB_OFFLINE 後再上傳。"
        )

    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    if verbose:
        print(
            f"上傳 {export_dir.name} 到 {repo_id}（{'私人' if private else '公開'}，權杖 {mask_token(token)}）…",
            flush=True,
        )
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(export_dir),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload merged model from medgemma-zh",
        )
    except Exception as exc:  # HTTP errors from the Hub: explain in Chinese
        kind = classify_hub_error(exc)
        if kind in ("invalid_token", "forbidden"):
            raise AuthError(
                f"Hub 拒絕上傳到 {repo_id}：權杖無效或沒有寫入權限。",
                hint=f"請到 {TOKENS_PAGE} 建立具有 write 權限的權杖，並確認你對這個使用者或組織有寫入權。",
            ) from None
        if kind == "network_error":
            raise AuthError(
                "無法連線到 Hugging Face Hub。", hint="請檢查網路連線後重試；已上傳的檔案不會重複上傳。"
            ) from None
        raise AuthError(
            f"上傳到 Hub 失敗：{str(exc).splitlines()[0][:200]}",
            hint="請檢查網路連線後重試；已上傳的檔案不會重複上傳。",
        ) from None
    return str(url)


# ----------------------------------------------------------------------------------------------
# Streaming merge: one safetensors shard at a time (peak RAM about one shard plus the adapter)

_PEFT_PREFIX = "base_model.model."
# Gemma 3 multimodal: transformers 5 names modules model.language_model.*, original checkpoints language_model.model.*
_PREFIX_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "model.language_model."),
)


_TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def _token_rows(config, tensors: dict) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Embedding rows trained with ``trainable_token_indices`` (the turn tokens): ``{module path: (ids, rows)}``.

    They replace those rows of the base embedding; a tied output layer reads the same rows.
    """
    indices = config.trainable_token_indices
    rows = {}
    for key, value in tensors.items():
        if not key.endswith(_TOKEN_DELTA):
            continue
        module = key[: -len(_TOKEN_DELTA)].removeprefix(_PEFT_PREFIX)
        ids = (
            indices
            if isinstance(indices, list)
            else next((v for name, v in (indices or {}).items() if module.endswith(name)), None)
        )
        if not ids or len(ids) != value.shape[0]:
            raise ModelError(f"轉接器的 {module} 嵌入列與 trainable_token_indices 對不上。", hint="請重新訓練。")
        rows[module] = (list(ids), value)
    return rows


def _lora_pairs(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, bool, dict]:
    """``{module path: (A, B)}``, the scale, fan_in_fan_out and the trained embedding rows (:func:`_token_rows`),
    read with PEFT's own config reader."""
    from safetensors.torch import load_file

    config = peft.PeftConfig.from_peft_type(**peft.PeftConfig.from_json_file(str(adapter_dir / "adapter_config.json")))
    if not isinstance(config, peft.LoraConfig) or config.use_dora or config.modules_to_save:
        raise ModelError(
            "這個轉接器不是一般的 LoRA（DoRA、modules_to_save 或其他方法），無法逐檔合併。",
            hint="請改用 --merge memory（整個模型載入記憶體合併）。",
        )
    if config.rank_pattern or config.alpha_pattern:
        raise ModelError("逐檔合併不支援 rank_pattern／alpha_pattern。", hint="請改用 --merge memory。")
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, list] = {}
    for key, value in tensors.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                module = key[: -len(part)].removeprefix(_PEFT_PREFIX)
                pairs.setdefault(module, [None, None])[slot] = value
    broken = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if broken or not pairs:
        raise ModelError(f"轉接器權重不完整（例如 {broken[:1] or '沒有 LoRA 權重'}）。", hint="請重新訓練。")
    return {m: (a, b) for m, (a, b) in pairs.items()}, scale, bool(config.fan_in_fan_out), _token_rows(config, tensors)


def _base_key(module: str, keys: set[str]) -> str | None:
    if f"{module}.weight" in keys:
        return f"{module}.weight"
    for ours, theirs in _PREFIX_ALIASES:
        if module.startswith(ours) and f"{theirs}{module[len(ours) :]}.weight" in keys:
            return f"{theirs}{module[len(ours) :]}.weight"
    return None


def stream_merge(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", device: str = "cpu"
) -> dict:
    """Add ``scale · B·A`` into the base weights shard by shard and write the shards into ``out_dir``.

    Everything is checked before the first shard is written: every shard whole, every LoRA layer found in
    one with matching shapes. ``out_dir`` should be a temporary folder (see :func:`merge_adapter`).
    Returns ``{"shards": n, "merged_layers": n, "seconds": s}``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    started = time.time()
    base_dir, out_dir, target = Path(base_dir), Path(out_dir), getattr(torch, dtype)
    shards = model_shards(base_dir)
    pairs, scale, fan_in_fan_out, token_rows = _lora_pairs(Path(adapter_dir))
    where: dict[str, tuple[Path, str]] = {}
    row_keys: dict[str, str] = {}  # base key -> module of trained embedding rows
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            keys = set(handle.keys())
            for module, (_, rows) in token_rows.items():
                key = _base_key(module, keys)
                if key is not None:
                    shape = tuple(handle.get_slice(key).get_shape())
                    if shape[1:] != tuple(rows.shape[1:]):
                        raise ModelError(
                            f"轉接器的 {module} 嵌入列寬 {rows.shape[1]} 與基礎模型的 {shape} 不同。",
                            hint="請確認 config.yaml 的 model.profile 與訓練時相同。",
                        )
                    row_keys[key] = module
            for module, (a, b) in pairs.items():
                key = _base_key(module, keys)
                if key is None:
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                want = (b.shape[0], a.shape[1]) if not fan_in_fan_out else (a.shape[1], b.shape[0])
                if shape != want:
                    raise ModelError(
                        f"轉接器的 {module} 形狀 {want} 與基礎模型的 {shape} 不同：轉接器不是用這個基礎模型訓練的。",
                        hint="請確認 config.yaml 的 model.profile 與訓練時相同。",
                    )
                where[module] = (shard, key)
    missing = sorted(set(pairs) - set(where)) + sorted(set(token_rows) - set(row_keys.values()))
    if missing:
        raise ModelError(
            f"基礎模型中找不到轉接器的層 {missing[0]}（共 {len(missing)} 層）：轉接器不是用這個基礎模型訓練的。",
            hint="請確認 config.yaml 的 model.profile 與訓練時相同。",
        )
    by_shard: dict[Path, dict[str, str]] = {}
    for module, (shard, key) in where.items():
        by_shard.setdefault(shard, {})[key] = module
    weight_map, total = {}, 0
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key in by_shard.get(shard, {}):
                    a, b = pairs[by_shard[shard][key]]
                    delta = b.to(device, torch.float32) @ a.to(device, torch.float32)
                    delta = delta.T if fan_in_fan_out else delta
                    tensor = (tensor.to(device, torch.float32) + scale * delta).to(target).cpu()
                elif key in row_keys:  # PEFT's merge replaces the rows (index_copy), it does not add
                    ids, rows = token_rows[row_keys[key]]
                    tensor = tensor.to(target).clone()
                    tensor[torch.tensor(ids)] = rows.to(target)
                elif tensor.is_floating_point():
                    tensor = tensor.to(target)
                tensors[key] = tensor.contiguous()
                weight_map[key] = shard.name
                total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(out_dir / shard.name), metadata=metadata or {"format": "pt"})
        del tensors
    if len(shards) > 1 or shards[0].name != "model.safetensors":  # one shard named like a sharded save needs its index
        write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    return {
        "shards": len(shards),
        "merged_layers": len(where),
        "token_rows": sum(len(ids) for ids, _ in token_rows.values()),
        "seconds": round(time.time() - started, 1),
    }


def available_ram_bytes() -> int:
    """Memory available to a new allocation now (psutil; /proc/meminfo as a fallback)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0


def choose_merge_method(base_dir: str | Path, dtype: str, method: str = "auto") -> tuple[str, str]:
    """``("stream" | "memory", Chinese reason)``: stream when the whole model would not fit in RAM (or asked)."""
    if method not in ("auto", "stream", "memory"):
        raise ConfigError(f"不認識的合併方式 {method!r}。", hint="請用 auto（預設）、stream 或 memory。")
    shards = model_shards(base_dir)
    on_disk = sum(s.stat().st_size for s in shards)
    need = on_disk * (2 if dtype == "float32" else 1) * 1.3  # fp32 from a bf16 base doubles; 30% for copies
    free = available_ram_bytes()
    if method == "stream":
        return "stream", "逐檔合併（依指定）：一次只讀一個權重檔，記憶體約為最大的權重檔加上轉接器。"
    if method == "memory":
        return "memory", "整個模型載入記憶體合併（依指定，PEFT merge_and_unload）。"
    if need > free:
        return "stream", (
            f"逐檔合併：整個模型約需 {need / 1e9:.1f} GB 記憶體，目前可用 {free / 1e9:.1f} GB，所以一次只讀一個權重檔。"
        )
    return "memory", f"整個模型載入記憶體合併（約需 {need / 1e9:.1f} GB，目前可用 {free / 1e9:.1f} GB）。"


def verify_markdown(check: dict) -> display.Markdown:
    """:func:`verify_export`'s answers for people (notebook 07): per question the exported model's, base +
    adapter's (unmerged) and the base's greedy answer, under the medical disclaimer."""
    dtype = {"bfloat16": "bf16"}.get(check.get("dtype", "bfloat16"), check.get("dtype"))
    shown = lambda text: display.md_escape(display.clip(text)) or "（空白）"  # noqa: E731
    parts = []
    for q, exported, adapter, base in zip(check["questions"], check["exported"], check["adapter"], check["base"]):
        parts.append(
            f"**問：{display.md_escape(q)}**\n\n- 匯出的模型（{dtype}）：{shown(exported)}\n"
            f"- 基礎模型＋轉接器（{dtype}，未合併）：{shown(adapter)}\n- 基礎模型（未微調）：{shown(base)}"
        )
    return display.Markdown("\n\n".join(parts) + f"\n\n> {MEDICAL_DISCLAIMER}")
