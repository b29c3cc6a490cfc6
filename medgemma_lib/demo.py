"""``python -m medgemma_lib demo``: the whole course in one command, on a laptop CPU, offline.

Prepares the shipped MedQuAD sample, loads Gemma 3 270M in NF4 (real bitsandbytes), trains LoRA
with :func:`medgemma_lib.training.train.run_training` (the same function as notebook 05 and ``train``),
evaluates base vs fine-tuned on the held-out test split (``medgemma_lib.evaluation.evaluate``), and prints
where everything is. Settings: ``configs/demo.yaml`` (overrides on the command line win).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core.atomic import write_json
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import TrainingError
from medgemma_lib.core.paths import REPO_ROOT, display_path, resolve_path
from medgemma_lib.data import prepare_from_config
from medgemma_lib.evaluation import evaluate
from medgemma_lib.models.loading import ensure_demo_model, load_tokenizer
from medgemma_lib.training.runs import DEMO_SUMMARY_FILE, EVAL_MD
from medgemma_lib.training.train import run_training

DEMO_CONFIG = "configs/demo.yaml"


def demo_config_path() -> Path:
    """``configs/demo.yaml`` of the current folder, else of the repository this package sits in."""
    for base in (Path.cwd(), REPO_ROOT):
        if (base / DEMO_CONFIG).is_file():
            return base / DEMO_CONFIG
    raise TrainingError(
        f"找不到示範設定檔 {DEMO_CONFIG}。",
        hint="請在專案資料夾（含 configs/ 的那一層）執行 python -m medgemma_lib demo。",
    )


def load_demo_config(overrides: list[str] | None = None):
    """The demo config (its relative data path is found by :func:`~medgemma_lib.core.paths.resolve_path`)."""
    return load_config(demo_config_path(), overrides)


def run_demo(overrides: list[str] | None = None, evaluate: bool = True) -> dict:
    """Run the demo end to end; returns a summary dict (also written to ``demo_summary.json``)."""
    started = time.time()
    cfg = load_demo_config(overrides)
    if cfg.model.profile != "demo":
        raise TrainingError(
            "demo 指令只用示範模型（model.profile=demo）。",
            hint="訓練其他模型請用 python -m medgemma_lib train --config configs/<設定>.yaml。",
        )
    print("== 1/4 示範模型 ==", flush=True)
    t = time.time()
    ensure_demo_model(verbose=True)
    timings = {"model_cache_s": round(time.time() - t, 1)}
    print(f"示範模型就緒（{timings['model_cache_s']:.0f} 秒）。", flush=True)

    print("== 2/4 準備資料 ==", flush=True)
    t = time.time()
    tokenizer = load_tokenizer("demo")
    splits, report = prepare_from_config(cfg.data, output_dir=None, tokenizer=tokenizer)
    counts = {name: len(ds) for name, ds in splits.items()}
    timings["data_s"] = round(time.time() - t, 1)
    print(
        f"資料：{display_path(resolve_path(cfg.data.input))} → 訓練 {counts.get('train', 0)}、"
        f"驗證 {counts.get('validation', 0)}、測試 {counts.get('test', 0)} 筆"
        f"（答案 ≤ {cfg.data.max_answer_chars} 字元）。",
        flush=True,
    )

    print("== 3/4 QLoRA 訓練 ==", flush=True)
    result = run_training(cfg, datasets=splits, tokenizer=tokenizer, data_report=report)
    timings["train_total_s"] = round(time.time() - t - timings["data_s"], 1)
    if result.final_eval_loss is None or result.initial_eval_loss is None:
        raise TrainingError("示範訓練沒有得到驗證集 loss。", hint="請確認 data.validation_fraction 大於 0。")

    print("== 4/4 在測試集上比較微調前後 ==", flush=True)
    t = time.time()
    evaluation = _evaluate(result, tokenizer) if evaluate else None
    timings["evaluate_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - started, 1)
    summary = {
        "run_dir": display_path(result.run_dir),
        "adapter_dir": display_path(result.adapter_dir),
        "counts": counts,
        "validation_loss": {"before": result.initial_eval_loss, "after": result.final_eval_loss},
        "test": evaluation,
        "steps": result.global_step,
        "seconds_per_step": result.seconds_per_step,
        "tokens_per_second": result.tokens_per_second,
        "timings": timings,
    }
    write_json(Path(result.run_dir, DEMO_SUMMARY_FILE), summary)
    _print_summary(summary)
    return summary


def _evaluate(result, tokenizer) -> dict:
    """Base vs fine-tuned on the test split (``evaluate.run_evaluation``), in a few numbers."""
    model = result.trainer.model
    model.eval()
    out = evaluate.run_evaluation(result.run_dir, model=model, tokenizer=tokenizer, num_chinese_samples=2, verbose=True)
    scores = out.get("models", {})
    example = next((row for row in out.get("answers", []) if row.get("answers", {}).get("tuned")), None)
    summary = {
        name: {
            k: scores[name].get(k)
            for k in ("loss", "perplexity", "rougeL", "chrf", "bleu")
            if k in scores.get(name, {})
        }
        for name in ("base", "tuned")
        if name in scores
    }
    stop = (out.get("stopping") or {}).get("english") or {}
    for key in ("stop_probability", "stop_rate", "length_ratio_median"):
        for name in ("base", "tuned"):
            if name in summary and key in stop:
                summary[name][key] = stop[key].get(name)
    summary["stop_examples"] = {"probability": stop.get("n_probability"), "generated": stop.get("n_generated")}
    summary["max_new_tokens"] = out.get("settings", {}).get("max_new_tokens")
    summary["report"] = display_path(Path(result.run_dir) / EVAL_MD)
    if example:
        summary["example"] = {k: example.get(k) for k in ("question", "reference")} | {
            "base": example["answers"].get("base"),
            "tuned": example["answers"]["tuned"],
        }
    return summary


def _print_summary(s: dict) -> None:
    v = s["validation_loss"]
    print("\n== 示範完成 ==", flush=True)
    print(f"驗證集 loss：{v['before']:.3f} → {v['after']:.3f}（{(v['before'] - v['after']) / v['before']:.1%} 下降）")
    test = s.get("test") or {}
    if "base" in test and "tuned" in test:
        b, t = test["base"], test["tuned"]
        print(
            f"測試集 loss：基礎模型 {b['loss']:.3f}（困惑度 {math.exp(b['loss']):.1f}）"
            f"→ 微調後 {t['loss']:.3f}（困惑度 {math.exp(t['loss']):.1f}）"
        )
        if b.get("stop_probability") is not None:
            n = (test.get("stop_examples") or {}).get("probability")
            print(
                f"說完就停：參考答案結尾產生 <end_of_turn> 的機率（{n} 題平均）"
                f"{b['stop_probability']:.1e} → {t['stop_probability']:.2f}"
            )
        if b.get("stop_rate") is not None:
            n = (test.get("stop_examples") or {}).get("generated")
            print(
                f"　　　　　{n} 題產生的答案在 {test.get('max_new_tokens')} 個 token 內停下："
                f"{b['stop_rate']:.0%} → {t['stop_rate']:.0%}"
            )
        for key, name in (("rougeL", "ROUGE-L"), ("chrf", "chrF")):
            if key in b and key in t and b[key] is not None:
                print(f"{name}：{b[key]:.2f} → {t[key]:.2f}")
    print(f"訓練 {s['steps']} 步，每步 {s['seconds_per_step'] or 0:.1f} 秒；全部 {s['timings']['total_s']:.0f} 秒。")
    print(
        "（ROUGE-L／chrF 只評了幾題英文，平均值會隨題目改變；完整訓練的報告有 200 題與 95% 信賴區間：docs/quality/。）"
    )
    example = test.get("example")
    if example:
        print(f"\n{MEDICAL_DISCLAIMER}")
        print(f"範例（測試集，模型沒看過）：{example['question']}")
        print(f"  基礎模型：{_one_line(example.get('base'))}")
        print(f"  微調後：  {_one_line(example['tuned'])}")
        print(f"  參考答案：{_one_line(example.get('reference'), 200)}")
    print(f"\nLoRA 轉接器：{s['adapter_dir']}")
    print(
        f"執行資料夾：{s['run_dir']}"
        "（評估報告 eval.md、loss.png、config.yaml、train_log.jsonl、memory.json、tensorboard/）"
    )
    print("下一步：")
    print("  看完整的評估報告：" + s["run_dir"] + "/eval.md")
    print("  自己問模型問題：  python -m medgemma_lib chat --run " + s["run_dir"])
    print("  一步一步學：      jupyter lab，打開 notebooks/01_環境檢查.ipynb")
    if not example:
        print(MEDICAL_DISCLAIMER)


def _one_line(text, limit: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
