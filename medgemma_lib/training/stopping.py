"""Does the model end its answers? The turn-end token, measured, and trained where the base never learned it.

Every answer in the course's data ends with ``<end_of_turn>`` (then a newline): generation stops on that
token, and the labels train it (notebook 03 shows them). A *pretrained* Gemma 3 (the demo model) has
never produced it: its probability right after a complete answer is about 1e-14, its embedding row
(tied to the output layer) sits near the mean of all rows, and LoRA on the linear layers cannot move
that row. So a tuned model that learned MedQuAD's wording still never stops (measured on the shipped
adapter of 2026-12-02: 0 of 6 answers stopped, mean probability 5.4e-5).

* :func:`stop_probabilities`: the teacher-forced probability of ``<end_of_turn>`` right after each
  record's complete reference answer (one forward per record, one position of logits).
* :func:`check_stop_token`: measure a few validation answers *before training* and decide. When the
  base cannot produce the token (median below :data:`STOP_PROBABILITY_FLOOR`), the run also trains
  the stop token's row of the embedding (PEFT ``trainable_token_indices``; the tied output layer
  follows); when it can (an instruction-tuned MedGemma), nothing changes. ``lora.train_stop_token``
  forces either way.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from medgemma_lib.core.profiles import END_OF_TURN_ID
from medgemma_lib.data.masking import label_mask_example

# Median probability below which the base "cannot produce" the stop token: the pretrained demo gives ~1e-14,
# a model that learned the token gives 0.1-1 (the tuned demo: 0.9+); the gap is ten orders of magnitude.
STOP_PROBABILITY_FLOOR = 1e-3
CHECK_EXAMPLES = 8  # validation answers measured before training (a few seconds on a CPU)
MODES = ("auto", "always", "never")
# The rows trained: only the stop token. Training <start_of_turn> as well changed nothing measurable (demo, 20 steps:
# mean held-out stop probability 0.900 with both rows, 0.892 with this one; 6 of 6 greedy answers stopped either way).
STOP_TOKENS = ("<end_of_turn>",)


def end_position(labels: list[int]) -> int | None:
    """Index (in ``input_ids``) of the first trained ``<end_of_turn>``: the end of the answer; None when cut off."""
    for i, label in enumerate(labels):
        if label == END_OF_TURN_ID:
            return i
    return None


def stop_probabilities(model, tokenizer, records: list[dict], max_length: int | None = None) -> list[float | None]:
    """P(``<end_of_turn>`` | prompt + the whole reference answer) for each record (teacher forced).

    None for a record whose answer ``max_length`` cuts before its end (it has no end to measure).
    """
    out: list[float | None] = []
    device = model.device
    for rec in records:
        ex = label_mask_example(tokenizer, rec, max_length=max_length)
        pos = end_position(ex["labels"])
        if pos is None or pos == 0:
            out.append(None)
            continue
        inputs = torch.tensor([ex["input_ids"][:pos]], device=device)
        with torch.inference_mode():
            logits = model(input_ids=inputs, logits_to_keep=1).logits[0, -1].float()
        out.append(float(torch.softmax(logits, dim=-1)[END_OF_TURN_ID]))
    return out


def stop_probability_at_end(logits: torch.Tensor, targets: torch.Tensor) -> float | None:
    """The same probability from logits already computed for an answer's label positions (evaluation's loss pass).

    ``logits[i]`` predicts ``targets[i]``; the first ``<end_of_turn>`` target is the end of the answer.
    """
    hits = (targets == END_OF_TURN_ID).nonzero()
    if hits.numel() == 0:
        return None
    return float(torch.softmax(logits[int(hits[0, 0])].float(), dim=-1)[END_OF_TURN_ID])


def stop_token_ids(tokenizer) -> list[int]:
    """The ids of :data:`STOP_TOKENS` in this tokenizer (``<end_of_turn>`` is 106 in Gemma 3)."""
    ids = []
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    return ids


@dataclass
class StopTokenCheck:
    """What the check before training measured and decided (written to ``stop_token.json`` in the run folder)."""

    mode: str
    token: str = "<end_of_turn>"
    token_id: int = END_OF_TURN_ID
    examples: int = 0
    probabilities: list = field(default_factory=list)
    median: float | None = None
    mean: float | None = None
    floor: float = STOP_PROBABILITY_FLOOR
    base_can_stop: bool | None = None
    trained_token_ids: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StopTokenCheck:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def message(self) -> str:
        """One Chinese line for the training log."""
        if self.median is None:
            measured = "（沒有可量的驗證答案）"
        else:
            measured = f"：{self.examples} 筆驗證答案結尾的機率中位數 {self.median:.1e}"
        trained = (
            f"這次一併訓練 {'、'.join(STOP_TOKENS)} 的嵌入列（token {', '.join(map(str, self.trained_token_ids))}，"
            "與輸出層共用），讓模型學會說完就停。"
        )
        if self.mode == "never":
            return f"停止符號檢查{measured}；lora.train_stop_token=never，只訓練 LoRA。"
        if self.mode == "always":
            return f"停止符號檢查{measured}；lora.train_stop_token=always，{trained}"
        if self.base_can_stop:
            return f"停止符號檢查{measured}，基礎模型已經會產生 <end_of_turn>：只訓練 LoRA，不另外訓練停止符號。"
        return f"停止符號檢查{measured}（低於 {self.floor:g}），基礎模型還不會產生 <end_of_turn>；{trained}"


def check_stop_token(
    model, tokenizer, records: list[dict], mode: str = "auto", max_length: int | None = None
) -> StopTokenCheck:
    """Measure the base on up to :data:`CHECK_EXAMPLES` answers and decide which token rows to train.

    The forward runs in train mode: bitsandbytes repacks NF4 weights into an inference-only layout on an eval-mode
    pass on AVX512-BF16 CPUs (no backward afterwards), never on a train-mode one; Gemma 3 has no dropout to change.
    """
    was_training = model.training
    model.train()
    try:
        probs = stop_probabilities(model, tokenizer, records[:CHECK_EXAMPLES], max_length=max_length)
    finally:
        model.train(was_training)
    measured = [p for p in probs if p is not None]
    check = StopTokenCheck(mode=mode, examples=len(measured), probabilities=[round(p, 8) for p in measured])
    if measured:
        check.median = statistics.median(measured)
        check.mean = statistics.fmean(measured)
        check.base_can_stop = check.median >= STOP_PROBABILITY_FLOOR
    train = mode == "always" or (mode == "auto" and check.base_can_stop is False)
    check.trained_token_ids = stop_token_ids(tokenizer) if train else []
    return check


def trainable_token_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable embedding rows PEFT added (``trainable_tokens_delta``), by name."""
    return [(n, p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
