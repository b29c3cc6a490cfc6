"""Evaluation of a run: base vs fine-tuned on the held-out test split (notebook 06, ``evaluate``).

One base model is loaded, the run's LoRA adapter is attached, and every measurement is taken twice: once inside
``with model.disable_adapter():`` (the base model) and once with the adapter on (the fine-tuned model). There is
never a second copy of the base in memory. The test split is the one training recorded in the run folder.

:func:`run_evaluation` is the recipe, a short sequence of named steps: the limits (from the run's ``eval`` section),
the model with its adapter, the question sets, one measurement per model (answer losses, greedy answers), the result.
What is measured lives in :mod:`.metrics`; how it reads (``eval.md``, ``eval.png``, tables) in :mod:`.report`.
Results go to ``results/<run>/eval.json``, ``eval.md`` and ``eval.png``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core import stats
from medgemma_lib.core.config import load_config
from medgemma_lib.core.errors import ConfigError, DataError, ModelError, OutputError
from medgemma_lib.core.paths import REPO_ROOT, display_path, resolve_path
from medgemma_lib.data import answer_of, chinese_converter, prepare_from_config, question_of, read_table
from medgemma_lib.evaluation import metrics
from medgemma_lib.evaluation.metrics import is_chinese
from medgemma_lib.evaluation.report import write_reports
from medgemma_lib.models.generation import THINKING_SYSTEM_PROMPT, generate_answers, system_prompt_for
from medgemma_lib.training.runs import (
    DATA_SPLIT_FILE,
    EVAL_JSON,
    EVAL_MD,
    EVAL_PNG,
    Run,
    changed_sources,
    find_adapter_dir,
    load_for_inference,
    open_run,
    read_data_split,
)
from medgemma_lib.training.train import run_training

CHINESE_SAMPLE = "data/zh_toyhom_sample_gb18030.csv"
MODELS = ("base", "tuned")


# ----------------------------------------------------------------------------------------------
# The run (folder, adapter and loading: medgemma_lib.training.runs)


def find_or_train_run(run_dir: str | Path, config: str | Path = "configs/demo.yaml", verbose: bool = True) -> Path:
    """``run_dir`` when it holds an adapter; otherwise train it now with ``config`` (notebook 06 run alone).

    The training is the same :func:`medgemma_lib.training.train.run_training` that notebook 05 and the
    demo call, written to the same folder, so running 05 later simply replaces it.
    """
    run_dir = Path(run_dir)
    if find_adapter_dir(run_dir) is not None:
        return run_dir
    cfg_path = resolve_path(config)
    if verbose:
        print(
            f"找不到 {run_dir.name} 的訓練結果（通常由 notebook 05 產生）。現在用 {cfg_path.name} 快速訓練一次，"
            "CPU 上約需數分鐘；建議下次先執行 05_LoRA訓練.ipynb。",
            flush=True,
        )
    cfg = load_config(cfg_path, [f"train.output_dir={run_dir.parent.resolve()}", f"train.run_name={run_dir.name}"])
    run_training(cfg, verbose=verbose)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Data


def held_out_records(run: Run, verbose: bool = True) -> tuple[list[dict], list[dict], str | None]:
    """The run's held-out ``test`` split, the ``test_mix`` split of its data mix, and a note (None: nothing to say).

    Both splits are what training recorded in the run's ``data_split.json`` (:func:`~.runs.write_data_split`):
    when the recorded data has changed or is gone the note says so, and the recorded split is still what is
    scored. A run from before that record is split again from its config and seed, with a note. ``verbose``:
    print the note.
    """
    record = read_data_split(run.path)
    if record is None:
        splits, _ = prepare_from_config(run.config.data, output_dir=None, tokenizer=None)
        held = {name: [dict(r) for r in ds] for name, ds in splits.items() if name != "train"}
        note = (
            f"這個執行資料夾沒有訓練時的資料切分紀錄（{DATA_SPLIT_FILE}，較早的版本訓練），測試集依 config.yaml 的"
            "資料設定與種子重新切分；資料若在訓練後改過，測試題可能不是訓練時保留的那些。"
        )
    else:
        held = record["held_out"]
        note = changed_data_note(changed_sources(record), len(held.get("test") or []))
    if not held.get("test"):
        raise DataError(
            "這次執行的資料沒有測試集（test split 是空的）。",
            hint="請把 data.test_fraction 設為大於 0（例如 0.1）後重新訓練。",
        )
    if verbose and note:
        print(note, flush=True)
    return held["test"], held.get("test_mix") or [], note


def changed_data_note(changes: list[tuple[str, str]], n_test: int) -> str | None:
    """One Chinese sentence: which recorded data files changed or are gone, and that the recorded split is scored."""
    if not changes:
        return None
    what = {"changed": "已修改（SHA-256 與訓練時不同）", "missing": "已不在原處"}
    files = "、".join(f"{display_path(resolve_path(path))} {what[kind]}" for path, kind in changes)
    return f"注意：訓練時的資料 {files}；評估的仍是訓練時記錄的測試集（{n_test} 筆），沒有重新切分。"


def test_records(run: Run, tokenizer=None, limit: int | None = None, verbose: bool = True) -> list[dict]:
    """The held-out test split of the run (what training recorded; see :func:`held_out_records`)."""
    records = held_out_records(run, verbose=verbose)[0]
    return records[:limit] if limit else records


def mix_chinese_set(mix_records: list[dict], limit: int) -> list[dict]:
    """Held-out Chinese questions of the data mix (``test_mix``), taken in turn from each source, at most ``limit``."""
    by_source: dict[str, list[dict]] = {}
    for rec in mix_records:
        if is_chinese(question_of(rec)):
            by_source.setdefault(rec.get("mix_source") or rec.get("source", ""), []).append(rec)
    picked: list[dict] = []
    queues = [list(v) for _, v in sorted(by_source.items())]
    while len(picked) < limit and any(queues):
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return [
        {
            "question": question_of(r),
            "reference": answer_of(r),
            "source": r.get("mix_source") or r.get("source", ""),
            "record": r,
        }
        for r in picked
    ]


def chinese_eval_set(num_sample: int = 4) -> list[dict]:
    """The guide's three Chinese questions (with short references) + ``num_sample`` pairs of the
    shipped Chinese sample, converted to Traditional Chinese (OpenCC s2twp)."""
    spec = json.loads(
        resources.files("medgemma_lib").joinpath("resources/zh_eval_questions.json").read_text(encoding="utf-8")
    )
    items = [{"question": q["question"], "reference": q["reference"], "source": "guide"} for q in spec["questions"]]
    sample = REPO_ROOT / CHINESE_SAMPLE
    if num_sample > 0 and sample.is_file():
        convert = chinese_converter("s2twp")
        rows = [r for r in read_table(sample).rows if r.get("title", "").strip() and r.get("answer", "").strip()]
        for row in rows[:num_sample]:
            items.append(
                {
                    "question": convert(row["title"].strip()),
                    "reference": convert(row["answer"].strip()),
                    "source": "zh_toyhom_sample",
                }
            )
    return items


# ----------------------------------------------------------------------------------------------
# The whole evaluation, step by step


@dataclass
class Limits:
    """How much is evaluated: from the run's ``eval`` section unless the caller says otherwise."""

    max_loss_examples: int | None  # None = the whole test split
    num_generate: int
    max_new_tokens: int
    batch_size: int
    num_generate_chinese: int
    resamples: int


