"""The whole preparation: no leakage, deterministic, limits, OpenCC, save/load identical, full MedQuAD."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from medgemma_lib.core.config import DataSection
from medgemma_lib.data import crossing_keys, load_prepared, prepare_from_config, split_by_focus_area

SAMPLE = "data/medquad_sample.csv"


def _cfg(repo_root, **kw) -> DataSection:
    return dataclasses.replace(DataSection(input=str(repo_root / SAMPLE)), **kw)


def _assert_adds_up(report):
    c = report["counts"]
    assert c["rows_in"] == c["kept"] + sum(c["dropped"].values())
    assert sum(c["splits"].values()) == c["kept"]
    assert {n: c["splits"][n] - c["removed_by_limits"][n] for n in c["splits"]} == c["final"]


def _no_leakage(splits):
    seen_focus, seen_q = {}, {}
    for name, ds in splits.items():
        for rec in ds:
            for seen, key in (
                (seen_focus, rec["focus_area"].casefold()),
                (seen_q, " ".join(rec["prompt"][-1]["content"].casefold().split())),
            ):
                if key:
                    assert seen.setdefault(key, name) == name, f"{key!r} in {seen[key]} and {name}"


def test_shipped_sample_prepares_without_leakage(repo_root, tmp_path):
    splits, report = prepare_from_config(_cfg(repo_root), output_dir=tmp_path / "out")
    _assert_adds_up(report)
    assert report["counts"]["rows_in"] == 1057
    _no_leakage(splits)
    assert report["leakage"] == {"focus_areas_in_two_splits": 0, "questions_in_two_splits": 0}
    assert len(report["splits"]["train"]["sources"]) == 9  # all nine answered MedQuAD sources
    for name in ("validation", "test"):
        assert 0.07 <= len(splits[name]) / report["counts"]["kept"] <= 0.13
    rec = splits["train"][0]
    assert [m["role"] for m in rec["prompt"]] == ["user"] and rec["completion"][0]["role"] == "assistant"
    assert set(rec) >= {"prompt", "completion", "source", "focus_area", "qtype", "id"}
    saved = json.loads((tmp_path / "out" / "prepare_report.json").read_text(encoding="utf-8"))
    assert saved["input"]["sha256"] == report["input"]["sha256"] and len(saved["input"]["sha256"]) == 64
    assert saved["input"]["path"] == saved["options"]["input"] == SAMPLE  # relative to the repository, no home path
    assert saved["deidentification"]["mode"] == "report"
    loaded = load_prepared(tmp_path / "out")
    for name in splits:
        assert loaded[name].to_list() == splits[name].to_list()


def test_split_is_deterministic_and_seed_dependent(repo_root):
    a, _ = prepare_from_config(_cfg(repo_root, seed=7))
    b, _ = prepare_from_config(_cfg(repo_root, seed=7))
    c, _ = prepare_from_config(_cfg(repo_root, seed=8))
    assert a["test"]["id"] == b["test"]["id"] and a["train"]["id"] == b["train"]["id"]
    assert set(a["test"]["id"]) != set(c["test"]["id"])


def test_identical_question_in_different_focus_areas_stays_together():
    rows = [{"question": "What causes X ?", "answer": f"a{i}", "source": "S", "focus_area": f"F{i}"} for i in range(5)]
    rows += [{"question": f"Q{i}", "answer": "b", "source": "S", "focus_area": f"G{i}"} for i in range(45)]
    parts = split_by_focus_area(rows, 0.2, 0.2, seed=1)
    split_of = {i: n for n, idx in parts.items() for i in idx}
    assert len({split_of[i] for i in range(5)}) == 1
    assert not crossing_keys(rows, split_of, "question") and not crossing_keys(rows, split_of, "focus_area")
    assert sorted(i for idx in parts.values() for i in idx) == list(range(50))


def test_limits_are_applied_after_the_split_and_counted(repo_root, tmp_path):
    splits, report = prepare_from_config(
        _cfg(repo_root, max_train_examples=100, max_eval_examples=20), output_dir=tmp_path / "p"
    )
    assert (len(splits["train"]), len(splits["validation"])) == (100, 20)
    assert len(splits["test"]) == report["counts"]["splits"]["test"] > 20  # the test split is left to evaluation
    _assert_adds_up(report)
    full, _ = prepare_from_config(_cfg(repo_root))
    assert splits["train"]["id"] == full["train"]["id"][:100]  # a deterministic subset of the same split
    again, report2 = prepare_from_config(DataSection(prepared_dir=str(tmp_path / "p"), max_train_examples=10))
    assert again["train"]["id"] == splits["train"]["id"][:10] and report2["counts"]["final"]["train"] == 10


def test_system_prompt_opencc_and_column_mapping(repo_root):
    cfg = _cfg(
        repo_root,
        input=str(repo_root / "data" / "zh_toyhom_sample_gb18030.csv"),
        columns={"question": "ask", "answer": "answer", "focus_area": "department"},
        chinese_conversion="s2twp",
        system_prompt="請用繁體中文回答。",
    )
    splits, report = prepare_from_config(cfg)
    assert report["input"]["encoding"] == "gb18030" and report["counts"]["rows_in"] == 200
    text = " ".join(r["prompt"][-1]["content"] + r["completion"][0]["content"] for r in splits["train"])
    assert "醫" in text and "医" not in text and "血壓" in text  # Simplified -> Taiwan Traditional
    assert splits["train"][0]["prompt"][0] == {"role": "system", "content": "請用繁體中文回答。"}
    assert "title" in splits["train"].column_names  # unmapped columns are kept
    _no_leakage(splits)


def test_deidentify_mask_and_refuse(tmp_path):
    from medgemma_lib.core.errors import DataError

    rows = [f"問題{i},回答{i}：請多休息。\n" for i in range(30)] + [
        "我的電話是 0912-345-678 怎麼辦,請聯絡王小明醫師。\n"
    ]
    path = tmp_path / "pii.csv"
    path.write_text("question,answer\n" + "".join(rows), encoding="utf-8")
    splits, report = prepare_from_config(DataSection(input=str(path), deidentify="mask"))
    everything = json.dumps([splits[n].to_list() for n in splits], ensure_ascii=False)
    assert "0912-345-678" not in everything and "[電話]" in everything
    assert report["deidentification"]["total"] >= 1
    with pytest.raises(DataError):
        prepare_from_config(DataSection(input=str(path), deidentify="refuse"), output_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_token_lengths_in_report(repo_root, demo_tokenizer):
    _, report = prepare_from_config(
        _cfg(repo_root, max_train_examples=200, max_eval_examples=50), tokenizer=demo_tokenizer
    )
    tl = report["token_lengths"]
    assert tl["summary"]["total"]["min"] > tl["summary"]["prompt"]["min"] > 5
    rec = tl["recommended"]
    assert rec["examples_cut_pct"] <= 5.0 and rec["max_length"] in [r["max_length"] for r in tl["cut_table"]]


@pytest.mark.slow
def test_full_medquad_under_two_minutes(shared_data):
    started = time.perf_counter()
    splits, report = prepare_from_config(DataSection(input=str(shared_data / "medquad" / "medquad.csv")))
    seconds = time.perf_counter() - started
    print(f"\nfull MedQuAD prepare: {seconds:.1f} s, counts {report['counts']}")
    assert report["counts"]["rows_in"] == 16423
    _assert_adds_up(report)
    assert report["counts"]["dropped"]["duplicate"] == 48  # the 48 exact (question, answer) repeats
    assert sum(report["counts"]["dropped"].values()) == 48
    _no_leakage(splits)
    assert seconds < 120


def test_shipped_samples_regenerate_byte_for_byte(shared_data, repo_root, tmp_path):
    from medgemma_lib.data.samples import build_samples

    counts = build_samples(shared_data, tmp_path)
    assert counts == {"medquad_sample.csv": 1057, "zh_toyhom_sample_gb18030.csv": 200}
    for name in counts:
        assert (tmp_path / name).read_bytes() == (repo_root / "data" / name).read_bytes()
    assert (repo_root / "data" / "LICENSE-MedQuAD-CC-BY-4.0.txt").is_file() and (
        repo_root / "data" / "LICENSE-Toyhom-MIT.txt"
    ).is_file()


def test_zero_fractions_give_empty_splits_with_the_same_columns(repo_root):
    splits, report = prepare_from_config(_cfg(repo_root, validation_fraction=0.0, test_fraction=0.0))
    assert len(splits["train"]) == 1057 and len(splits["validation"]) == 0 and len(splits["test"]) == 0
    assert splits["validation"].column_names == splits["train"].column_names
    _assert_adds_up(report)


def test_histogram_labels_never_render_as_boxes(repo_root):
    import re

    from medgemma_lib.core import plots
    from medgemma_lib.data import plot_token_lengths
    from medgemma_lib.data.lengths import cut_table, length_summary, recommend_max_length

    totals = [30, 50, 80, 120, 400, 900, 2000]
    lengths = {"prompt": [10] * 7, "completion": [t - 10 for t in totals], "total": totals}
    report = {
        "summary": length_summary(lengths),
        "cut_table": cut_table(totals),
        "recommended": recommend_max_length(totals, 20.0),
        "lengths": lengths,
    }
    ax = plot_token_lengths(report)
    texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.get_legend().get_texts())]
    has_cjk = any(re.search(r"[\u4e00-\u9fff]", t) for t in texts)
    assert has_cjk == plots.has_cjk_font()  # Chinese only when a CJK font exists, English otherwise
    assert str(report["recommended"]["max_length"]) in texts[-1]


def test_default_input_resolves_from_any_working_folder(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root / "notebooks")
    _, report = prepare_from_config(DataSection(max_train_examples=5, max_eval_examples=5))
    assert report["input"]["path"] == SAMPLE and report["counts"]["final"]["train"] == 5


@pytest.mark.slow
def test_full_medquad_xml_tarball(shared_data):
    started = time.perf_counter()
    splits, report = prepare_from_config(DataSection(input=str(shared_data / "medquad" / "medquad_xml.tar.gz")))
    print(f"\nfull MedQuAD XML prepare: {time.perf_counter() - started:.1f} s")
    c = report["counts"]
    assert c["rows_in"] == 47457 and c["dropped"]["empty_answer"] == 47457 - 16423 and c["dropped"]["malformed"] == 0
    assert c["kept"] == 16423 - 48
    _assert_adds_up(report)
    _no_leakage(splits)


def test_notebook_helpers_sizes_records_focus_areas_and_lookup():
    """What notebook 03 calls instead of looping: sizes, all records, focus areas per split, one record by field."""
    from medgemma_lib import data

    a, b, c = (
        {"id": i, "focus_area": f, "title": t} for i, f, t in ((1, "Flu", "x"), (2, "Acne", "y"), (3, "Flu", "z"))
    )
    splits = {"train": [a, c], "test": [b]}
    assert data.split_sizes(splits) == {"train": 2, "test": 1}
    assert data.all_records(splits) == [a, c, b]
    assert data.focus_areas_by_split(splits) == {"train": ["Flu"], "test": ["Acne"]}
    assert data.find_record(splits, title="y") is b and data.find_record([a, b], focus_area="Flu", title="x") is a
    assert data.find_record(splits, title="nope") is None
    record = {"prompt": [{"role": "user", "content": "糖尿病？"}], "id": "abc", "extra": 1}
    shown = data.format_record(record)
    assert "糖尿病" in shown and '"id": "abc"' in shown and "extra" not in shown and not shown.endswith("…")
    assert data.format_record(record, limit=30) == shown[:30] + " …"


def test_cut_length_table_and_round_trip_check(repo_root, demo_tokenizer, tmp_path):
    from medgemma_lib import data

    splits, _ = prepare_from_config(_cfg(repo_root, max_train_examples=40, max_eval_examples=10))
    lengths = data.length_report(demo_tokenizer, data.all_records({"train": splits["train"].to_list()}))
    table = data.cut_length_table(lengths)
    assert table.index.name == "max_length" and list(table.columns) == [
        "被截斷的樣本數",
        "被截斷的樣本 %",
        "損失的 token %",
    ]
    assert table["被截斷的樣本數"].is_monotonic_decreasing
    assert data.differing_splits(splits, splits) == []
    assert data.differing_splits(splits, {**splits, "test": splits["validation"]}) == ["test"]
    assert data.differing_splits({"train": splits["train"]}, splits) == ["test", "validation"]
