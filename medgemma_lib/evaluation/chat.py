"""Interactive questions to a fine-tuned model: ``python -m medgemma_lib chat`` and the notebook box.

Both paths do the same thing for each question: the emergency check first
(:func:`medgemma_lib.evaluation.safety.guard_question`; its message is shown before any model text), then
the answer streamed piece by piece (:func:`medgemma_lib.models.generation.stream_answer`), then the
medical disclaimer. The terminal version reads one question per line from standard input, so it
also works with a pipe (``printf '問題一\\n問題二\\n' | python -m medgemma_lib chat --run DIR``).

Sampling (temperature 0.7, top-p 0.95) is the default for chatting; ``--greedy`` gives the
reproducible answer that the evaluation scores.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.errors import ConfigError
from medgemma_lib.evaluation.safety import guard_question
from medgemma_lib.models import loading as models
from medgemma_lib.models.generation import fold_thought_html, fold_thought_text, stream_answer, system_prompt_for
from medgemma_lib.training import runs

EXIT_WORDS = {"exit", "quit", ":q", "離開", "結束", "退出"}


def load_chat_model(
    run_dir: str | Path | runs.Run | None = None,
    model_dir: str | Path | None = None,
    quantization: str | None = None,
    device: str | None = None,
    verbose: bool = True,
):
    """``(model, tokenizer)`` for chatting: a run (base + adapter) or an exported folder.

    ``run_dir``: an opened :class:`~medgemma_lib.training.runs.Run` (nothing is read or verified again), or a
    run folder (opened here once).
    """
    if (run_dir is None) == (model_dir is None):
        raise ConfigError(
            "請指定 --run（訓練結果資料夾）或 --model（匯出的模型資料夾）其中一個。",
            hint="例如：python -m medgemma_lib chat --run results/demo-run",
        )
    if run_dir is not None:
        model, tokenizer, _ = runs.load_for_inference(
            run_dir, quantization=quantization, device=device, verbose=verbose
        )
        return model, tokenizer
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_model(str(model_dir), quantization or "none", device)
    model.eval()
    return model, tokenizer


def answer_pieces(
    model,
    tokenizer,
    question: str,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 0.95,
    system_prompt: str | None = None,
    use_adapter: bool = True,
    thinking: bool = False,
    thought_sink: list | None = None,
    fold_thought: bool = True,
) -> Iterator[str]:
    """Everything a UI shows for one question, in order: alert (if any), answer pieces, folded thought, disclaimer.

    Without a thought the concatenation equals :func:`~.safety.present_answer` for the same answer.
    ``thinking`` puts :data:`~medgemma_lib.models.generation.THINKING_SYSTEM_PROMPT` before ``system_prompt``. A thought
    (``<unused94>…<unused95>``) is never streamed as the answer: ``thought_sink`` receives it (or None), and
    ``fold_thought`` adds one line saying it was there (:func:`~medgemma_lib.models.generation.fold_thought_text`).
    """

    alert = guard_question(question)
    if alert:
        yield alert + "\n\n"
    ctx = (
        model.disable_adapter() if (not use_adapter and hasattr(model, "disable_adapter")) else contextlib.nullcontext()
    )
    sink: list = []
    with ctx:
        answered = False
        for piece in stream_answer(
            model,
            tokenizer,
            question,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            system_prompt=system_prompt_for(system_prompt, thinking),
            temperature=temperature,
            top_p=top_p,
            thought_sink=sink,
        ):
            answered = True
            yield piece
    thought = sink[0] if sink else None
    if thought_sink is not None:
        thought_sink.append(thought)
    if thought and fold_thought:
        yield ("\n" if answered else "") + fold_thought_text(thought)
        answered = True
    yield ("\n\n" if answered else "") + MEDICAL_DISCLAIMER


def chat_loop(model, tokenizer, stdin: TextIO | None = None, stdout: TextIO | None = None, **gen_kwargs) -> int:
    """Answer questions read line by line from ``stdin`` until EOF or an exit word; returns how many."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    stdout.write(f"{MEDICAL_DISCLAIMER}\n輸入問題後按 Enter；輸入「離開」或按 Ctrl+D 結束。\n")
    count = 0
    while True:
        if interactive:
            stdout.write("\n問：")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            break
        if not interactive:
            stdout.write(f"\n問：{question}\n")
        stdout.write("答：")
        for piece in answer_pieces(model, tokenizer, question, **gen_kwargs):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        count += 1
    return count


def question_box(model, tokenizer, max_new_tokens: int = 192, do_sample: bool = True, **gen_kwargs):
    """An ipywidgets question box: type a question, the answer streams in, the disclaimer beside it.

    Also returns an ``ask(question)`` function on the widget (``box.ask``) so a notebook cell can
    fill the box programmatically (and nbval can execute it).
    """
    import ipywidgets as w

    question = w.Text(placeholder="輸入醫療問題，例如：糖尿病的症狀是什麼？", layout=w.Layout(width="70%"))
    button = w.Button(description="提問", button_style="primary")
    adapter = w.ToggleButtons(options=[("微調後", True), ("基礎模型", False)], value=True, description="模型：")
    answer = w.Textarea(layout=w.Layout(width="100%", height="220px"), disabled=True)
    thought_view = w.HTML("")  # the thought, folded (<details>), when the model wrote one
    disclaimer = w.HTML(
        "<div style='border:1px solid #e0a800;background:#fff8e1;padding:8px;border-radius:4px'>"
        f"{MEDICAL_DISCLAIMER}</div>",
        layout=w.Layout(width="32%"),
    )

    def ask(text: str | None = None) -> str:
        text = (text if text is not None else question.value).strip()
        if not text:
            return ""
        question.value = text
        button.disabled = True
        answer.value = ""
        thought_view.value = ""
        thoughts: list = []
        try:
            for piece in answer_pieces(
                model,
                tokenizer,
                text,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_adapter=adapter.value,
                thought_sink=thoughts,
                fold_thought=False,
                **gen_kwargs,
            ):
                answer.value += piece
        finally:
            button.disabled = False
        if thoughts and thoughts[0]:
            thought_view.value = fold_thought_html(thoughts[0])
        return answer.value

    button.on_click(lambda _: ask())
    box = w.VBox(
        [
            w.HBox([question, button]),
            adapter,
            w.HBox([w.VBox([answer, thought_view], layout=w.Layout(width="66%")), disclaimer]),
        ]
    )
    box.ask = ask
    return display.with_fallback(
        box, "（提問框：在 JupyterLab 執行這一格即可顯示；輸入問題、按「提問」，答案會逐字出現，旁邊附醫療免責聲明。）"
    )
