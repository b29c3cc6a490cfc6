"""The whole preparation: read -> clean -> de-identify -> split -> format -> (lengths) -> save.

:func:`prepare_from_config` is what the CLI, the notebooks and the training step call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict

from medgemma_lib.core.config import check_mix, mix_source_name
from medgemma_lib.core.errors import DataError
from medgemma_lib.core.paths import display_path, resolve_path
from medgemma_lib.data import clean as _clean
from medgemma_lib.data import formatting, readers, split, storage
from medgemma_lib.data.lengths import length_report
from medgemma_lib.data.privacy import deidentify_frame


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of every file (sorted relative names and bytes) in a folder."""
    digest = hashlib.sha256()
    if path.is_dir():
        for f in sorted(x for x in path.rglob("*") if x.is_file()):
            digest.update(str(f.relative_to(path)).encode("utf-8") + b"\0")
            digest.update(f.read_bytes())
    else:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _deidentify(rows: list[dict], mode: str) -> tuple[list[dict], dict]:
    frame = pd.DataFrame({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})
    new, report = deidentify_frame(frame, mode, columns=("question", "answer"))
    if mode == "mask":
        for row, q, a in zip(rows, new["question"].tolist(), new["answer"].tolist()):
            row["question"], row["answer"] = q, a
    return rows, report


def _limit(records: list[dict], limit: int | None) -> list[dict]:
    # The split order is already a seeded shuffle, so the first N are a deterministic random subset.
    return records if limit is None else records[:limit]


def _split_stats(records: list[dict]) -> dict:
    sources = Counter(r["source"] for r in records)
    return {
        "rows": len(records),
        "focus_areas": len({r["focus_area"].casefold() for r in records if r["focus_area"]}),
        "sources": dict(sorted(sources.items())),
    }


def _load_source(path: Path, data_cfg, *, columns, encoding, conversion, max_answer_chars, input_format, label):
    """Read, map columns, clean (HTML, whitespace, drops) and de-identify one input file."""
    mapping = _clean.parse_column_mapping(columns)
    table = readers.read_table(path, input_format, encoding)
    resolved = _clean.resolve_columns(table.columns, mapping, f"{label} {path.name}")
    cleaned = _clean.clean_rows(
        table.rows,
        resolved,
        rows_in=table.rows_in,
        malformed=table.malformed,
        locations=table.locations,
        max_answer_chars=max_answer_chars,
        long_answers=data_cfg.long_answer_policy,
        convert=formatting.chinese_converter(conversion),
    )
    if not cleaned.rows:
        reasons = "、".join(f"{_clean.DROP_REASONS[k]} {v} 筆" for k, v in cleaned.dropped.items() if v)
        raise DataError(
            f"{path.name} 的 {cleaned.rows_in} 筆資料在清理後一筆都不剩（{reasons}）。",
            hint="請確認 --columns 對應到正確的問題與答案欄位，以及答案欄不是空的。",
        )
    rows, deid = _deidentify(cleaned.rows, data_cfg.deidentify)
    return table, resolved, cleaned, rows, deid


