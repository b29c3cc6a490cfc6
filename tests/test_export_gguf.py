"""GGUF export (issue 36): the demo's fine-tuned model as one GGUF file reads back like the merged model, carries
the same metadata as llama.cpp's own converter wrote into the demo's original GGUF, stops at ``<end_of_turn>``, and
bad input is refused in Chinese before anything is written.

The fine-tuned model is the shipped reference adapter (``adapters/medquad-full-gemma3-270m``: a real MedQuAD run on
the demo model), so the held-out questions and greedy answers are meaningful. One f16 export and one load of it are
shared by every slow test (module-scoped fixtures).
"""

from __future__ import annotations

import os

import pytest
from _lora_runs import make_run
from cli_helpers import run_cli_here

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core.errors import EXIT_USER_ERROR
from medgemma_lib.export import gguf as g

# Logits of the f16 file against the merged float32 model: f16 keeps 11 significant bits, so each weight moves by
# up to 2^-11 of itself; measured 0.022 on logits of magnitude ~23 (4 held-out prompts, 2026-12-06).
MAX_LOGIT_DIFF_F16 = 0.1

# Keys of the demo's original GGUF (llama.cpp's converter) whose value differs in ours, and why.
DIFFERENT_VALUES = {
    "general.name": "ours names the fine-tuned run; the original names the upstream base model",
    "general.size_label": "ours is counted from the tensors (gguf.size_label: 268M); the original took the name's 270M",
    "general.tags": "ours adds medgemma-zh, lora and medical to the original tags (checked: a superset)",
    "general.file_type": "the quantisation: f16 (1) here, Q4_K_M (15) in the shipped file",
}
# Keys ours adds, and why.
ADDED_KEYS = {
    "general.finetune": "the run's name (model-card fact)",
    "general.description": "what the model is, with the medical disclaimer",
    "general.base_model.count": "the base model (model-card fact)",
    "general.base_model.0.name": "the base model (model-card fact)",
    "medgemma_zh.adapter_sha256": "which adapter was merged (traceability)",
    "tokenizer.chat_template": "Gemma's turn template, so LM Studio and llama.cpp's chat format it right",
    "tokenizer.ggml.eot_token_id": "<end_of_turn>: without it a runtime stops only at <eos> and never ends a turn",
}


@pytest.fixture(scope="module")
def fine_tuned(demo_model_dir):
    from medgemma_lib.checks.reference import REFERENCE_DIR
    from medgemma_lib.training.runs import open_run

    return open_run(REFERENCE_DIR)


@pytest.fixture(scope="module")
def f16_dir(tmp_path_factory, fine_tuned):
    return g.export_gguf(fine_tuned, "f16", tmp_path_factory.mktemp("gguf") / "gguf-f16", verbose=False)


@pytest.fixture(scope="module")
def reference_fields():
    with g.reference_gguf() as path:
        return g.read_gguf_header(path)


def _kind(entry):
    """A metadata value's GGUF type, with the element type of an array (numpy dtype, or str)."""
    vtype, value = entry
    if isinstance(value, list):
        return vtype, type(value[0]).__name__
    return vtype, getattr(value, "dtype", None)


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.fixture(scope="module")
def gguf_model(f16_dir):
    return g.load_gguf_model(f16_dir)


@pytest.fixture(scope="module")
def prompts():
    from medgemma_lib.checks.reference import load_heldout

    return [r["prompt"][0]["content"] for r in load_heldout()[:2]]


@pytest.mark.slow
def test_f16_reads_back_like_the_merged_model(fine_tuned, gguf_model, prompts, demo_tokenizer):
    """transformers' GGUF loader gives the merged model's logits (within f16 rounding) and its greedy answers.

    The merged model is PEFT's own ``merge_and_unload`` in float32: an independent merge, not the export's."""
    from medgemma_lib.export.merge import greedy_token_ids, load_merge_pair

    pair, _, _ = load_merge_pair(fine_tuned, "float32")
    merged = pair.merge_and_unload().eval()
    diff = max(
        (g._last_logits(gguf_model, demo_tokenizer, q) - g._last_logits(merged, demo_tokenizer, q)).abs().max().item()
        for q in prompts
    )
    assert diff < MAX_LOGIT_DIFF_F16, diff
    assert greedy_token_ids(gguf_model, demo_tokenizer, prompts, 24) == greedy_token_ids(
        merged, demo_tokenizer, prompts, 24
    )