def evaluation_limits(ev, **given) -> Limits:
    """The limits of one evaluation: each ``given`` value that is not None, else the ``eval`` config's; a negative
    count is refused in Chinese."""
    limits = Limits(
        max_loss_examples=ev.max_eval_examples,
        num_generate=ev.num_generate,
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        num_generate_chinese=ev.num_generate_chinese,
        resamples=ev.bootstrap_resamples,
    )
    for name, value in given.items():
        if value is not None and value < 0:
            label = "bootstrap_resamples" if name == "resamples" else name
            raise ConfigError(f"{label} 不能是負數（收到 {value}）。", hint="請給 0 或正整數。")
        if value is not None and (value or name not in ("max_new_tokens", "batch_size")):
            setattr(limits, name, value)
    return limits


@dataclass
class QuestionSets:
    """What is asked: the test split, its loss subset, English and Chinese questions to answer."""

    records: list[dict]
    loss: list[dict]
    english: list[dict]
    chinese: list[dict]  # {"question", "reference", "source", "record"?}
    chinese_loss: list[dict]  # records of the Chinese questions when they come from the data mix (else none)
    chinese_from_mix: bool
    split_note: str | None

    @property
    def questions(self) -> list[str]:
        return [question_of(r) for r in self.english] + [z["question"] for z in self.chinese]

    @property
    def english_references(self) -> list[str]:
        return [answer_of(r) for r in self.english]

    @property
    def chinese_references(self) -> list[str]:
        return [z["reference"] for z in self.chinese]


