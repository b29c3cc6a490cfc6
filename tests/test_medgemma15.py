"""MedGemma 1.5 4B and thinking output, end to end on tiny random models (no download).

* The 1.5 architecture (``Gemma3ForConditionalGeneration``: a Gemma 3 language model plus a SigLIP tower)
  goes through ``train`` (with the 1.5 preset file), ``evaluate``, ``chat`` and ``export``: the tower stays
  frozen and out of LoRA, and the exported model gives the logits of base + adapter.
* Thinking: a tiny model made to always reply ``<unused94>thought\\n…<unused95>answer`` (a known answer,
  set in its generation config) shows that the thought is folded away in chat, stored apart in
  ``eval.json`` and never scored.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
from _lora_runs import make_run
from conftest import save_tiny, tiny_multimodal_config
from train_helpers import ROOT, tiny_overrides

from medgemma_lib import MEDICAL_DISCLAIMER, cli
from medgemma_lib.core.profiles import PROFILES
from medgemma_lib.models import loading as models
from medgemma_lib.models.generation import THINKING_SYSTEM_PROMPT, build_prompt, generate_answers

PRESET = ROOT / "configs" / "medgemma-1.5-4b-8gb.yaml"
THOUGHT = "Sugar is high, so name the condition."
ANSWER = "Diabetes is a disease of high blood sugar."
REPLY = f"<unused94>thought\n{THOUGHT}<unused95>{ANSWER}<end_of_turn>"


def build_tiny_medgemma15(folder, tokenizer, seed: int = 0):
    """A tiny random ``Gemma3ForConditionalGeneration`` with the 1.5 layout (sliding/full layers, vision tower)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from medgemma_lib.models.loading import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID

    torch.manual_seed(seed)
    arch = PROFILES["medgemma-1.5-4b-it"].architecture
    assert arch.vision_params > 0 and arch.layers == 34  # the shape this stands in for
    cfg = tiny_multimodal_config(
        len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        pad_token_id=PAD_ID,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return save_tiny(Gemma3ForConditionalGeneration(cfg), folder, tokenizer)


def _vision_state(model) -> dict:
    return {
        n: p.detach().clone()
        for n, p in model.state_dict().items()
        if "vision_tower" in n or "multi_modal_projector" in n
    }


@pytest.fixture(scope="module")
def tiny15(tmp_path_factory, demo_tokenizer):
    return build_tiny_medgemma15(tmp_path_factory.mktemp("tiny-medgemma15") / "model", demo_tokenizer)


@pytest.fixture(scope="module")
def trained15(tiny15, tmp_path_factory):
    """``python -m medgemma_lib train --config configs/medgemma-1.5-4b-8gb.yaml`` on the tiny model, on the CPU."""
    out = tmp_path_factory.mktemp("runs15")
    overrides = tiny_overrides(tiny15, out, "tiny15", max_steps=4, eval_steps=2, save_steps=2)
    overrides += [
        "model.quantization=none",
        "train.use_liger_kernel=false",
        "train.gradient_checkpointing=false",
        "train.optim=adamw_torch",
        "train.report_to=[]",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.max_example_length=96",
        "eval.num_generate=2",
        "eval.max_new_tokens=4",
        "eval.max_eval_examples=4",
    ]
    assert cli.main(["train", "--config", str(PRESET), *overrides]) == 0
    return out / "tiny15"


def test_the_15_profile_and_a_local_folder_of_its_class_take_the_same_path(tiny15):
    profile, _ = models.resolve_profile(str(tiny15))
    p15 = PROFILES["medgemma-1.5-4b-it"]
    assert (profile.model_class, profile.has_vision_tower) == (p15.model_class, p15.has_vision_tower)
    assert profile.lora_target_modules() == p15.lora_target_modules()
    assert p15.hub_id == "google/medgemma-1.5-4b-it" and p15.gated
    assert p15.architecture == PROFILES["medgemma-4b-it"].architecture.__class__(
        **{**PROFILES["medgemma-4b-it"].architecture.__dict__, "name": "medgemma-1.5-4b-it"}
    )  # 1.5 keeps 1.0's shapes: 34 layers, 4 KV heads, head_dim 256


@pytest.mark.slow
def test_training_leaves_the_vision_tower_alone_and_adapts_only_the_language_model(trained15, tiny15):
    from safetensors import safe_open

    with safe_open(str(trained15 / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("language_model" in k for k in keys)
    # a random model cannot end an answer, so the stop token's row of the *language model's* embedding trains too
    rows = [k for k in keys if "lora_" not in k]
    assert rows == ["base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"]
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if "lora_" in k}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    summary = json.loads((trained15 / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 4


@pytest.mark.slow
def test_evaluate_chat_and_export_on_the_15_architecture(trained15, tiny15, tmp_path, monkeypatch, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    assert cli.main(["evaluate", "--run", str(trained15), "--num-generate", "2", "--no-chinese"]) == 0
    result = json.loads((trained15 / "eval.json").read_text(encoding="utf-8"))
    assert len(result["answers"]) == 2 and result["settings"]["thinking"] is False
    assert result["models"]["tuned"]["loss"] != result["models"]["base"]["loss"]  # the adapter is attached

    monkeypatch.setattr("sys.stdin", io.StringIO("What is glaucoma?\n"))
    capsys.readouterr()
    assert cli.main(["chat", "--run", str(trained15), "--greedy", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "答：" in out and out.count(MEDICAL_DISCLAIMER) == 2

    merged = tmp_path / "merged"
    assert cli.main(["export", "--run", str(trained15), "--output", str(merged), "--dtype", "float32"]) == 0
    tok = AutoTokenizer.from_pretrained(merged)
    exported = Gemma3ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    base = Gemma3ForConditionalGeneration.from_pretrained(tiny15, dtype=torch.float32)
    vision_before = _vision_state(base)
    with_adapter = PeftModel.from_pretrained(base, trained15 / "adapter").eval()
    ids = tok(build_prompt(tok, "What is glaucoma?"), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        a = exported(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        b = with_adapter(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        with with_adapter.disable_adapter():
            c = with_adapter(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (b - c).abs().max() > 1e-3  # and the adapter changed something, so the check has teeth
    vision_after = _vision_state(exported)
    assert vision_before.keys() == vision_after.keys() and vision_before
    worst = {k: float((vision_before[k] - vision_after[k].float()).abs().max()) for k in vision_before}
    assert not any(worst.values()), worst  # an fp32 export copies the tower bit for bit


# ----------------------------------------------------------------------------------------------
# Thinking output: a model that always thinks, with a known reply


def script_reply(folder, tokenizer) -> None:
    """Make the tiny model's own generation config reply :data:`REPLY` to any question, greedy or sampled.

    ``sequence_bias`` (a transformers logits processor read from ``generation_config.json``) adds +1000 to each
    next token of the reply after the three tokens before it, starting from the prompt's ``model\\n``. The random
    model's logits are about ±1, so the reply is certain; everything after that (``generate``, the streamer, the
    thought split, storing, scoring) is the product's own code.
    """
    from transformers import GenerationConfig

    head = tokenizer("<start_of_turn>model\n", add_special_tokens=False).input_ids
    reply = tokenizer(REPLY, add_special_tokens=False).input_ids
    assert reply[0] == 100 and 101 in reply and reply[-1] == 106  # <unused94> … <unused95> … <end_of_turn>
    seq = head + reply
    rules = [[seq[i - 3 : i + 1], 1000.0] for i in range(len(head), len(seq))]
    contexts = [tuple(r[0][:-1]) for r in rules]
    assert len(set(contexts)) == len(contexts)  # every step has its own context: one next token each
    config = GenerationConfig.from_pretrained(folder)
    config.sequence_bias = rules
    config.save_pretrained(folder)


CHAT_QUESTION = "What is diabetes?"


@pytest.fixture(scope="module")
def thinking_run(tmp_path_factory, tiny_model_dir, demo_tokenizer):
    """A run on a tiny model that replies :data:`REPLY` (thought, then answer) to every question."""
    folder = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model_dir, folder)
    script_reply(folder, demo_tokenizer)
    run = make_run(
        folder.parent / "run",
        str(folder),
        str(folder),
        "none",
        b_scale=0.0,  # the adapter changes nothing: base and tuned give the known reply
        thinking=True,
        max_eval_examples=2,
        num_generate=3,
        max_new_tokens=40,
        batch_size=4,
    )
    return run, folder


def test_the_model_really_writes_the_thought_first(thinking_run, demo_tokenizer):
    import torch
    from transformers import Gemma3ForCausalLM

    _, folder = thinking_run
    model = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = build_prompt(demo_tokenizer, CHAT_QUESTION, THINKING_SYSTEM_PROMPT)
    enc = demo_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    raw = model.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc.input_ids.shape[1] :].tolist()
    assert raw[0] == 100 and 101 in raw  # <unused94> … <unused95>: the raw output really holds a thought
    thoughts: list = []
    answers = generate_answers(
        model, demo_tokenizer, [CHAT_QUESTION], 40, system_prompt=THINKING_SYSTEM_PROMPT, thoughts=thoughts
    )
    assert answers == [ANSWER] and thoughts == [THOUGHT]


@pytest.mark.slow
def test_chat_folds_the_thought_away(thinking_run, monkeypatch, capsys):
    run, _ = thinking_run
    monkeypatch.setattr("sys.stdin", io.StringIO(CHAT_QUESTION + "\n"))
    capsys.readouterr()
    assert cli.main(["chat", "--run", str(run), "--greedy", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    answer_part = out.split("答：", 1)[1]
    answer, fold = answer_part.split("〔思考過程已摺疊", 1)
    assert answer.strip() == ANSWER  # the thought never streams as the answer
    assert fold.startswith(f"：{len(THOUGHT)} 個字元") and "評分與答案都不含這段〕" in fold
    assert "<unused9" not in out and "thought" not in answer
    assert fold.index("評分與答案都不含這段") < fold.index(MEDICAL_DISCLAIMER)


@pytest.mark.slow
def test_chat_answer_pieces_give_the_thought_to_a_sink(thinking_run):
    import torch
    from transformers import Gemma3ForCausalLM

    from medgemma_lib.evaluation.chat import answer_pieces
    from medgemma_lib.models.generation import fold_thought_html

    _, folder = thinking_run
    model = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = models.load_tokenizer(str(folder))
    sink: list = []
    pieces = list(
        answer_pieces(
            model,
            tok,
            CHAT_QUESTION,
            do_sample=False,
            max_new_tokens=40,
            thinking=True,
            thought_sink=sink,
            fold_thought=False,
        )
    )
    assert sink == [THOUGHT] and "".join(pieces) == f"{ANSWER}\n\n{MEDICAL_DISCLAIMER}"
    html = fold_thought_html(sink[0])
    assert html.startswith("<details><summary>") and "open" not in html.split(">")[0] and THOUGHT in html


@pytest.mark.slow
def test_evaluation_stores_the_thought_apart_and_scores_the_answer_only(thinking_run):
    from medgemma_lib.evaluation import evaluate as ev
    from medgemma_lib.evaluation import metrics

    run, _ = thinking_run
    result = ev.run_evaluation(run, num_chinese_samples=1, verbose=False)
    saved = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert saved["settings"]["thinking"] is True
    assert saved["settings"]["thinking_system_prompt"] == THINKING_SYSTEM_PROMPT
    rows = saved["answers"]
    assert rows and all(r["answers"]["tuned"] == ANSWER and r["thoughts"]["tuned"] == THOUGHT for r in rows)
    zh_rows = saved["chinese"]["answers"]
    assert zh_rows and all(r["answers"]["tuned"] == ANSWER and r["thoughts"]["tuned"] == THOUGHT for r in zh_rows)
    assert saved["settings"]["answers_with_thought"] == {
        "base": len(rows) + len(zh_rows),
        "tuned": len(rows) + len(zh_rows),
    }
    # the scores are those of the answer alone: recomputed here from the references
    refs = [r["reference"] for r in rows]
    alone = metrics.text_metrics([ANSWER] * len(rows), refs, chinese=False)
    with_thought = metrics.text_metrics([f"{THOUGHT} {ANSWER}"] * len(rows), refs, chinese=False)
    assert result["models"]["tuned"]["rougeL"] == pytest.approx(alone["rougeL"])
    assert alone["rougeL"] != pytest.approx(with_thought["rougeL"])
    md = (run / "eval.md").read_text(encoding="utf-8")
    assert "思考過程不計分" in md and "<details><summary>模型的思考過程" in md
    assert f"</details>\n\n{ANSWER}" in md and "<unused94>thought" not in md
