"""The README's main command on the real demo model: exit 0, validation loss clearly lower, results in place,
and a Hugging Face token in the environment never reaches any file it wrote or anything it printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli
from test_no_secrets import FAKE_TOKEN, FAKE_TOKEN_CORE, files_containing, files_under

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_trains_real_model_and_lowers_heldout_loss(demo_model_dir, tmp_path):
    import os

    started = time.time()
    hf_home = tmp_path / "hf-home"  # anything the Hub libraries write goes here, and is scanned
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "HF_HOME": str(hf_home)}
    proc = run_cli("demo", f"train.output_dir={tmp_path}", env=env, timeout=1500, expect=0)
    run = tmp_path / "demo"
    summary = json.loads((run / "demo_summary.json").read_text())
    before, after = summary["validation_loss"]["before"], summary["validation_loss"]["after"]
    assert after < before * 0.9, (before, after)  # a clear drop, not noise
    # Known answers: 2.877 -> 2.074 on AVX2-only and AVX512-BF16 CPUs before the stop token's row was trained
    # (2026-11-29 / 2026-12-01); 2.877 -> 1.962 with it (AVX512-BF16, 2026-12-06).
    assert before == pytest.approx(2.877, abs=0.01) and after == pytest.approx(1.962, abs=0.03), (before, after)
    assert "gemv_4bit" not in proc.stderr  # torch's "no autograd kernel" warning: training must never go through it
    test = summary["test"]
    assert test["tuned"]["loss"] < test["base"]["loss"]
    # The answer a learner sees must be able to end: the pretrained base never produces <end_of_turn> after a
    # complete answer, the tuned model does (medgemma_lib.training.stopping; with lora.train_stop_token=never: 1.8e-4).
    check = json.loads((run / "stop_token.json").read_text())
    assert check["trained_token_ids"] == [106] and check["median"] < 1e-6, check
    assert test["base"]["stop_probability"] < 1e-6 and test["stop_examples"]["probability"] >= 12, test
    assert test["tuned"]["stop_probability"] >= 0.5, test
    assert "說完就停" in proc.stdout
    # What `chat --run results/demo` does with a MedQuAD-style question: the greedy answer ends by itself.
    question = "What are the symptoms of diabetes ?\n"
    chat = run_cli("chat", "--run", str(run), "--greedy", "--max-new-tokens", "128", env=env, stdin=question, expect=0)
    from medgemma_lib.models.generation import generate_answers
    from medgemma_lib.training.runs import load_for_inference

    model, tokenizer, _ = load_for_inference(run, verbose=False)
    lengths = []
    answer = generate_answers(model, tokenizer, ["What are the symptoms of diabetes ?"], 128, lengths=lengths)[0]
    assert lengths[0]["stopped"] and lengths[0]["tokens"] < 128, (lengths, answer)
    assert answer.strip() and answer.strip() in chat.stdout  # the chat shows that same greedy answer
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "config.yaml",
        "loss.png",
        "train_log.jsonl",
        "memory.json",
        "train_summary.json",
    ):
        assert (run / name).is_file(), name
    assert "驗證集 loss" in proc.stdout and "LoRA adapter" in proc.stdout and "醫療免責聲明" in proc.stdout

    # Secrets: nothing printed, and no file written by the run (run folder, TensorBoard events, saved config,
    # logs, evaluation report, anything under HF_HOME, the model cache, the repository) holds the token.
    assert FAKE_TOKEN_CORE not in proc.stdout + proc.stderr
    written = files_under(tmp_path) + files_under(
        demo_model_dir.parent, ROOT / "results", ROOT / "data", since=started - 1
    )
    names = {p.name for p in written}
    assert "config.yaml" in names and "train_log.jsonl" in names and "eval.md" in names
    assert any(n.startswith("events.out.tfevents") for n in names), "TensorBoard events were written and scanned"
    assert not files_containing(written), files_containing(written)
    print(f"demo: {before:.3f} -> {after:.3f}, {time.time() - started:.0f} s, {len(written)} files scanned")


def test_demo_summary_shows_an_example_after_the_disclaimer(capsys):
    from medgemma_lib import MEDICAL_DISCLAIMER
    from medgemma_lib.demo import _print_summary

    summary = {
        "validation_loss": {"before": 2.9, "after": 2.1},
        "steps": 20,
        "seconds_per_step": 4.6,
        "timings": {"total_s": 272},
        "adapter_dir": "results/demo/adapter",
        "run_dir": "results/demo",
        "test": {
            "base": {"loss": 3.4, "rougeL": 24.0, "chrf": 27.0},
            "tuned": {"loss": 2.2, "rougeL": 22.0, "chrf": 26.0},
            "example": {
                "question": "What is glaucoma?",
                "reference": "Glaucoma is a group of diseases " * 20,
                "base": "I do not know.",
                "tuned": "Glaucoma is an eye disease.",
            },
        },
    }
    _print_summary(summary)
    out = capsys.readouterr().out
    assert out.index(MEDICAL_DISCLAIMER) < out.index("What is glaucoma?") < out.index("Glaucoma is an eye disease.")
    assert "results/demo/eval.md" in out and "jupyter lab" in out and "chat --run results/demo" in out
    assert max(len(line) for line in out.splitlines()) < 260  # long references are shortened to one line


def test_terminal_log_lines_are_chinese():
    from medgemma_lib.training.trainer import format_log_line

    assert (
        format_log_line({"loss": 3.1234, "learning_rate": 5e-4, "grad_norm": 2.0}, 4, 20)
        == "第 4/20 步：訓練 loss 3.1234，學習率 5.00e-04"
    )
    assert format_log_line({"eval_loss": 2.5, "eval_runtime": 6.6}, 10, 20) == "第 10/20 步：驗證集 loss 2.5000"
    assert format_log_line({"train_runtime": 92.0, "train_loss": 2.3}, 20, 20) is None
