"""What TRL trains on: one record's tokens, each marked trained or masked.

:func:`label_mask_example` reproduces TRL 1.16 ``SFTTrainer``'s preparation of a conversational
prompt/completion record (``_prepare_dataset``: ``tokenize_fn`` -> ``build_labels`` -> ``truncate``)
by calling the same TRL helpers (``trl.data_utils._tokenize`` and ``common_prefix_length``): the
prompt rendered with the generation prompt is the masked prefix, everything after it (the answer,
``<end_of_turn>`` and the newline the template writes after it) is trained. A test checks this
against the labels a real ``SFTTrainer`` builds.
"""

from __future__ import annotations

import pandas as pd

from medgemma_lib.core import display

IGNORE_INDEX = -100


def label_mask_example(tokenizer, record: dict, max_length: int | None = None) -> dict:
    """Tokenize ``record`` exactly as SFTTrainer does; returns ids, labels and per-token flags.

    Keys: ``input_ids``, ``labels`` (-100 where masked), ``trained`` (bools), ``tokens`` (token
    strings), ``prompt_tokens`` (masked prefix length), ``truncated`` (cut by ``max_length``).
    """
    # TRL's helpers import its training stack (torch, transformers: 5 s on a laptop); `data prepare` and its
    # refusals of bad input do not need them, so they are imported only when a record is tokenised here.
    from trl.data_utils import _tokenize, common_prefix_length

    kwargs = {
        "chat_template": None,
        "tools": None,
    }  # SFTTrainer passes these (chat_template None unless assistant_only_loss)
    prompt_ids = list(_tokenize(tokenizer, record["prompt"], add_generation_prompt=True, **kwargs)["input_ids"])
    full_ids = list(_tokenize(tokenizer, record["prompt"] + record["completion"], **kwargs)["input_ids"])
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    labels = [IGNORE_INDEX] * prompt_len + full_ids[prompt_len:]
    truncated = max_length is not None and len(full_ids) > max_length
    if truncated:  # truncation_mode="keep_start", TRL's default
        full_ids, labels = full_ids[:max_length], labels[:max_length]
    return {
        "input_ids": full_ids,
        "labels": labels,
        "trained": [label != IGNORE_INDEX for label in labels],
        "tokens": tokenizer.convert_ids_to_tokens(full_ids),
        "prompt_tokens": prompt_len,
        "truncated": truncated,
    }


def decoded_labels(tokenizer, example: dict) -> str:
    """The text the model is trained to produce (labels only, special tokens kept)."""
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX], skip_special_tokens=False)


def _show(token: str) -> str:
    return token.replace("\n", "\\n").replace("▁", " ")


def format_masking(tokenizer, record: dict, max_length: int | None = None, width: int = 72) -> str:
    """A plain-text view: masked tokens in ⟦…⟧ (no loss), trained tokens in «…» (loss), with counts.

    Lines hold at most ``width`` display columns (a CJK character counts two; brackets may be drawn
    full-width), which fits a notebook's output area without running off its right edge.
    """
    ex = label_mask_example(tokenizer, record, max_length)
    pieces = [f"«{_show(t)}»" if trained else f"⟦{_show(t)}⟧" for t, trained in zip(ex["tokens"], ex["trained"])]
    lines = display.wrap_display(pieces, width=width)
    n_trained = sum(ex["trained"])
    bos = ex["input_ids"].count(tokenizer.bos_token_id)
    legend = (
        f"⟦…⟧ 遮蔽（不計入 loss）：{len(ex['tokens']) - n_trained} 個 token；"
        f"«…» 訓練（計入 loss）：{n_trained} 個 token；<bos> 出現 {bos} 次"
    )
    return legend + "\n" + "\n".join(lines)


def masking_table(tokenizer, record: dict, max_length: int | None = None):
    """A pandas table, one row per token: position, id, token, trained."""

    ex = label_mask_example(tokenizer, record, max_length)
    return pd.DataFrame(
        {
            "位置": range(len(ex["input_ids"])),
            "token id": ex["input_ids"],
            "token": [_show(t) for t in ex["tokens"]],
            "訓練": ["✔ 訓練" if t else "· 遮蔽" for t in ex["trained"]],
        }
    )
