"""Generation plumbing on a tiny random Gemma 3 (real tokenizer), thinking-token removal, before answers."""

from __future__ import annotations

import json

import pytest

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.models import generation


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = Gemma3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tok


def test_prompt_uses_gemma_turns_and_folds_system_prompt(demo_tokenizer):
    p = generation.build_prompt(demo_tokenizer, "糖尿病的症狀是什麼?", system_prompt="請用繁體中文回答。")
    assert p.startswith("<bos><start_of_turn>user\n請用繁體中文回答。\n\n糖尿病的症狀是什麼?<end_of_turn>\n")
    assert p.endswith("<start_of_turn>model\n")


def test_strip_thinking_by_token_id(demo_tokenizer):
    tok = demo_tokenizer
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    start, end = tok.convert_tokens_to_ids(["<unused94>", "<unused95>"])
    assert (start, end) == (100, 101)
    ids = (
        [start] + enc("thought\nThe user asks about diabetes.") + [end] + enc("Common symptoms include thirst.") + [106]
    )
    text = tok.decode(generation.strip_thinking(ids, tok), skip_special_tokens=True)
    assert text == "Common symptoms include thirst."
    # a thought cut off by max_new_tokens is dropped whole
    assert generation.strip_thinking([start] + enc("thought\nstill thinking"), tok) == []


@pytest.mark.slow
def test_stop_tokens_include_end_of_turn_and_eos(tiny):
    model, tok = tiny
    kw = generation._generate_kwargs(model, tok, 8, False, 0.7, 0.95)
    assert {1, 106} <= set(kw["eos_token_id"])
    assert kw["pad_token_id"] == 0 and kw["do_sample"] is False


def test_batched_left_padding_matches_one_by_one(tiny):
    model, tok = tiny
    tok.padding_side = "right"
    questions = [
        "What is diabetes?",
        "高血壓如何治療?",
        "What are the long-term complications of untreated hypertension in adults?",
    ]
    batched = generation.generate_answers(model, tok, questions, max_new_tokens=8, batch_size=3)
    single = [generation.generate_answers(model, tok, [q], max_new_tokens=8, batch_size=1)[0] for q in questions]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)
    assert tok.padding_side == "right"  # restored for training


def test_stream_joins_to_the_generated_answer(tiny):
    model, tok = tiny
    q = "What causes heart disease?"
    streamed = "".join(generation.stream_answer(model, tok, q, max_new_tokens=12))
    assert streamed == generation.generate_answers(model, tok, [q], max_new_tokens=12)[0]


def test_stream_drops_thought_spans(demo_tokenizer):
    import torch

    tok = demo_tokenizer
    streamer = generation.ThoughtFilteringStreamer(tok)
    streamer.put(torch.tensor([[2, 105]]))  # the prompt, skipped
    for t in (
        [100]
        + tok("thought\nplanning", add_special_tokens=False).input_ids
        + [101]
        + tok("Drink water.", add_special_tokens=False).input_ids
    ):
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert "".join(streamer) == "Drink water."


def test_save_before_answers(tiny, tmp_path):
    model, tok = tiny
    path = generation.save_before_answers(model, tok, "tiny", out_dir=tmp_path, max_new_tokens=4)
    assert path.name == "before_answers_tiny.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    qs = [a["question"] for a in data["answers"]]
    for q in ("糖尿病的症狀是什麼?", "高血壓如何治療?", "心臟病的原因是什麼?"):
        assert q in qs
    assert any(q.isascii() for q in qs)
    assert data["disclaimer"] == MEDICAL_DISCLAIMER and data["stage"] == "before_finetuning"
    assert generation.load_before_answers("tiny", tmp_path)["answers"] == data["answers"]


def test_show_answers_always_carries_disclaimer():
    text = generation.show_answers(["糖尿病的症狀是什麼?"], ["口渴、多尿。"])
    assert MEDICAL_DISCLAIMER in text and "口渴" in text


def _fake_generate_output(tokenizer, text_after_prompt: str):
    return tokenizer(text_after_prompt, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    ("generated", "answer", "thought"),
    [
        (
            "<unused94>thought\nCheck sugar.<unused95>Diabetes raises blood sugar.<end_of_turn>",
            "Diabetes raises blood sugar.",
            "Check sugar.",
        ),
        ("Plain answer.<end_of_turn>", "Plain answer.", None),
        ("<unused94>thought\nStill thinking", "", "Still thinking"),
        ("<unused94>thought\nA<unused95>One. <unused94>thought\nB<unused95>Two.", "One. Two.", "A\n\nB"),
    ],
)
def test_thought_and_answer_are_split(demo_tokenizer, generated, answer, thought):
    from medgemma_lib.models.generation import decode_with_thought, fold_thought_markdown, fold_thought_text

    ids = _fake_generate_output(demo_tokenizer, generated)
    got_answer, got_thought = decode_with_thought(demo_tokenizer, ids)
    assert (got_answer, got_thought) == (answer, thought)
    shown = fold_thought_markdown(got_answer, got_thought)
    if thought:
        assert shown.startswith("<details><summary>模型的思考過程") and shown.endswith(answer)
        assert "<unused94>" not in shown and "思考過程已摺疊" in fold_thought_text(got_thought)
    else:
        assert shown == answer and fold_thought_text(got_thought) == ""


def test_generate_answers_stores_thought_apart_and_scores_the_answer_only(demo_tokenizer):
    """A fake model whose generate returns prompt + <unused94>thought…<unused95>answer, through the real pipeline."""
    import torch

    from medgemma_lib.evaluation.metrics import text_metrics
    from medgemma_lib.models.generation import THINKING_SYSTEM_PROMPT, generate_answers, system_prompt_for

    tail = _fake_generate_output(
        demo_tokenizer, "<unused94>thought\nLong reasoning words.<unused95>High blood sugar.<end_of_turn>"
    )

    class FakeModel(torch.nn.Module):
        device = torch.device("cpu")
        generation_config = None

        def generate(self, input_ids, attention_mask=None, **kw):
            self.prompt = demo_tokenizer.decode(input_ids[0])
            return torch.cat([input_ids, torch.tensor([tail] * input_ids.shape[0])], dim=1)

    model, thoughts = FakeModel(), []
    answers = generate_answers(
        model, demo_tokenizer, ["What is diabetes?"], system_prompt=system_prompt_for(None, True), thoughts=thoughts
    )
    assert answers == ["High blood sugar."] and thoughts == ["Long reasoning words."]
    assert THINKING_SYSTEM_PROMPT in model.prompt
    assert system_prompt_for("Be short.", False) == "Be short."
    ref = ["Diabetes means high blood sugar."]
    scored = text_metrics(answers, ref)
    assert scored["rougeL"] == text_metrics(["High blood sugar."], ref)["rougeL"]
    assert scored["rougeL"] != text_metrics(["Long reasoning words. High blood sugar."], ref)["rougeL"]


def test_show_saved_answers_from_a_start():
    saved = {"answers": [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(4)]}
    shown = generation.show_saved_answers(saved, start=2, note="小模型常常答錯。")
    assert shown.startswith(MEDICAL_DISCLAIMER + "\n小模型常常答錯。")
    assert "問：Q2?" in shown and "答：A3." in shown and "Q1?" not in shown
