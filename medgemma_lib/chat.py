"""Interactive questions to a fine-tuned model: ``python -m medgemma_lib chat`` and the notebook box.

Both paths do the same thing for each question: the emergency check first
(:func:`medgemma_lib.safety.guard_question`; its message is shown before any model text), then
the answer streamed piece by piece (:func:`medgemma_lib.generation.stream_answer`), then the
medical disclaimer. The terminal version reads one question per line from standard input, so it
also works with a pipe (``printf '問題一\\n問題二\\n' | python -m medgemma_lib chat --run DIR``).

Sampling (temperature 0.7, top-p 0.95) is the default for chatting; ``--greedy`` gives the
reproducible answer that the evaluation scores.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.errors import ConfigError

EXIT_WORDS = {"exit", "quit", ":q", "離開", "結束", "退出"}


def load_chat_model(run_dir: str | Path | None = None, model_dir: str | Path | None = None, quantization: str | None = None, device: str | None = None, verbose: bool = True):
    """``(model, tokenizer)`` for chatting: a run folder (base + adapter) or an exported folder."""
    if (run_dir is None) == (model_dir is None):
        raise ConfigError("請指定 --run（訓練結果資料夾）或 --model（匯出的模型資料夾）其中一個。", hint="例如：python -m medgemma_lib chat --run results/demo-run")
    if run_dir is not None:
        from medgemma_lib.evaluate import load_for_evaluation

        model, tokenizer, _ = load_for_evaluation(run_dir, quantization=quantization, device=device, verbose=verbose)
        return model, tokenizer
    from medgemma_lib.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), quantization or "none", device)
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
) -> Iterator[str]:
    """Everything a UI shows for one question, in order: alert (if any), answer pieces, disclaimer.

    The concatenation equals :func:`medgemma_lib.safety.present_answer` for the same answer.
    """
    from medgemma_lib.generation import stream_answer
    from medgemma_lib.safety import guard_question

    alert = guard_question(question)
    if alert:
        yield alert + "\n\n"
    ctx = model.disable_adapter() if (not use_adapter and hasattr(model, "disable_adapter")) else _Null()
    with ctx:
        answered = False
        for piece in stream_answer(model, tokenizer, question, max_new_tokens=max_new_tokens, do_sample=do_sample, system_prompt=system_prompt, temperature=temperature, top_p=top_p):
            answered = True
            yield piece
    yield ("\n\n" if answered else "") + MEDICAL_DISCLAIMER


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
    disclaimer = w.HTML(f"<div style='border:1px solid #e0a800;background:#fff8e1;padding:8px;border-radius:4px'>{MEDICAL_DISCLAIMER}</div>", layout=w.Layout(width="32%"))

    def ask(text: str | None = None) -> str:
        text = (text if text is not None else question.value).strip()
        if not text:
            return ""
        question.value = text
        button.disabled = True
        answer.value = ""
        try:
            for piece in answer_pieces(model, tokenizer, text, max_new_tokens=max_new_tokens, do_sample=do_sample, use_adapter=adapter.value, **gen_kwargs):
                answer.value += piece
        finally:
            button.disabled = False
        return answer.value

    button.on_click(lambda _: ask())
    box = w.VBox([w.HBox([question, button]), adapter, w.HBox([w.VBox([answer], layout=w.Layout(width="66%")), disclaimer])])
    box.ask = ask
    return box


def register_cli(sub) -> None:
    p = sub.add_parser("chat", help="與微調後的模型對話（逐行讀取問題，串流顯示答案與醫療免責聲明）")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="訓練結果資料夾（基礎模型＋LoRA 轉接器），例如 results/demo-run")
    src.add_argument("--model", help="export 匯出的獨立模型資料夾")
    p.add_argument("--base", action="store_true", help="關閉 LoRA 轉接器，用基礎模型回答（比較用）")
    p.add_argument("--greedy", action="store_true", help="貪婪解碼（每次答案相同，與評估一致）；預設為取樣")
    p.add_argument("--temperature", type=float, default=0.7, help="取樣溫度（預設 0.7）")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p 取樣（預設 0.95）")
    p.add_argument("--max-new-tokens", type=int, default=256, help="每個答案最多幾個 token（預設 256）")
    p.add_argument("--quantization", choices=["nf4", "int8", "none"], default=None, help="基礎模型量化方式（預設：--run 與訓練相同；--model 不量化）")
    p.set_defaults(func=_cli_chat)


def _cli_chat(args) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens 必須是正整數（收到 {args.max_new_tokens}）。", hint="例如 --max-new-tokens 256")
    if not 0 < args.temperature <= 5:
        raise ConfigError(f"--temperature 必須在 0 到 5 之間（收到 {args.temperature}）。", hint="常用 0.7；要固定答案請改用 --greedy。")
    if args.base and args.model:
        raise ConfigError("--base 只能和 --run 一起用（匯出的模型已經合併了轉接器）。", hint="改用 --run 訓練結果資料夾。")
    model, tokenizer = load_chat_model(args.run, args.model, quantization=args.quantization, verbose=sys.stdin.isatty())
    n = chat_loop(
        model, tokenizer, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
        temperature=args.temperature, top_p=args.top_p, use_adapter=not args.base,
    )
    print(f"\n共回答 {n} 個問題。")
    return 0