def question_sets(run: Run, limits: Limits, chinese: bool, num_chinese_samples: int, verbose: bool) -> QuestionSets:
    """The recorded test split cut to ``limits``, and the Chinese questions: held out of the data mix when the run
    has them and ``num_generate_chinese`` asks for them, else the guide's set."""
    records, mix_records, note = held_out_records(run, verbose=verbose)
    from_mix = bool(chinese and limits.num_generate_chinese and mix_chinese_set(mix_records, 1))
    if from_mix:
        zh = mix_chinese_set(mix_records, limits.num_generate_chinese)
    else:
        zh = chinese_eval_set(num_chinese_samples) if chinese else []
    sets = QuestionSets(
        records=records,
        loss=records[: limits.max_loss_examples] if limits.max_loss_examples else records,
        english=records[: limits.num_generate],
        chinese=zh,
        chinese_loss=[z["record"] for z in zh] if from_mix else [],
        chinese_from_mix=from_mix,
        split_note=note,
    )
    if verbose:
        print(
            f"測試集 {len(records)} 筆：{len(sets.loss)} 筆計算 loss，{len(sets.english)} 題英文與 {len(zh)} 題中文"
            f"產生答案（每題最多 {limits.max_new_tokens} 個 token）。",
            flush=True,
        )
    return sets


def model_with_adapter(run: Run, model, tokenizer, quantization: str | None, device: str | None, verbose: bool):
    """The base model with the run's adapter attached (loaded here unless the caller passes a loaded pair)."""
    if model is None or tokenizer is None:
        model, tokenizer, run = load_for_inference(run, quantization=quantization, device=device, verbose=verbose)
    if not hasattr(model, "disable_adapter"):
        raise ModelError(
            "評估需要掛著 LoRA 轉接器的模型（PeftModel），才能以同一份基礎模型比較微調前後。",
            hint="請用 runs.load_for_inference(執行資料夾) 載入模型。",
        )
    return model, tokenizer, run


@dataclass
class Measured:
    """One model's raw outputs: answer losses (English, Chinese), greedy answers with lengths and thoughts."""

    loss_rows: list[dict]
    chinese_loss_rows: list[dict]
    answers: list[str] = field(default_factory=list)
    lengths: list[dict] = field(default_factory=list)
    thoughts: list[str | None] = field(default_factory=list)
    loss_seconds: float = 0.0
    generate_seconds: float = 0.0


def measure(model, tokenizer, name: str, sets: QuestionSets, run: Run, limits: Limits, verbose: bool) -> Measured:
    """Answer losses and greedy answers of one model: ``base`` (inside ``disable_adapter``) or ``tuned``."""
    max_length = run.config.train.max_length
    system_prompt = system_prompt_for(run.config.data.system_prompt, bool(run.config.eval.thinking))
    t0 = time.time()
    with model.disable_adapter() if name == "base" else contextlib.nullcontext():
        out = Measured(
            metrics.answer_losses(model, tokenizer, sets.loss, max_length=max_length, progress=verbose),
            metrics.answer_losses(model, tokenizer, sets.chinese_loss, max_length=max_length),
        )
        t1 = time.time()
        if sets.questions:
            out.answers = generate_answers(
                model,
                tokenizer,
                sets.questions,
                max_new_tokens=limits.max_new_tokens,
                do_sample=False,
                batch_size=limits.batch_size,
                system_prompt=system_prompt,
                lengths=out.lengths,
                thoughts=out.thoughts,
            )
    out.loss_seconds, out.generate_seconds = round(t1 - t0, 1), round(time.time() - t1, 1)
    if verbose:
        label = "基礎模型" if name == "base" else "微調後模型"
        print(
            f"{label}：測試 loss {metrics.summarize_losses(out.loss_rows)['loss']:.4f}（{out.loss_seconds:.0f} 秒），"
            f"產生答案 {out.generate_seconds:.0f} 秒",
            flush=True,
        )
    return out


