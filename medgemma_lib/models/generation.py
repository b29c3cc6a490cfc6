"""Answer generation: batched, streamed, and the "before fine-tuning" answers kept for notebook 06.

* Prompts use the tokenizer's Gemma 3 turn template (``<start_of_turn>user ... <end_of_turn>
  <start_of_turn>model``); a system prompt is folded into the first user turn, as Gemma does.
* Batches are padded on the **left**, so every prompt ends right where generation starts.
* Generation stops at ``<end_of_turn>`` (id 106) or ``<eos>`` (id 1).
* MedGemma 27B may "think" before answering when asked to (system prompt such as
  ``SYSTEM INSTRUCTION: think silently if needed.``): the thought is emitted between
  ``<unused94>`` (id 100, followed by the word ``thought``) and ``<unused95>`` (id 101), as
  described on the google/medgemma-27b-text-it model card. These tokens are *unused* specials,
  so ``skip_special_tokens`` would hide the markers but keep the thought text; we split by token id
  instead (:func:`split_thinking`), for any tokenizer that has both tokens. The answer is what lies
  outside the spans; the thought is kept apart (``thoughts=`` of :func:`generate_answers`, the
  ``thought_sink`` of :func:`stream_answer`) so that chat and notebooks can show it folded away and
  evaluation can store it without scoring it. A thought cut off by ``max_new_tokens`` (no closing
  marker) leaves no answer; several spans are joined in order.
* ``eval.thinking`` (default false) adds :data:`THINKING_SYSTEM_PROMPT` before the run's own system
  prompt for evaluation and chat (:func:`system_prompt_for`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TextIteratorStreamer

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.atomic import write_json
from medgemma_lib.core.errors import OutputError
from medgemma_lib.core.profiles import END_OF_TURN_ID, EOS_ID, PAD_ID
from medgemma_lib.evaluation.safety import present_answer

THOUGHT_START = "<unused94>"
THOUGHT_END = "<unused95>"
THOUGHT_WORD = "thought"  # the model writes <unused94>thought\n... : the word labels the span, it is not the thought
# Google's evaluation notebooks for medgemma-27b-text-it use exactly this system instruction to let it think.
THINKING_SYSTEM_PROMPT = "SYSTEM INSTRUCTION: think silently if needed."
THOUGHT_SUMMARY = "模型的思考過程（已摺疊，點一下展開；評分只看下面的答案）"

BEFORE_QUESTIONS = [
    "What are the symptoms of diabetes?",
    "How is high blood pressure treated?",
    "What causes heart disease?",
    "糖尿病的症狀是什麼?",
    "高血壓如何治療?",
    "心臟病的原因是什麼?",
]


def build_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def system_prompt_for(system_prompt: str | None, thinking: bool) -> str | None:
    """The system prompt for evaluation and chat: :data:`THINKING_SYSTEM_PROMPT` first when ``thinking`` is on."""
    if not thinking:
        return system_prompt
    return THINKING_SYSTEM_PROMPT + (f"\n\n{system_prompt}" if system_prompt else "")


def _thought_ids(tokenizer) -> tuple[int | None, int | None]:
    ids = tokenizer.convert_tokens_to_ids([THOUGHT_START, THOUGHT_END])
    unk = tokenizer.unk_token_id
    start, end = (None if i == unk or i is None else i for i in ids)
    if start is None or end is None:  # a tokenizer without both markers cannot think: nothing to split
        return None, None
    return start, end


@dataclass
class ThinkingSplit:
    """Generated ids split into the answer (outside the spans) and the thought (inside), in order."""

    answer_ids: list[int]
    thought_ids: list[list[int]]  # one list per span
    closed: bool  # False when the last span had no <unused95> (cut by max_new_tokens)

    @property
    def has_thought(self) -> bool:
        return bool(self.thought_ids)


def split_thinking(token_ids: list[int], tokenizer) -> ThinkingSplit:
    """Split generated ids at ``<unused94>…<unused95>`` spans (several, or an unclosed trailing one)."""
    start, end = _thought_ids(tokenizer)
    answer: list[int] = []
    spans: list[list[int]] = []
    inside = False
    for t in token_ids:
        if start is not None and t == start:
            inside = True
            spans.append([])
        elif t == end and inside:
            inside = False
        elif inside:
            spans[-1].append(t)
        else:
            answer.append(t)
    return ThinkingSplit(answer, spans, closed=not inside)


def strip_thinking(token_ids: list[int], tokenizer) -> list[int]:
    """Remove ``<unused94>…<unused95>`` spans (and an unclosed trailing one) from generated ids."""
    return split_thinking(token_ids, tokenizer).answer_ids


def thought_text(split: ThinkingSplit, tokenizer) -> str | None:
    """The thought as text (spans joined by a blank line, the leading word ``thought`` removed), or None."""
    if not split.has_thought:
        return None
    parts = []
    for ids in split.thought_ids:
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text.startswith(THOUGHT_WORD):
            text = text[len(THOUGHT_WORD) :].strip()
        parts.append(text)
    return "\n\n".join(parts)


def decode_with_thought(tokenizer, ids: list[int]) -> tuple[str, str | None]:
    """``(answer, thought)`` of generated ids: the answer is what is shown and scored; the thought is kept apart."""
    split = split_thinking(ids, tokenizer)
    return tokenizer.decode(split.answer_ids, skip_special_tokens=True).strip(), thought_text(split, tokenizer)


def fold_thought_markdown(answer: str, thought: str | None) -> str:
    """Markdown (HTML ``<details>``) that shows the thought folded away above the answer (notebooks, eval.md)."""
    if not thought:
        return answer
    body = display.clip(thought, 2000, markdown=True)
    return f"<details><summary>{THOUGHT_SUMMARY}</summary>\n\n{body}\n\n</details>\n\n{answer}"


def fold_thought_html(thought: str | None) -> str:
    """HTML for a widget: the thought folded in a ``<details>`` (closed), escaped, clipped; empty without one."""
    import html

    if not thought:
        return ""
    body = html.escape(display.clip(thought, 4000))
    return (
        f"<details><summary>{THOUGHT_SUMMARY}</summary>"
        f"<div style='white-space:pre-wrap;color:#555'>{body}</div></details>"
    )


def fold_thought_text(thought: str | None, width: int = 40) -> str:
    """The terminal's fallback: one line saying there was a thought, its size and how it starts."""
    if not thought:
        return ""
    flat = " ".join(thought.split())
    head = flat[:width] + ("…" if len(flat) > width else "")
    return f"〔思考過程已摺疊：{len(flat)} 個字元，開頭「{head}」；評分與答案都不含這段〕"


