"""The model registry: every model the course knows, with its architecture and LoRA targets.

One table read by loading (``models``), the memory estimator (``memory``), the benchmark (``bench``),
authentication (``auth``) and the CLI. No torch here, so reading it costs nothing.

Architectures come from the checkpoints' ``config.json`` on the Hub (the 270M demo from its converted
config): 27B text: hidden 5376, 62 layers, intermediate 21504, 32 heads, 16 KV heads, head_dim 128,
vocab 262,208. 4B language model: hidden 2560, 34 layers, intermediate 10240, 8 heads, 4 KV heads,
head_dim 256, vocab 262,208, plus a SigLIP vision tower (27 layers, hidden 1152, MLP 4304, 896 px /
14 px patches) and projector to 2560: 419.6 M parameters kept in bf16, never trained. The multimodal
27B has the same language model plus the same vision tower.

MedGemma 1.5 4B (``google/medgemma-1.5-4b-it``, released 2026-01-13; the current 4B) keeps the Gemma 3 4B
architecture of 1.0: the same class, the same language model (34 layers, 4 KV heads, head_dim 256) and a SigLIP
tower of the same shape reading 896 px images as 256 tokens (MedGemma 1.5 technical report, arXiv 2604.05081;
model card on the Hub). What changed is the training: new imaging (CT/MRI volumes, whole-slide pathology,
longitudinal chest X-rays, bounding boxes), documents (lab reports, EHR) and about +5 % on MedQA by Google's report.
The shape numbers were not read from the gated config.json here (no Hub access on the build machine); they are the
ones the issue and the report give, and ``tests/test_models_loading.py`` builds a tiny model of this class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medgemma_lib.core.errors import ModelError
from medgemma_lib.core.weightfiles import model_shards

END_OF_TURN_ID = 106  # <end_of_turn>
EOS_ID = 1  # <eos>
PAD_ID = 0  # <pad>
BOS_ID = 2  # <bos>

# Every linear layer of a Gemma 3 decoder block: what LoRA "all-linear" means in this course.
LORA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIGLIP_VISION_PARAMS = 419_600_000  # SigLIP so400m tower + projector of MedGemma 4B / 27B multimodal
IMAGE_SIZE = 896  # px; both 4B versions (1.0 and 1.5): images are resized to 896 x 896 ...
IMAGE_TOKENS = 256  # ... and become 256 soft tokens (Gemma 3 mm_tokens_per_image); the course trains on text only

# Multimodal Gemma 3 (Gemma3ForConditionalGeneration) trained on text needs transformers with the token_type_ids fix.
MIN_TRANSFORMERS_MULTIMODAL = (5, 6)

_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


@dataclass(frozen=True)
class Architecture:
    """Shape numbers of a Gemma 3 language model (plus an optional frozen vision tower)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_params: float = 0.0  # kept in bf16, never trained
    sliding_window: int = 1024
    query_pre_attn_scalar: int | None = None  # None: head_dim
    max_position_embeddings: int = 131_072
    rope_parameters: dict | None = field(default=None, hash=False, compare=False)
    layer_types: tuple[str, ...] | None = None  # None: Gemma 3's default pattern

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        norms = self.layers * (4 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.vocab * self.hidden + norms

    def text_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers.Gemma3TextConfig`` for a model of this shape."""
        kwargs: dict[str, Any] = dict(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            sliding_window=self.sliding_window,
            query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.rope_parameters is not None:
            kwargs["rope_parameters"] = self.rope_parameters
        if self.layer_types is not None:
            kwargs["layer_types"] = list(self.layer_types)
        return kwargs


_LM_27B = Architecture(
    "medgemma-27b-text-it", 5376, 62, 21504, 32, 16, 128, 262_208, query_pre_attn_scalar=168, rope_parameters=_ROPE
)
_LM_4B = Architecture("medgemma-4b-it", 2560, 34, 10240, 8, 4, 256, 262_208, rope_parameters=_ROPE)


@dataclass(frozen=True)
class ModelProfile:
    """What the library needs to know about one model to load, size and train it."""

    name: str
    hub_id: str | None
    model_class: str  # "Gemma3ForCausalLM" or "Gemma3ForConditionalGeneration"
    has_vision_tower: bool
    train_dtype: str  # dtype to compute in on a bf16-capable GPU
    attn_implementation: str
    params_billion: float
    gated: bool
    description: str  # Traditional Chinese, shown to learners
    architecture: Architecture | None = None  # None: a local folder, shape read from its config.json
    lora_layers: tuple[str, ...] = LORA_LINEAR_LAYERS
    presets: tuple[str, ...] = ()  # configs/*.yaml made for this model, smallest GPU first
    released: str | None = None  # date of the checkpoint's release (the model table's lineup)
    recommended: bool = False  # the one the course recommends in its size class

    @property
    def is_demo(self) -> bool:
        return self.name == "demo"

    def lora_target_modules(self, targets: str | list[str] = "all-linear") -> str | list[str]:
        """PEFT ``target_modules`` for ``targets`` that stay inside the language model (never the vision tower)."""
        names = list(self.lora_layers) if targets == "all-linear" else list(targets)
        if not self.has_vision_tower:
            return names
        # PEFT treats a string as a regex over full module names.
        return r".*language_model.*\.(" + "|".join(names) + r")$"


_MEDGEMMA_4B = ModelProfile(
    "medgemma-4b-it",
    "google/medgemma-4b-it",
    "Gemma3ForConditionalGeneration",
    True,
    "bfloat16",
    "sdpa",
    4.3,
    True,
    "MedGemma 4B 指令微調版 1.0（含影像編碼器；本課程只用文字部分）；新版為 medgemma-1.5-4b-it",
    replace(_LM_4B, vision_params=SIGLIP_VISION_PARAMS),
    presets=("configs/medgemma-4b-8gb.yaml", "configs/medgemma-4b-24gb.yaml", "configs/medgemma-4b-141gb.yaml"),
    released="2025-05-20",
)

PROFILES: dict[str, ModelProfile] = {
    p.name: p
    for p in [
        ModelProfile(
            "demo",
            None,
            "Gemma3ForCausalLM",
            False,
            "bfloat16",
            "sdpa",
            0.27,
            False,
            "Gemma 3 270M（基礎模型），由 PyPI 套件離線提供，用於在筆電 CPU 上完整走過課程流程",
            Architecture("demo", 640, 18, 2048, 4, 1, 256, 262_144, sliding_window=512, max_position_embeddings=32_768),
            presets=("configs/demo.yaml",),
        ),
        _MEDGEMMA_4B,
        replace(  # 1.5: the same class, language model and tower as 1.0; other training
            _MEDGEMMA_4B,
            name="medgemma-1.5-4b-it",
            hub_id="google/medgemma-1.5-4b-it",
            description="MedGemma 1.5 4B 指令微調版（2026-01 發布，目前建議的 4B；含影像編碼器，本課程只用文字部分）",
            architecture=replace(_MEDGEMMA_4B.architecture, name="medgemma-1.5-4b-it"),
            presets=(
                "configs/medgemma-1.5-4b-8gb.yaml",
                "configs/medgemma-1.5-4b-24gb.yaml",
                "configs/medgemma-1.5-4b-141gb.yaml",
            ),
            released="2026-01-13",
            recommended=True,
        ),
        ModelProfile(
            "medgemma-27b-text-it",
            "google/medgemma-27b-text-it",
            "Gemma3ForCausalLM",
            False,
            "bfloat16",
            "sdpa",
            27.0,
            True,
            "MedGemma 27B 純文字指令微調版（可輸出思考過程 <unused94>thought…<unused95>）",
            _LM_27B,
            presets=(
                "configs/medgemma-27b-24gb.yaml",
                "configs/medgemma-27b-80gb.yaml",
                "configs/medgemma-27b-141gb.yaml",
            ),
            released="2025-05-20",
            recommended=True,
        ),
        ModelProfile(
            "medgemma-27b-it",
            "google/medgemma-27b-it",
            "Gemma3ForConditionalGeneration",
            True,
            "bfloat16",
            "sdpa",
            27.4,
            True,
            "MedGemma 27B 多模態指令微調版（本課程只用文字部分）",
            replace(_LM_27B, name="medgemma-27b-it", vision_params=SIGLIP_VISION_PARAMS),
            released="2025-07-09",
        ),
    ]
}

# Benchmark and reference-measurement names: "27b" = the 27B text model, "4b" = the 4B language model
# (the benchmark adds a bf16 stand-in for its vision tower, EXTRA_FROZEN_PARAMS), "tiny" = a plumbing-size model.
BENCH_ARCHITECTURES: dict[str, Architecture] = {
    "27b": replace(_LM_27B, name="27b"),
    "4b": replace(_LM_4B, name="4b"),
    "tiny": Architecture(
        "tiny",
        64,
        2,
        128,
        4,
        2,
        16,
        4096,
        sliding_window=32,
        max_position_embeddings=4096,
        layer_types=("sliding_attention", "full_attention"),
    ),
}
BENCH_EXTRA_FROZEN_PARAMS = {"27b": 0, "4b": SIGLIP_VISION_PARAMS, "tiny": 0}
BENCH_ALIASES = {"medgemma-27b-text-it": "27b", "medgemma-27b-it": "27b", "medgemma-4b-it": "4b", "demo": "tiny"}
BENCH_ALIASES["medgemma-1.5-4b-it"] = "4b"  # 1.5 has the language model and tower shape of 1.0

# Ids that people (and the original guide) try but that do not exist on the Hub.
WRONG_IDS = {
    "google/medgemma-4b-multimodal": "google/medgemma-4b-it",
    "google/medgemma-27b-text": "google/medgemma-27b-text-it",
    "google/medgemma-27b": "google/medgemma-27b-text-it",
    "google/medgemma-4b": "google/medgemma-4b-it",
    "google/medgemma-27b-multimodal": "google/medgemma-27b-it",
    "google/medgemma-1.5-4b": "google/medgemma-1.5-4b-it",
    "google/medgemma-4b-1.5-it": "google/medgemma-1.5-4b-it",
    "google/medgemma-1.5-4b-multimodal": "google/medgemma-1.5-4b-it",
}


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "0").split(".")[:2]:
        digits = "".join(ch for ch in piece.split("+")[0] if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def multimodal_transformers_problem(version: str | None) -> str | None:
    """A Chinese sentence when ``version`` of transformers is too old to train multimodal Gemma 3 on text, else None."""
    if version is not None and _version_tuple(version) >= MIN_TRANSFORMERS_MULTIMODAL:
        return None
    need = ".".join(map(str, MIN_TRANSFORMERS_MULTIMODAL))
    return (
        f"transformers {version or '（未安裝）'} 太舊：多模態 Gemma 3（Gemma3ForConditionalGeneration，"
        f"medgemma-1.5-4b-it、medgemma-4b-it、medgemma-27b-it）只用文字訓練時需要 {need} 以上"
        "（token_type_ids 的修正）；舊版會算錯注意力遮罩或拒絕訓練。請執行 pip install -r requirements.txt。"
    )


def architecture(name: str) -> Architecture | None:
    """The architecture of a profile or a benchmark name, or None when unknown."""
    if name in PROFILES:
        return PROFILES[name].architecture
    return BENCH_ARCHITECTURES.get(name)


def profile_for_hub_id(hub_id: str) -> ModelProfile | None:
    return next((p for p in PROFILES.values() if p.hub_id == hub_id), None)


# ----------------------------------------------------------------------------------------------
# Where a model comes from: one check, used by `config check`, `train` (before anything is created)
# and by loading (``models.resolve_profile``), so that "check passed" means loading will find the model.

DEMO_FOLDER_NAME = "gemma3-270m-demo"  # the demo's converted folder in the cache (``models.demo_model_dir``)


def local_profile(folder: Path) -> ModelProfile:
    """The profile of a local Hugging Face model folder, after checking it can be loaded as it is.

    ``config.json`` must exist and be a JSON object (it decides the class: a ``vision_config`` or
    ``Gemma3ForConditionalGeneration`` means the multimodal model); the safetensors weights must be
    present and whole (:func:`medgemma_lib.core.weightfiles.model_shards`: headers and sizes only).
    """
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelError(
            f"資料夾 {folder} 不是 Hugging Face 模型資料夾（找不到 config.json）。",
            hint="請指向含有 config.json 與 *.safetensors 的資料夾，或使用設定檔名稱，例如 demo。",
        )
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"無法讀取模型設定 {cfg_file}：{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}",
            hint="檔案可能損毀，請重新下載或重新匯出模型。",
        ) from None
    if not isinstance(cfg, dict):
        raise ModelError(
            f"無法讀取模型設定 {cfg_file}：它不是 JSON 物件。", hint="檔案可能損毀，請重新下載或重新匯出模型。"
        )
    model_shards(folder)
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else "Gemma3ForCausalLM"
    vision = arch == "Gemma3ForConditionalGeneration" or "vision_config" in cfg
    return ModelProfile(
        f"local:{folder.name}",
        None,
        "Gemma3ForConditionalGeneration" if vision else "Gemma3ForCausalLM",
        vision,
        "bfloat16",
        "sdpa",
        0.0,
        False,
        f"本機模型資料夾 {folder.name}",
    )


def model_source(name_or_path: str) -> tuple[ModelProfile, str | None]:
    """The profile and what to load (a Hub id or a folder; None for the demo, converted on first use), loading nothing.

    Accepts a profile name, the Hub id of a known profile, or a local folder (checked by :func:`local_profile`).
    Anything else is refused with a :class:`~medgemma_lib.core.errors.ModelError` saying what would work.
    """
    if name_or_path in PROFILES:
        profile = PROFILES[name_or_path]
        return profile, (None if profile.is_demo else profile.hub_id)
    known_id = profile_for_hub_id(name_or_path)
    if known_id is not None:
        return known_id, name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return local_profile(path), str(path)
    if name_or_path in WRONG_IDS:
        raise ModelError(
            f"模型 {name_or_path} 在 Hugging Face Hub 上不存在。", hint=f"請改用 {WRONG_IDS[name_or_path]}。"
        )
    raise ModelError(
        f"不認識的模型 {name_or_path!r}：它不是設定檔名稱，也不是存在的資料夾。",
        hint=f"可用的設定檔：{'、'.join(PROFILES)}；或提供本機模型資料夾路徑（含 config.json 與 *.safetensors）。",
    )


@dataclass(frozen=True)
class ResolvedModel:
    """A model named once and checked once: pass it on instead of the name, so nothing resolves it again.

    ``name`` is what the config says (profile name, Hub id or folder); ``source`` is the Hub id or folder that
    ``from_pretrained`` reads, or None for the demo until :func:`medgemma_lib.models.loading.resolve_model`
    has converted it. Loading functions accept it wherever they accept a name.
    """

    name: str
    profile: ModelProfile
    source: str | None


def resolve_source(model: str | ResolvedModel) -> ResolvedModel:
    """:func:`model_source` as a :class:`ResolvedModel`; one that is already resolved is returned as it is."""
    if isinstance(model, ResolvedModel):
        return model
    profile, source = model_source(model)
    return ResolvedModel(model, profile, source)


_HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def base_identity(name_or_path: str) -> str | None:
    """Which model ``name_or_path`` means, as a comparable name, or None when that cannot be told from the text.

    A profile name, a known Hub id, the demo's cache folder (on any machine), and a Hugging Face cache
    snapshot path all map to the profile name (or to the Hub id of a model the course does not know);
    any other Hub-id-shaped text is itself. A local folder elsewhere cannot be named: None.
    """
    text = str(name_or_path).strip().rstrip("/")
    if text in PROFILES:
        return text
    known = profile_for_hub_id(text)
    if known is not None:
        return known.name
    if Path(text).name == DEMO_FOLDER_NAME:
        return "demo"
    snapshot = _HUB_CACHE_SNAPSHOT.search(text + "/")
    if snapshot:
        hub_id = f"{snapshot.group(1)}/{snapshot.group(2)}"
        known = profile_for_hub_id(hub_id)
        return known.name if known else hub_id
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).exists():
        return text  # an id on the Hub
    return None


def folder_shape(folder: Path) -> tuple | None:
    """(hidden, layers, intermediate, heads, KV heads, head_dim) of a local model folder's language model, or None."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        text = cfg.get("text_config") or cfg
        return tuple(
            int(text[k])
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def architecture_shape(arch: Architecture) -> tuple:
    """The numbers of :func:`folder_shape`, for a known architecture."""
    return (arch.hidden, arch.layers, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim)