def answer_rows(sets: QuestionSets, measured: dict[str, Measured]) -> tuple[list[dict], list[dict], dict, dict]:
    """Per question (English, Chinese): reference, each model's answer, thought and scores; and per model the
    English summary (losses + text metrics) and the Chinese one."""
    n_en = len(sets.english)
    en_rows = [
        {"id": r.get("id"), "source": r.get("source", ""), "qtype": r.get("qtype", ""), "question": question_of(r),
         "reference": answer_of(r), "answers": {}, "thoughts": {}, "scores": {}}
        for r in sets.english
    ]  # fmt: skip
    zh_rows = [
        {"id": (z.get("record") or {}).get("id"), "source": z["source"], "question": z["question"],
         "reference": z["reference"], "answers": {}, "thoughts": {}, "scores": {}}
        for z in sets.chinese
    ]  # fmt: skip
    english, chinese = {}, {}
    for name, m in measured.items():
        en = metrics.text_metrics(m.answers[:n_en], sets.english_references, chinese=False)
        zh = metrics.text_metrics(m.answers[n_en:], sets.chinese_references, chinese=True)
        for rows, part, start in ((en_rows, en, 0), (zh_rows, zh, n_en)):
            for i, (row, per) in enumerate(zip(rows, part["per_answer"])):
                row["answers"][name], row["thoughts"][name] = m.answers[start + i], m.thoughts[start + i]
                row["scores"][name] = per
        english[name] = {**metrics.summarize_losses(m.loss_rows), **{k: v for k, v in en.items() if k != "per_answer"}}
        chinese[name] = {k: v for k, v in zh.items() if k != "per_answer"}
        if m.chinese_loss_rows:
            chinese[name].update(metrics.summarize_losses(m.chinese_loss_rows))
    return en_rows, zh_rows, english, chinese


def settings_of(run: Run, sets: QuestionSets, limits: Limits, measured: dict[str, Measured]) -> dict:
    """What this evaluation asked and how (``eval.json``'s ``settings``)."""
    thinking = bool(run.config.eval.thinking)
    return {
        "test_examples": len(sets.records),
        "test_split": sets.split_note or f"訓練時記錄的測試集（{DATA_SPLIT_FILE}）",
        "loss_examples": len(sets.loss),
        "generated_english": len(sets.english),
        "generated_chinese": len(sets.chinese),
        "max_new_tokens": limits.max_new_tokens,
        "chinese_questions": "data.mix 的 test_mix（保留的中文測試題）"
        if sets.chinese_from_mix
        else "原始指南的三題＋隨附中文樣本",
        "bootstrap_resamples": limits.resamples,
        "thinking": thinking,
        "thinking_system_prompt": THINKING_SYSTEM_PROMPT if thinking else None,
        "answers_with_thought": {n: sum(1 for t in m.thoughts if t) for n, m in measured.items()},
        "scored_text": "只有答案：<unused94>…<unused95> 之間的思考過程不計分，另存於 answers[].thoughts",
        "decoding": "greedy",
        "batch_size": limits.batch_size,
        "max_length": run.config.train.max_length,
    }


TOKENIZATION = {
    "loss": "與訓練相同：提示遮蔽，只在答案 token（含 <end_of_turn>）上計算，依 token 數加權平均",
    "english": "ROUGE-L 以英文單字計（rouge-score 斷詞 + Porter 詞幹）；BLEU 用 sacrebleu 13a；chrF 以字元計",
    "chinese": "ROUGE-L 以中文「字」計（每個漢字一個單位，英文單字整個算一個）；BLEU 用 sacrebleu zh；chrF 以字元計",
    "length": "英文：單字數；中文：字數",
}


def assemble(run: Run, sets: QuestionSets, limits: Limits, measured: dict[str, Measured], tokenizer, quantization):
    """The result dict written to ``eval.json``: per model, differences, intervals, language, decoding, stopping,
    per-example losses, breakdowns and the answers."""
    n_en = len(sets.english)
    en_rows, zh_rows, english, chinese = answer_rows(sets, measured)
    loss_rows = {n: m.loss_rows for n, m in measured.items()}
    zh_loss_rows = {n: m.chinese_loss_rows for n, m in measured.items()}
    answers = {n: m.answers for n, m in measured.items()}
    questions, refs_en, refs_zh = sets.questions, sets.english_references, sets.chinese_references
    lengths_en = {n: m.lengths[:n_en] for n, m in measured.items()}
    lengths_zh = {n: m.lengths[n_en:] for n, m in measured.items()}
    intervals = {}
    if limits.resamples:
        r = limits.resamples
        intervals = {
            "english": metrics.paired_intervals(loss_rows, answers, refs_en, 0, n_en, False, r),
            "chinese": metrics.paired_intervals(zh_loss_rows, answers, refs_zh, n_en, len(questions), True, r),
        }
    return {
        "run": run.name,
        "profile": run.config.model.profile,
        "quantization": quantization or run.config.model.quantization,
        "adapter": f"{run.name}/{run.adapter_dir.name}" if run.adapter_dir != run.path else run.name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings_of(run, sets, limits, measured),
        "tokenization": TOKENIZATION,
        "models": english,
        "difference": metrics.difference(english["base"], english["tuned"]),
        "ci95": intervals.get("english", {}),
        "language": {
            "rule": stats.LANGUAGE_RULE,
            "english": {n: stats.language_fidelity(questions[:n_en], answers[n][:n_en]) for n in MODELS},
            "chinese": {n: stats.language_fidelity(questions[n_en:], answers[n][n_en:]) for n in MODELS},
            "simplified_share": {n: metrics.mean_simplified_share(answers[n][n_en:]) for n in MODELS},
            "simplified_share_reference": metrics.mean_simplified_share(refs_zh),
        },
        "decoding": {
            "english": metrics.decoding_limits(tokenizer, refs_en, lengths_en, limits.max_new_tokens),
            "chinese": metrics.decoding_limits(tokenizer, refs_zh, lengths_zh, limits.max_new_tokens),
        },
        "stopping": {
            "english": metrics.stop_metrics(tokenizer, refs_en, lengths_en, loss_rows, limits.resamples),
            "chinese": metrics.stop_metrics(tokenizer, refs_zh, lengths_zh, zh_loss_rows, limits.resamples),
        },
        "loss_examples": metrics.loss_examples(loss_rows),
        "by_source": metrics.breakdown(loss_rows, en_rows, "source"),
        "by_qtype": metrics.breakdown(loss_rows, en_rows, "qtype"),
        "chinese": {
            "models": chinese,
            "difference": metrics.difference(chinese["base"], chinese["tuned"]),
            "ci95": intervals.get("chinese", {}),
            "loss_examples": metrics.loss_examples(zh_loss_rows),
            "answers": zh_rows,
        },
        "answers": en_rows,
        "disclaimer": MEDICAL_DISCLAIMER,
        "timings": {
            f"{n}_{part}_seconds": getattr(m, f"{part}_seconds")
            for n, m in measured.items()
            for part in ("loss", "generate")
        },
    }


