"""Turn cleaned rows into TRL conversational prompt/completion records, with optional OpenCC.

A record looks like::

    {"prompt": [{"role": "system", "content": ...}?, {"role": "user", "content": question}],
     "completion": [{"role": "assistant", "content": answer}],
     "source": ..., "focus_area": ..., "qtype": ..., "id": ...}

The tokenizer's chat template (Gemma 3 turns) is applied by TRL at training time, so the prompt
is masked and the answer plus ``<end_of_turn>`` are trained (see :mod:`medgemma_lib.data.masking`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import opencc

from medgemma_lib.core.errors import DataError

CONVERSIONS = ("s2t", "s2tw", "s2twp", "t2s", "tw2s")
# Columns TRL reads itself; an input column with one of these names would confuse it.
_RESERVED = {
    "prompt",
    "completion",
    "messages",
    "text",
    "input_ids",
    "labels",
    "attention_mask",
    "completion_mask",
    "assistant_masks",
    "id",
    "question",
    "answer",
}


@lru_cache(maxsize=8)
def _opencc(config: str):
    return opencc.OpenCC(config)


def chinese_converter(config: str | None):
    """A ``str -> str`` OpenCC converter for ``config`` (e.g. ``s2twp``), or None."""
    if not config:
        return None
    if config not in CONVERSIONS:
        raise DataError(
            f"不支援的繁簡轉換 {config!r}。",
            hint=f"可用：{'、'.join(CONVERSIONS)}（s2twp＝簡體轉台灣正體並轉換常用詞）。",
        )
    return _opencc(config).convert


def record_id(question: str, answer: str) -> str:
    """A stable id: the same pair always gets the same id, whatever the row order."""
    return hashlib.sha1(f"{question}\x1f{answer}".encode()).hexdigest()[:16]


def to_record(row: dict[str, str], system_prompt: str | None = None) -> dict:
    """One cleaned row as a conversational prompt/completion record."""
    prompt = []
    if system_prompt and system_prompt.strip():
        prompt.append({"role": "system", "content": system_prompt.strip()})
    prompt.append({"role": "user", "content": row["question"]})
    record = {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": row["answer"]}],
        "source": row.get("source", ""),
        "focus_area": row.get("focus_area", ""),
        "qtype": row.get("qtype", ""),
        "id": record_id(row["question"], row["answer"]),
    }
    for key, value in row.items():
        if key not in record and key not in _RESERVED:
            record[key] = value
    return record


def question_of(record: dict) -> str:
    return record["prompt"][-1]["content"]


def answer_of(record: dict) -> str:
    return record["completion"][0]["content"]


RECORD_KEYS = ("prompt", "completion", "source", "focus_area", "qtype", "id")


def format_record(record: dict, limit: int = 900, keys: tuple[str, ...] = RECORD_KEYS) -> str:
    """A record's ``keys`` as indented JSON (Chinese as written), cut at ``limit`` characters with 「 …」."""
    import json

    text = json.dumps({k: record[k] for k in keys if k in record}, ensure_ascii=False, indent=1)
    return text if len(text) <= limit else text[:limit] + " …"


def find_record(records, **fields) -> dict | None:
    """The first record whose ``fields`` all equal the given values, or None.

    ``records``: a list of records (or rows), or a mapping of split name to records, searched split after split.
    """
    groups = records.values() if isinstance(records, dict) else [records]
    for group in groups:
        for record in group:
            if all(record.get(key) == value for key, value in fields.items()):
                return record
    return None
