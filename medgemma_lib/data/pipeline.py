"""The whole preparation: read -> clean -> de-identify -> split -> format -> (lengths) -> save.

:func:`prepare_from_config` is what the CLI, the notebooks and the training step call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict

from medgemma_lib.data import clean as _clean
from medgemma_lib.data import formatting, readers, split, storage
from medgemma_lib.data.lengths import length_report
from medgemma_lib.errors import DataError
from medgemma_lib.paths import display_path, resolve_path
from medgemma_lib.privacy import deidentify_frame


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


def prepare_records(data_cfg, tokenizer=None, input_format: str | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Read, clean, de-identify, split and format ``data_cfg.input``; returns (records per split, report)."""
    started = time.perf_counter()
    path = resolve_path(data_cfg.input)
    mapping = _clean.parse_column_mapping(data_cfg.columns)
    table = readers.read_table(path, input_format, data_cfg.encoding)
    columns = _clean.resolve_columns(table.columns, mapping, f"輸入檔 {path.name}")
    convert = formatting.chinese_converter(data_cfg.chinese_conversion)
    cleaned = _clean.clean_rows(
        table.rows,
        columns,
        rows_in=table.rows_in,
        malformed=table.malformed,
        locations=table.locations,
        max_answer_chars=data_cfg.max_answer_chars,
        long_answers=data_cfg.long_answer_policy,
        convert=convert,
    )
    if not cleaned.rows:
        reasons = "、".join(f"{_clean.DROP_REASONS[k]} {v} 筆" for k, v in cleaned.dropped.items() if v)
        raise DataError(
            f"{path.name} 的 {cleaned.rows_in} 筆資料在清理後一筆都不剩（{reasons}）。",
            hint="請確認 --columns 對應到正確的問題與答案欄位，以及答案欄不是空的。",
        )
    rows, deid = _deidentify(cleaned.rows, data_cfg.deidentify)
    parts = split.split_by_focus_area(rows, data_cfg.validation_fraction, data_cfg.test_fraction, data_cfg.seed)
    by_split = {
        name: [formatting.to_record(rows[i], data_cfg.system_prompt) for i in idx] for name, idx in parts.items()
    }
    before = {name: len(recs) for name, recs in by_split.items()}
    by_split["train"] = _limit(by_split["train"], data_cfg.max_train_examples)
    by_split["validation"] = _limit(
        by_split["validation"], data_cfg.max_eval_examples
    )  # test: see eval.max_eval_examples
    split_of_row = {i: name for name, idx in parts.items() for i in idx}
    report = {
        "input": {
            "path": display_path(path),
            "format": table.format,
            "encoding": table.encoding,
            "encoding_detected": table.encoding_detected,
            "sha256": file_sha256(path),
            "columns_found": table.columns,
            "columns_used": columns,
        },
        "options": {
            **{f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(data_cfg)},
            "input": display_path(path),
        },
        "counts": {
            "rows_in": cleaned.rows_in,
            "kept": len(cleaned.rows),
            "dropped": cleaned.dropped,
            "answers_truncated": cleaned.truncated_answers,
            "splits": before,
            "removed_by_limits": {n: before[n] - len(by_split[n]) for n in before},
            "final": {n: len(r) for n, r in by_split.items()},
        },
        "drop_examples": cleaned.examples,
        "leakage": {
            "focus_areas_in_two_splits": len(split.crossing_keys(rows, split_of_row, "focus_area")),
            "questions_in_two_splits": len(split.crossing_keys(rows, split_of_row, "question")),
        },
        "splits": {n: _split_stats(r) for n, r in by_split.items()},
        "deidentification": deid,
    }
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
        by_split, report = prepare_records(data_cfg, tokenizer, input_format)
        splits = to_dataset_dict(by_split)
    if output_dir is not None:
        storage.save_prepared(splits, report, output_dir, overwrite)
        report["output"] = display_path(output_dir)
    return splits, report
