"""Chat: questions piped line by line, streamed answers equal to the evaluated greedy answers, the
emergency message before any model text, the disclaimer after every answer, the notebook box."""

from __future__ import annotations

import io
import os

import pytest
from _lora_runs import make_run
from cli_helpers import run_cli

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core.errors import EXIT_USER_ERROR
from medgemma_lib.evaluation import chat

EMERGENCY = "我爸爸突然胸口劇痛、一直冒冷汗，怎麼辦？"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return make_run(tmp_path_factory.mktemp("chat-runs") / "tiny-run", str(tiny_model_dir), str(tiny_model_dir), "none")


@pytest.fixture(scope="module")
def tiny_pair(tiny_run):
    model, tok = chat.load_chat_model(tiny_run, verbose=False)
    return model, tok


@pytest.mark.slow
def test_piped_questions_each_get_answer_and_disclaimer(tiny_run):
    questions = ["What is glaucoma?", "", EMERGENCY, "離開", "this line is never read"]
    proc = run_cli(
        "chat",
        "--run",
        str(tiny_run),
        "--greedy",
        "--max-new-tokens",
        "5",
        stdin="\n".join(questions) + "\n",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count(MEDICAL_DISCLAIMER) == 3  # header + one per answered question
    assert "問：What is glaucoma?" in out and f"問：{EMERGENCY}" in out
    assert "this line is never read" not in out and "共回答 2 個問題" in out
    emergency_part = out.split(f"問：{EMERGENCY}")[1]
    assert emergency_part.index("119") < emergency_part.index(MEDICAL_DISCLAIMER)
    assert emergency_part.lstrip().startswith("答：🚑")  # the alert comes before any model text


@pytest.mark.slow
def test_greedy_stream_equals_evaluated_answer(tiny_pair):
    from medgemma_lib.evaluation.safety import present_answer
    from medgemma_lib.models.generation import generate_answers

    model, tok = tiny_pair
    q = "How is high blood pressure treated?"
    shown = "".join(chat.answer_pieces(model, tok, q, max_new_tokens=8, do_sample=False))
    evaluated = generate_answers(model, tok, [q], max_new_tokens=8)[0]
    assert shown == present_answer(q, evaluated)
    base_shown = "".join(chat.answer_pieces(model, tok, q, max_new_tokens=8, do_sample=False, use_adapter=False))
    with model.disable_adapter():
        assert base_shown == present_answer(q, generate_answers(model, tok, [q], max_new_tokens=8)[0])


def test_chat_loop_in_process(tiny_pair):
    model, tok = tiny_pair
    out = io.StringIO()
    n = chat.chat_loop(
        model, tok, stdin=io.StringIO("糖尿病的症狀是什麼?\nquit\n"), stdout=out, max_new_tokens=4, do_sample=True
    )
    assert n == 1 and out.getvalue().count(MEDICAL_DISCLAIMER) == 2


def test_question_box_streams_with_disclaimer(tiny_pair):
    model, tok = tiny_pair
    box = chat.question_box(model, tok, max_new_tokens=4, do_sample=False)
    text = box.ask("心臟病的原因是什麼?")
    assert text.endswith(MEDICAL_DISCLAIMER)
    html = [w for w in box.children[-1].children if hasattr(w, "value") and MEDICAL_DISCLAIMER in str(w.value)]
    assert html  # the disclaimer is also shown beside the answer
    assert box.ask("   ") == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["chat"], "參數錯誤"),
        (["chat", "--run", "results/__no_such_run__"], "找不到執行資料夾"),
        (["chat", "--run", "x", "--temperature", "0"], "--temperature"),
        (["chat", "--run", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["chat", "--model", "x", "--base"], "--base"),
    ],
)
def test_bad_arguments_exit_2(argv, message):
    proc = run_cli(*argv, stdin="", timeout=120)
    assert proc.returncode == EXIT_USER_ERROR
    assert message in proc.stderr and "Traceback" not in proc.stderr
