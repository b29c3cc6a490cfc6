"""What TRL trains on: label_mask_example matches a real SFTTrainer, and property tests over text."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgemma_lib.data import decoded_labels, format_masking, label_mask_example, to_record, token_lengths
from medgemma_lib.models.loading import BOS_ID, END_OF_TURN_ID

RECORDS = [
    to_record(
        {
            "question": "What is (are) Glaucoma ?",
            "answer": "Glaucoma is a group of diseases.\nIt can damage the optic nerve.",
            "source": "NEI",
            "focus_area": "Glaucoma",
            "qtype": "information",
        }
    ),
    to_record(
        {
            "question": "糖尿病患者可以吃水果嗎？",
            "answer": "可以，但要注意份量 🍎，並選擇低升糖指數的水果。",
            "source": "zh",
            "focus_area": "糖尿病",
            "qtype": "",
        },
        system_prompt="你是一位謹慎的醫療衛教助理。",
    ),
    to_record(
        {
            "question": "Is hypertension inherited?",
            "answer": "Partly. 家族史 raises the risk.",
            "source": "x",
            "focus_area": "Hypertension",
            "qtype": "inheritance",
        }
    ),
]


@pytest.mark.slow
def test_matches_real_sft_trainer_labels(tiny_model_dir, demo_tokenizer, tmp_path):
    """The labels a real TRL SFTTrainer builds equal label_mask_example's, token for token."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=1024, dataset_num_proc=None)
    trainer = SFTTrainer(
        model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(RECORDS), processing_class=demo_tokenizer
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(RECORDS)
    for record, row in zip(RECORDS, prepared):
        ours = label_mask_example(demo_tokenizer, record, max_length=1024)
        assert row["input_ids"] == ours["input_ids"]
        assert row["labels"] == ours["labels"]


def test_masking_of_one_example(demo_tokenizer):
    ex = label_mask_example(demo_tokenizer, RECORDS[1])
    ids, trained = ex["input_ids"], ex["trained"]
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    assert not any(trained[: ex["prompt_tokens"]]) and all(trained[ex["prompt_tokens"] :])
    assert ids[-2] == END_OF_TURN_ID and trained[-2]  # the model learns to stop
    assert decoded_labels(demo_tokenizer, ex) == "可以，但要注意份量 🍎，並選擇低升糖指數的水果。<end_of_turn>\n"
    # The system prompt is part of the (masked) first user turn.
    prompt_text = demo_tokenizer.decode(ids[: ex["prompt_tokens"]])
    assert "你是一位謹慎的醫療衛教助理。\n\n糖尿病患者" in prompt_text and prompt_text.endswith(
        "<start_of_turn>model\n"
    )


def test_truncation_keeps_start_and_masking_display(demo_tokenizer):
    full = label_mask_example(demo_tokenizer, RECORDS[0])
    cut = label_mask_example(demo_tokenizer, RECORDS[0], max_length=full["prompt_tokens"] + 3)
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: full["prompt_tokens"] + 3]
    assert sum(cut["trained"]) == 3
    text = format_masking(demo_tokenizer, RECORDS[0])
    assert "⟦<bos>⟧" in text and "«<end_of_turn>»" in text and "<bos> 出現 1 次" in text


def test_batched_lengths_equal_trl_tokenization(demo_tokenizer):
    lengths = token_lengths(demo_tokenizer, RECORDS)
    for i, record in enumerate(RECORDS):
        ex = label_mask_example(demo_tokenizer, record)
        assert lengths["total"][i] == len(ex["input_ids"])
        assert lengths["prompt"][i] == ex["prompt_tokens"]


# Text a learner's data may hold: Chinese (both scripts), English, digits, punctuation, emoji, newlines.
_ALPHABET = st.sampled_from(
    list("糖尿病高血壓头痛醫師发烧咳嗽藥物治療的了是嗎？，。！、")
    + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?()-'\"")
    + ["😀", "🍎", "❤️", "👩‍⚕️", "\n", "  ", "½", "μg", "°C", "<", ">", "{", "}", "\t"]
)
_TEXT = st.lists(_ALPHABET, min_size=1, max_size=40).map("".join).filter(lambda s: s.strip() != "")


def _clean(text: str) -> str:
    from medgemma_lib.data.clean import normalize_answer, normalize_inline

    return normalize_inline(text), normalize_answer(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=_TEXT, answer=_TEXT, system=st.one_of(st.none(), _TEXT))
def test_labels_never_cover_the_prompt(demo_tokenizer, question, answer, system):
    q, _ = _clean(question)
    _, a = _clean(answer)
    record = to_record({"question": q, "answer": a}, system_prompt=system)
    ex = label_mask_example(demo_tokenizer, record)
    n = ex["prompt_tokens"]
    prompt_ids = demo_tokenizer.apply_chat_template(
        record["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert n == len(prompt_ids) and ex["input_ids"][:n] == list(prompt_ids)
    assert not any(ex["trained"][:n])
    assert ex["input_ids"].count(BOS_ID) == 1
    # Untruncated: the trained tokens decode to exactly the answer plus the end-of-turn marker.
    assert decoded_labels(demo_tokenizer, ex) == a + "<end_of_turn>\n"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=_TEXT, answer=_TEXT, limit=st.integers(min_value=8, max_value=60))
def test_truncated_examples_still_mask_the_prompt(demo_tokenizer, question, answer, limit):
    q, _ = _clean(question)
    _, a = _clean(answer)
    record = to_record({"question": q, "answer": a})
    full = label_mask_example(demo_tokenizer, record)
    ex = label_mask_example(demo_tokenizer, record, max_length=limit)
    assert len(ex["input_ids"]) == min(limit, len(full["input_ids"]))
    assert ex["labels"] == full["labels"][:limit]
    assert not any(ex["trained"][: full["prompt_tokens"]])