def _stop_ids(model) -> list[int]:
    ids = {EOS_ID, END_OF_TURN_ID}
    gc = getattr(model, "generation_config", None)
    extra = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(ids)


def _generate_kwargs(model, tokenizer, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> dict:
    kw = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": _stop_ids(model),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID,
        "do_sample": do_sample,
    }
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # silence "generation flags are not valid" warnings from checkpoints that ship sampling defaults
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _length(ids: list[int], stop_ids) -> dict:
    stops = set(stop_ids if isinstance(stop_ids, (list, tuple, set)) else [stop_ids])
    for i, token in enumerate(ids):
        if token in stops:
            return {"tokens": i + 1, "stopped": True}
    return {"tokens": len(ids), "stopped": False}


def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    batch_size: int = 4,
    system_prompt: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    lengths: list | None = None,
    thoughts: list | None = None,
) -> list[str]:
    """Answer each question (greedy by default); returns plain answers (thoughts removed) in the same order.

    ``thoughts``: a list that receives, per answer, its thought text (:func:`decode_with_thought`) or None.

    ``lengths``: a list that receives, per answer, ``{"tokens": n, "stopped": bool}``: the tokens
    generated up to and including the first stop token, and whether one came before the limit
    (``stopped=False`` means ``max_new_tokens`` cut the answer).
    """

    if not questions:
        return []
    device = model.device
    kwargs = _generate_kwargs(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    answers: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(questions), max(1, batch_size)):
            chunk = questions[i : i + batch_size]
            prompts = [build_prompt(tokenizer, q, system_prompt) for q in chunk]
            # The template already starts with <bos>: do not add a second one.
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            decoded = [decode_with_thought(tokenizer, row.tolist()) for row in new]
            answers += [a for a, _ in decoded]
            if thoughts is not None:
                thoughts += [t for _, t in decoded]
            if lengths is not None:
                lengths += [_length(row.tolist(), kwargs["eos_token_id"]) for row in new]
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return answers