def _split_records(rows: list[dict], data_cfg, extra: dict | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Records per split (focus-area groups, the config's fractions and seed) and the leakage check."""
    parts = split.split_by_focus_area(rows, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed)
    by_split = {
        name: [{**formatting.to_record(rows[i], data_cfg.system_prompt), **(extra or {})} for i in idx]
        for name, idx in parts.items()
    }
    split_of_row = {i: name for name, idx in parts.items() for i in idx}
    leakage = {
        "focus_areas_in_two_splits": len(split.crossing_keys(rows, split_of_row, "focus_area")),
        "questions_in_two_splits": len(split.crossing_keys(rows, split_of_row, "question")),
    }
    return by_split, leakage


def _input_report(path: Path, table, columns: dict) -> dict:
    return {
        "path": display_path(path),
        "format": table.format,
        "encoding": table.encoding,
        "encoding_detected": table.encoding_detected,
        "sha256": file_sha256(path),
        "columns_found": table.columns,
        "columns_used": columns,
    }


def _sample(pool: list[dict], n: int, rng: random.Random) -> tuple[list[dict], int]:
    """``n`` records of ``pool`` without replacement; beyond the pool, cycle through one seeded shuffle (repeats)."""
    if n <= len(pool):
        return rng.sample(pool, n), 0
    order = rng.sample(pool, len(pool))
    return [order[i % len(order)] for i in range(n)], n - len(pool)


# How data.mix builds the splits (also written into the report, so a reader of prepare_report.json sees the rule).
MIX_RULES = {
    "train": "每個來源抽 n = round(fraction × N_total) 筆，N_total = N_main / (1 − Σfraction)，"
    "N_main 為套用 max_train_examples 後的主要訓練筆數；不放回抽樣（種子固定），來源不夠時循環重複；"
    "合併後以種子打亂",
    "validation": "fraction > 0 的來源把它的驗證集加進來；有 max_eval_examples（M）時，"
    "每個來源最多取 round(fraction × M) 筆，主要資料取其餘（M − 來源筆數）",
    "test_mix": "所有來源（包括 fraction 為 0 的）的測試集；主要資料的 test 不變",
}


def _prepare_mix(data_cfg, entries: list[dict], n_main: int) -> dict:
    """Each mix source read, cleaned, de-identified and split on its own (its split never depends on the mix)."""
    total_fraction = sum(e["fraction"] for e in entries)
    n_total = n_main / (1 - total_fraction)
    sources = []
    for i, entry in enumerate(entries):
        path = resolve_path(entry["input"])
        name = mix_source_name(path)
        try:
            table, columns, cleaned, rows, deid = _load_source(
                path,
                data_cfg,
                columns=entry["columns"],
                encoding=entry["encoding"],
                conversion=entry["chinese_conversion"],
                max_answer_chars=entry["max_answer_chars"] or data_cfg.max_answer_chars,
                input_format=None,  # --format is about the main input; a source's format follows its extension
                label=f"混合來源 data.mix[{i}]",
            )
            by_split, leakage = _split_records(rows, data_cfg, {"mix_source": name})
        except DataError as err:
            raise DataError(f"資料混合 data.mix[{i}]（{name}）：{err.message}", hint=err.hint) from None
        n = round(entry["fraction"] * n_total)
        sampled, repeats = _sample(by_split["train"], n, random.Random(f"{data_cfg.seed}-mix-{name}"))
        limit = data_cfg.max_eval_examples
        validation = by_split["validation"] if entry["fraction"] > 0 else []
        if limit is not None:
            validation = validation[: round(entry["fraction"] * limit)]
        sources.append(
            {
                "name": name,
                "entry": entry,
                "input": _input_report(path, table, columns),
                "counts": {
                    "rows_in": cleaned.rows_in,
                    "kept": len(cleaned.rows),
                    "dropped": cleaned.dropped,
                    "cleaned": cleaned.cleaned,
                    "answers_truncated": cleaned.truncated_answers,
                },
                "drop_examples": cleaned.examples,
                "cleaned_examples": cleaned.cleaned_examples,
                "deidentification": {k: deid.get(k) for k in ("mode", "rows_affected", "counts_by_label")},
                "by_split": by_split,
                "leakage": leakage,
                "sampled": sampled,
                "repeats": repeats,
                "validation": validation,
            }
        )
    return {"n_total": n_total, "total_fraction": total_fraction, "sources": sources}


def _mix_report(mix: dict, n_main: int, train_total: int) -> dict:
    sources = []
    for src in mix["sources"]:
        stated = src["entry"]["fraction"]
        sources.append(
            {
                "name": src["name"],
                **src["input"],
                "chinese_conversion": src["entry"]["chinese_conversion"],
                **src["counts"],
                "drop_examples": src["drop_examples"],
                "cleaned_examples": src["cleaned_examples"],
                "deidentification": src["deidentification"],
                "splits": {name: len(recs) for name, recs in src["by_split"].items()},
                "leakage": src["leakage"],
                "sampled_into_train": len(src["sampled"]),
                "repeats": src["repeats"],
                "validation_used": len(src["validation"]),
                "test_mix": len(src["by_split"]["test"]),
                "fraction_stated": stated,
                "fraction_actual": round(len(src["sampled"]) / train_total, 6) if train_total else 0.0,
            }
        )
    return {
        "main_train": n_main,
        "total_fraction": mix["total_fraction"],
        "n_total_target": round(mix["n_total"], 3),
        "train_total": train_total,
        "rules": MIX_RULES,
        "sources": sources,
    }


def prepare_records(
    data_cfg, tokenizer=None, input_format: str | None = None, tokenizer_loader=None
) -> tuple[dict[str, list[dict]], dict]:
    """Read, clean, de-identify, split and format ``data_cfg.input`` and ``data_cfg.mix``: (records per split, report).

    ``tokenizer`` (or ``tokenizer_loader()``, called only once the input was read and checked, so that a bad input
    is refused before a tokenizer and its libraries load) measures the token lengths; neither: no lengths.

    Without ``data.mix`` the splits are ``train``, ``validation`` and ``test``; with it, mix records join train
    and validation (see :data:`MIX_RULES`) and every source's test records form ``test_mix``. The main ``test``
    split is the same with or without a mix.
    """
    started = time.perf_counter()
    path = resolve_path(data_cfg.input)
    table, columns, cleaned, rows, deid = _load_source(
        path,
        data_cfg,
        columns=data_cfg.columns,
        encoding=data_cfg.encoding,
        conversion=data_cfg.chinese_conversion,
        max_answer_chars=data_cfg.max_answer_chars,
        input_format=input_format,
        label="輸入檔",
    )
    by_split, leakage = _split_records(rows, data_cfg)
    before = {name: len(recs) for name, recs in by_split.items()}
    by_split["train"] = _limit(by_split["train"], data_cfg.max_train_examples)
    entries = check_mix(data_cfg.mix)
    mix = _prepare_mix(data_cfg, entries, len(by_split["train"])) if entries else None
    eval_limit = data_cfg.max_eval_examples  # test: see eval.max_eval_examples
    if mix and eval_limit is not None:
        eval_limit = max(0, eval_limit - sum(len(src["validation"]) for src in mix["sources"]))
    by_split["validation"] = _limit(by_split["validation"], eval_limit)
    final_main = {n: len(r) for n, r in by_split.items()}
    n_main = final_main["train"]
    if mix:
        sampled = [r for src in mix["sources"] for r in src["sampled"]]
        if sampled:
            by_split["train"] = by_split["train"] + sampled
            random.Random(f"{data_cfg.seed}-mix-train").shuffle(by_split["train"])
        by_split["validation"] = by_split["validation"] + [r for src in mix["sources"] for r in src["validation"]]
        by_split["test_mix"] = [r for src in mix["sources"] for r in src["by_split"]["test"]]
    report = {
        "input": _input_report(path, table, columns),
        "options": {
            **{f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(data_cfg)},
            "input": display_path(path),
        },
        "counts": {
            "rows_in": cleaned.rows_in,
            "kept": len(cleaned.rows),
            "dropped": cleaned.dropped,
            "cleaned": cleaned.cleaned,
            "answers_truncated": cleaned.truncated_answers,
            "splits": before,
            "removed_by_limits": {n: before[n] - final_main[n] for n in before},
            "final": {n: len(r) for n, r in by_split.items()},
        },
        "drop_examples": cleaned.examples,
        "cleaned_examples": cleaned.cleaned_examples,
        "leakage": leakage,
        "splits": {n: _split_stats(r) for n, r in by_split.items()},
        "deidentification": deid,
    }
    if mix:
        report["options"]["mix"] = [{**e, "input": display_path(resolve_path(e["input"]))} for e in entries]
        report["mix"] = _mix_report(mix, n_main, len(by_split["train"]))
    if tokenizer is None and tokenizer_loader is not None:
        tokenizer = tokenizer_loader()
    if tokenizer is not None:
        lengths = length_report(tokenizer, [r for recs in by_split.values() for r in recs])
        report["token_lengths"] = {k: v for k, v in lengths.items() if k != "lengths"}
    report["seconds"] = round(time.perf_counter() - started, 2)
    return by_split, report


def to_dataset_dict(by_split: dict[str, list[dict]]):
    """Records per split as a ``datasets.DatasetDict`` (empty splits keep the columns)."""

    columns = sorted(
        {k for recs in by_split.values() for r in recs for k in r}, key=lambda k: (k not in ("prompt", "completion"), k)
    )
    out = {}
    for name, recs in by_split.items():
        # Every split gets every column so they share one schema.
        out[name] = (
            Dataset.from_list([{c: r.get(c, "") for c in columns} for r in recs])
            if recs
            else _empty_like(by_split, columns)
        )
    return DatasetDict(out)


def _empty_like(by_split, columns):
    example = next(r for recs in by_split.values() for r in recs)
    return Dataset.from_list([{c: example.get(c, "") for c in columns}]).select([])


def prepare_from_config(
    data_cfg,
    output_dir: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    input_format: str | None = None,
    tokenizer_loader=None,
):
    """Prepared splits (``train``, ``validation``, ``test``) and the report, from a ``DataSection``.

    When ``data_cfg.prepared_dir`` is set, the saved splits are loaded instead (limits still apply).
    With ``output_dir`` the splits and ``prepare_report.json`` are saved there atomically.
    """
    if output_dir is not None:
        storage.check_output_dir(output_dir, overwrite)  # fail before any work
    if data_cfg.prepared_dir:
        prepared = resolve_path(data_cfg.prepared_dir)
        splits = storage.load_prepared(prepared)
        report = storage.load_report(prepared)
        # The test split is never trimmed here: evaluation applies its own limit (eval.max_eval_examples).
        limits = {"train": data_cfg.max_train_examples, "validation": data_cfg.max_eval_examples}
        for name, limit in limits.items():
            if name in splits and limit is not None and len(splits[name]) > limit:
                splits[name] = splits[name].select(range(limit))
        report.setdefault("counts", {})["final"] = {n: len(d) for n, d in splits.items()}
        report["loaded_from"] = display_path(prepared)
    else:
        by_split, report = prepare_records(data_cfg, tokenizer, input_format, tokenizer_loader)
        splits = to_dataset_dict(by_split)
    if output_dir is not None:
        storage.save_prepared(splits, report, output_dir, overwrite)
        report["output"] = display_path(output_dir)
    return splits, report


def mix_problems(by_split: dict[str, list[dict]], report: dict) -> list[str]:
    """Where the mixed splits disagree with ``report["mix"]`` (empty: they agree).

    Checked per source: the train records carrying its ``mix_source`` are as many as it sampled, its ``test_mix``
    is its own test split; overall: train = main train + every sample, ``test_mix`` = every source's test split.
    """
    mix, problems = report["mix"], []
    for src in mix["sources"]:
        in_train = sum(r.get("mix_source") == src["name"] for r in by_split["train"])
        if in_train != src["sampled_into_train"]:
            problems.append(f"{src['name']}：訓練集裡有 {in_train} 筆，報告寫 {src['sampled_into_train']} 筆")
        if src["test_mix"] != src["splits"]["test"]:
            problems.append(f"{src['name']}：test_mix {src['test_mix']} 筆，它自己的測試集 {src['splits']['test']} 筆")
    sampled = sum(src["sampled_into_train"] for src in mix["sources"])
    if len(by_split["train"]) != mix["main_train"] + sampled:
        problems.append(f"訓練集 {len(by_split['train'])} 筆 ≠ 主要 {mix['main_train']} ＋ 混合 {sampled}")
    if len(by_split.get("test_mix", [])) != sum(src["test_mix"] for src in mix["sources"]):
        problems.append(f"test_mix 有 {len(by_split.get('test_mix', []))} 筆，與各來源的測試集合計不符")
    return problems