def run_evaluation(
    run_dir: str | Path | Run,
    *,
    max_loss_examples: int | None = None,
    num_generate: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    num_chinese_samples: int = 4,
    chinese: bool = True,
    num_side_by_side: int = 3,
    num_generate_chinese: int | None = None,
    bootstrap_resamples: int | None = None,
    quantization: str | None = None,
    device: str | None = None,
    model=None,
    tokenizer=None,
    write: bool = True,
    verbose: bool = True,
) -> dict:
    """Evaluate a run (base vs fine-tuned) and write ``eval.json``, ``eval.md``, ``eval.png`` into its folder.

    Limits default to the run's ``eval`` config section: ``max_loss_examples`` test records for loss
    (``eval.max_eval_examples``; None = the whole test split), ``num_generate`` test questions answered greedily
    (``eval.num_generate``) with ``max_new_tokens`` each. ``model``/``tokenizer``: an already loaded
    :func:`~.runs.load_for_inference` pair (a notebook reuses it for the chat box). ``num_generate_chinese``:
    held-out Chinese questions of the data mix (``test_mix``) to answer instead of the guide's set
    (``eval.num_generate_chinese``; 0 = the guide's set). ``bootstrap_resamples``: paired bootstrap resamples for
    the 95 % intervals of every difference (``eval.bootstrap_resamples``; 0 = none). Returns what is written to
    ``eval.json``.
    """
    started = time.time()
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    limits = evaluation_limits(
        run.config.eval,
        max_loss_examples=max_loss_examples,
        num_generate=num_generate,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_generate_chinese=num_generate_chinese,
        resamples=bootstrap_resamples,
    )
    model, tokenizer, run = model_with_adapter(run, model, tokenizer, quantization, device, verbose)
    sets = question_sets(run, limits, chinese, num_chinese_samples, verbose)
    if model.device.type == "cpu":  # one batch: NF4 de-quantises every weight at each step, whatever the batch size
        limits.batch_size = max(limits.batch_size, len(sets.questions))
    measured = {name: measure(model, tokenizer, name, sets, run, limits, verbose) for name in MODELS}
    result = assemble(run, sets, limits, measured, tokenizer, quantization)
    result["num_side_by_side"] = num_side_by_side
    result["seconds"] = round(time.time() - started, 1)
    if write:
        write_reports(result, run.path)
        if verbose:
            print(
                f"評估結果已寫入 {display_path(run.path)}/：{EVAL_JSON}、{EVAL_MD}、{EVAL_PNG}"
                f"（共 {result['seconds']:.0f} 秒）。",
                flush=True,
            )
    return result


def load_evaluation(run_dir: str | Path) -> dict:
    """Read a run's ``eval.json``."""
    path = Path(run_dir) / EVAL_JSON
    if not path.is_file():
        raise OutputError(f"找不到 {path}。", hint=f"請先執行 python -m medgemma_lib evaluate --run {run_dir}。")
    return json.loads(path.read_text(encoding="utf-8"))