def stream_answer(
    model,
    tokenizer,
    question: str,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    system_prompt: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    thought_sink: list | None = None,
) -> Iterator[str]:
    """Yield the answer in pieces as it is generated (for chat UIs); thinking spans are held back.

    The pieces joined equal :func:`generate_answers`' answer for the same greedy settings. ``thought_sink``
    receives the thought text (or None) once generation has finished.
    """

    device = model.device
    prompt = build_prompt(tokenizer, question, system_prompt)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = ThoughtFilteringStreamer(tokenizer)
    kwargs = _generate_kwargs(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    error: list[BaseException] = []

    def _run():
        try:
            with torch.inference_mode():
                model.generate(**enc, **kwargs, streamer=streamer)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            error.append(exc)
            streamer.end()

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    held, started = "", False
    for piece in streamer:
        held += piece
        if not started:
            held = held.lstrip()
        ready = held.rstrip()  # trailing spaces wait: they may be the end of the answer
        if ready:
            started = True
            yield ready
            held = held[len(ready) :]
    thread.join(timeout=60)
    if error:
        raise error[0]
    if thought_sink is not None:
        thought_sink.append(streamer.thought())


class ThoughtFilteringStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that drops ``<unused94>…<unused95>`` token spans before decoding."""

    def __init__(self, tokenizer, timeout: float = 600):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
        self.start_id, self.end_id = _thought_ids(tokenizer)
        self.inside = False
        self.thought_ids: list[list[int]] = []

    def thought(self) -> str | None:
        """The thought seen so far, as :func:`thought_text` gives it (None when there was none)."""
        return thought_text(ThinkingSplit([], self.thought_ids, not self.inside), self.tokenizer)

    def put(self, value):
        if self.skip_prompt and self.next_tokens_are_prompt:
            return super().put(value)
        keep = []
        for t in value.reshape(-1).tolist():
            if self.start_id is not None and t == self.start_id:
                self.inside = True
                self.thought_ids.append([])
            elif self.end_id is not None and t == self.end_id and self.inside:
                self.inside = False
            elif self.inside:
                self.thought_ids[-1].append(t)
            else:
                keep.append(t)
        if keep:
            super().put(torch.tensor(keep))


# ----------------------------------------------------------------------------------------------
# "Before fine-tuning" answers


def show_answers(questions: list[str], answers: list[str], note: str | None = None) -> str:
    """Questions and answers as one block of text under one medical disclaimer.

    Each answer goes through the safety helper (an emergency message first when the question describes one)
    and :func:`medgemma_lib.core.display.collapse_repeats` (a degenerate answer shows 「BOTTOMS……（重複 14 次）」
    instead of a wall of text). ``note`` is shown under the disclaimer, e.g. that a small model errs.
    """
    blocks = []
    for q, a in zip(questions, answers):
        shown = present_answer(q, display.collapse_repeats((a or "").strip()), disclaimer=False)
        blocks.append(f"問：{q}\n答：{shown or '（空白）'}")
    head = MEDICAL_DISCLAIMER + (f"\n{note}" if note else "")
    return head + "\n\n" + ("\n\n" + "─" * 40 + "\n\n").join(blocks)


def default_results_dir() -> Path:
    """``results/`` of the project (also when called from ``notebooks/``)."""
    here = Path.cwd()
    for cand in (here / "results", here.parent / "results"):
        if cand.is_dir():
            return cand
    return here / "results"


def save_before_answers(
    model,
    tokenizer,
    profile: str,
    questions: list[str] | None = None,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 3,
    system_prompt: str | None = None,
) -> Path:
    """Generate answers before fine-tuning and write ``results/before_answers_<profile>.json``."""
    questions = list(questions or BEFORE_QUESTIONS)
    started = time.time()
    answers = generate_answers(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt
    )
    folder = Path(out_dir) if out_dir else default_results_dir()
    safe_profile = profile.replace("/", "_").replace(":", "_")
    path = folder / f"before_answers_{safe_profile}.json"
    record = {
        "profile": profile,
        "stage": "before_finetuning",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False, "system_prompt": system_prompt},
        "seconds": round(time.time() - started, 1),
        "disclaimer": MEDICAL_DISCLAIMER,
        "answers": [{"question": q, "answer": a} for q, a in zip(questions, answers)],
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, record, indent=2)
    except OSError as exc:
        raise OutputError(
            f"無法寫入 {path}：{exc.strerror or exc}", hint="請確認 results/ 資料夾可寫入，或以 out_dir 指定其他位置。"
        ) from None
    return path


def load_before_answers(profile: str, folder: str | Path | None = None) -> dict:
    """Read what :func:`save_before_answers` wrote (for notebook 06)."""
    safe_profile = profile.replace("/", "_").replace(":", "_")
    path = Path(folder or default_results_dir()) / f"before_answers_{safe_profile}.json"
    if not path.is_file():
        raise OutputError(
            f"找不到微調前的答案 {path.name}。", hint="請先執行 notebook 04（或 generation.save_before_answers）。"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def show_saved_answers(saved: dict, start: int = 0, note: str | None = None) -> str:
    """:func:`show_answers` of what :func:`load_before_answers` read, from answer number ``start`` on (0-based)."""
    rows = saved["answers"][start:]
    return show_answers([row["question"] for row in rows], [row["answer"] for row in rows], note=note)