@pytest.mark.slow
def test_same_metadata_and_tensors_as_llama_cpp_converter(f16_dir, reference_fields):
    ref, ref_tensors = reference_fields
    ours, our_tensors = g.read_gguf_header(f16_dir / g.GGUF_FILE)
    # Same names and shapes (the tied output layer left out, as llama.cpp does); the types are the quantisation.
    assert {k: dims for k, (dims, _) in our_tensors.items()} == {k: dims for k, (dims, _) in ref_tensors.items()}
    for key, entry in ref.items():
        assert key in ours, key
        assert _kind(ours[key]) == _kind(entry), key
        if key not in DIFFERENT_VALUES:  # architecture, tokenizer (tokens, scores, types, special ids)
            assert _plain(ours[key][1]) == _plain(entry[1]), key
    assert set(ref["general.tags"][1]) <= set(ours["general.tags"][1])
    assert set(ours) - set(ref) == set(ADDED_KEYS)
    assert MEDICAL_DISCLAIMER in ours["general.description"][1]


@pytest.mark.slow
def test_end_tokens_and_template_read_back_stop_generation(f16_dir, gguf_model, prompts, demo_tokenizer):
    from medgemma_lib.models.generation import build_prompt

    facts = g.gguf_facts(f16_dir)
    assert (facts["eos_token"], facts["eot_token"]) == ("<eos>", "<end_of_turn>")
    stops = sorted({facts["eos_token_id"], facts["eot_token_id"]})
    assert stops == g.stop_ids(f16_dir) == sorted(demo_tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"]))
    messages = [{"role": "user", "content": prompts[0]}]
    rendered = demo_tokenizer.apply_chat_template(
        messages, chat_template=facts["chat_template"], tokenize=False, add_generation_prompt=True
    )
    assert rendered == build_prompt(demo_tokenizer, prompts[0]) and rendered.endswith("<start_of_turn>model\n")
    enc = demo_tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    out = gguf_model.generate(**enc, max_new_tokens=200, do_sample=False, eos_token_id=stops, pad_token_id=0)
    answer = out[0, enc["input_ids"].shape[1] :].tolist()
    # It ends the turn with <end_of_turn>, not <eos>: a file whose only end token were <eos> would run on.
    assert answer[-1] == facts["eot_token_id"] and len(answer) < 200
    modelfile = (f16_dir / g.MODELFILE).read_text(encoding="utf-8")
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert MEDICAL_DISCLAIMER in modelfile and "<start_of_turn>model" in modelfile


@pytest.mark.slow
def test_llama_cpp_gives_the_same_greedy_answer(f16_dir, gguf_model, prompts, demo_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    from medgemma_lib.export.merge import greedy_token_ids
    from medgemma_lib.models.generation import build_prompt

    stops = g.stop_ids(f16_dir)
    llm = llama_cpp.Llama(model_path=str(f16_dir / g.GGUF_FILE), n_ctx=1024, n_threads=2, verbose=False)
    prompt = build_prompt(demo_tokenizer, prompts[0])
    want_prompt = demo_tokenizer(prompt, add_special_tokens=False).input_ids
    assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == want_prompt
    want = greedy_token_ids(gguf_model, demo_tokenizer, prompts[:1], 24)[0]
    got = []
    for token in llm.generate(want_prompt, top_k=1, temp=0.0, reset=True):
        if token in stops or len(got) == 24:
            break
        got.append(token)
    assert got == [t for t in want if t not in stops]


# ----------------------------------------------------------------------------------------------
# Quick tests: the vocabulary without tokenizer.model, quantised files, refusals


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return make_run(tmp_path_factory.mktemp("gguf-runs") / "tiny-run", str(tiny_model_dir), str(tiny_model_dir), "none")


@pytest.mark.slow
def test_tiny_q4_0_export_types_vocabulary_like_llama_cpp(tiny_run, tmp_path, reference_fields):
    """A base with only tokenizer.json: tokens and token types as llama.cpp's converter wrote them for the same
    vocabulary; scores in the same order (so the same merges); norms float32; the tied embedding at Q8_0."""
    import numpy as np

    out = g.export_gguf(tiny_run, "q4_0", tmp_path / "q4", verbose=False)
    assert sorted(p.name for p in out.iterdir()) == [g.MODELFILE, g.GGUF_FILE]
    fields, tensors = g.read_gguf_header(out / g.GGUF_FILE)
    ref = reference_fields[0]
    assert fields["tokenizer.ggml.tokens"][1] == ref["tokenizer.ggml.tokens"][1]
    assert (fields["tokenizer.ggml.token_type"][1] == ref["tokenizer.ggml.token_type"][1]).all()
    normal = ref["tokenizer.ggml.token_type"][1] == 1
    ours, theirs = fields["tokenizer.ggml.scores"][1][normal], ref["tokenizer.ggml.scores"][1][normal]
    assert (np.argsort(-ours, kind="stable") == np.argsort(-theirs, kind="stable")).all()
    types = {name: kind for name, (_, kind) in tensors.items()}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types
    assert g.stop_ids(out) == [1, 106]


def test_tensor_names_and_rope_of_the_medgemma_checkpoints():
    """Multimodal checkpoints (both transformers' key layouts) map to the text model; the vision tower and the tied
    head are left out; MedGemma's linear rope factor 8 is written."""
    from transformers import Gemma3TextConfig

    from medgemma_lib.core.profiles import PROFILES

    assert g.gguf_tensor_name("language_model.model.layers.3.self_attn.q_proj.weight", 34) == "blk.3.attn_q.weight"
    assert g.gguf_tensor_name("model.language_model.layers.3.mlp.down_proj.weight", 34) == "blk.3.ffn_down.weight"
    assert g.gguf_tensor_name("model.language_model.embed_tokens.weight", 34) == "token_embd.weight"
    assert g.gguf_tensor_name("model.layers.0.pre_feedforward_layernorm.weight", 18) == "blk.0.ffn_norm.weight"
    assert g.gguf_tensor_name("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", 34) is None
    assert g.gguf_tensor_name("model.multi_modal_projector.mm_input_projection_weight", 34) is None
    assert g.gguf_tensor_name("lm_head.weight", 34) is None
    config = Gemma3TextConfig(**PROFILES["medgemma-27b-text-it"].architecture.text_config_kwargs())
    assert g._rope_scaling(config) == 8.0 and g._rope_theta(config) == 1e6
    demo = Gemma3TextConfig(**PROFILES["demo"].architecture.text_config_kwargs())
    assert g._rope_scaling(demo) is None


def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("quant", ["q5_k", "F16", "int4"])
def test_unknown_quant_is_refused_before_anything(tmp_path, quant):
    code, out, err = run_cli_here("export", "--run", str(tmp_path), "--format", "gguf", "--quant", quant)
    assert code == EXIT_USER_ERROR and "不支援的 GGUF 量化方式" in out + err and "Traceback" not in out + err
    assert _listing(tmp_path) == []


def test_run_without_adapter_is_refused(tmp_path):
    run = tmp_path / "no-adapter"
    run.mkdir()
    code, out, err = run_cli_here("export", "--run", str(run), "--format", "gguf", "--quant", "f16")
    assert code == EXIT_USER_ERROR and "沒有 LoRA 轉接器" in out + err
    assert _listing(run) == []


@pytest.mark.slow  # needs a run on a real base folder (the tiny model): a few seconds
def test_not_enough_disk_space_is_refused_before_writing(tiny_run, monkeypatch):
    monkeypatch.setattr(g, "free_bytes", lambda folder: 1000)
    before = _listing(tiny_run)
    code, out, err = run_cli_here("export", "--run", str(tiny_run), "--format", "gguf", "--quant", "q8_0")
    assert code == EXIT_USER_ERROR and "磁碟空間不足" in out + err and "GB" in out + err
    assert _listing(tiny_run) == before


def test_quant_without_gguf_format_is_refused(tmp_path):
    code, out, err = run_cli_here("export", "--run", str(tmp_path), "--quant", "q8_0")
    assert code == EXIT_USER_ERROR and "--format gguf" in out + err
    code, out, err = run_cli_here("export", "--run", str(tmp_path), "--format", "onnx")
    assert code == EXIT_USER_ERROR and "不支援的匯出格式" in out + err
    assert _listing(tmp_path) == []
