"""A run records what it was trained and tested on (``data_split.json``), and evaluation scores that record.

The measured problem: evaluation re-ran clean, de-identify and split on the data named in the run's config, so a
CSV changed after training silently gave another test set, partly made of training examples. Now training writes
the held-out splits, the train ids and the data's SHA-256 into the run folder; evaluation reads them, says in one
Chinese sentence when the data changed, and only a run from before the record is split again (with a note).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from _lora_runs import make_run
from train_helpers import SAMPLE, small_splits, tiny_overrides

from medgemma_lib.core.config import RunConfig, check_paths, load_config
from medgemma_lib.core.errors import ConfigError, DataError
from medgemma_lib.core.paths import REPO_ROOT, resolve_path
from medgemma_lib.data import prepare_from_config
from medgemma_lib.data.pipeline import file_sha256
from medgemma_lib.evaluation import evaluate as ev
from medgemma_lib.training import runs

CHANGED = "已修改（SHA-256 與訓練時不同）"
OLD_RUN = "沒有訓練時的資料切分紀錄"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A tiny run trained on a copy of the sample CSV; run_training prepares the data itself (as ``train`` does).

    About 20 s on 2 cores, so the tests that use it are marked slow."""
    from medgemma_lib.training.train import run_training

    root = tmp_path_factory.mktemp("record")
    csv = root / "medquad_copy.csv"
    shutil.copyfile(SAMPLE, csv)
    overrides = tiny_overrides(tiny_model_dir, root / "results", "rec", max_steps=1, eval_steps=1, save_steps=1)
    cfg = load_config(None, [*overrides, f"data.input={csv}", "model.quantization=none"])
    result = run_training(cfg, evaluate_before=False, verbose=False)
    return Path(result.run_dir), csv, file_sha256(csv)


def _ids(records) -> list[str]:
    return [r["id"] for r in records]


@pytest.mark.slow
def test_run_records_held_out_splits_train_ids_and_source(trained):
    run_dir, csv, sha = trained
    record = runs.read_data_split(run_dir)
    assert runs.DATA_SPLIT_FILE in runs.RUN_ARTEFACTS  # a fresh run of the same name replaces it
    assert record["sources"] == [{"key": "data.input", "path": str(csv), "sha256": sha}]
    assert record["prepare_report"]["input"]["sha256"] == sha
    held = record["held_out"]
    assert set(held) == {"validation", "test"} and len(held["validation"]) == 4 and len(held["test"]) > 0
    assert record["counts"] == {"train": 24, "validation": 4, "test": len(held["test"])}
    assert len(record["train_ids"]) == 24
    # what training used is what it recorded: the same pipeline on the unchanged file gives the same split
    splits, _ = prepare_from_config(runs.open_run(run_dir).config.data)
    assert _ids(held["test"]) == list(splits["test"]["id"])
    assert record["train_ids"] == list(splits["train"]["id"])


@pytest.mark.slow
def test_no_test_example_is_in_the_recorded_training_split(trained):
    record = runs.read_data_split(trained[0])
    train = set(record["train_ids"])
    assert not train & set(_ids(record["held_out"]["test"]))
    assert not train & set(_ids(record["held_out"]["validation"]))


@pytest.mark.slow
def test_changed_csv_still_scores_the_recorded_test_split(trained, tmp_path, capsys):
    """Drop the first third of the CSV's rows after training: evaluate scores the recorded test set, says so."""
    run_dir, csv, _ = trained
    recorded = runs.read_data_split(run_dir)["held_out"]["test"]
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    changed = tmp_path / "changed.csv"
    frame.iloc[len(frame) // 3 :].to_csv(changed, index=False)
    shutil.copyfile(changed, csv)
    try:
        run = runs.open_run(run_dir)
        resplit = list(prepare_from_config(run.config.data)[0]["test"]["id"])
        assert resplit != _ids(recorded)  # splitting again would score other questions: what this guards against
        capsys.readouterr()
        result = ev.run_evaluation(
            run,
            max_loss_examples=3,
            num_generate=0,
            chinese=False,
            bootstrap_resamples=0,
            write=False,
            verbose=True,
        )
        out = capsys.readouterr().out
    finally:
        shutil.copyfile(SAMPLE, csv)
    assert result["settings"]["test_examples"] == len(recorded)
    assert [row["id"] for row in result["loss_examples"]] == _ids(recorded)[:3]
    notes = [line for line in out.splitlines() if CHANGED in line]
    assert len(notes) == 1 and str(Path(csv).name) in notes[0] and f"測試集（{len(recorded)} 筆）" in notes[0]
    assert notes[0] == result["settings"]["test_split"]
    assert ev.test_records(run, verbose=False) == recorded


@pytest.mark.slow
def test_unchanged_data_gives_no_note(trained, capsys):
    test, mix, note = ev.held_out_records(runs.open_run(trained[0]))
    assert note is None and mix == [] and capsys.readouterr().out == ""
    assert test == runs.read_data_split(trained[0])["held_out"]["test"]


def test_missing_and_changed_sources_are_named_in_one_sentence(tmp_path):
    here = tmp_path / "here.csv"
    here.write_text("question,answer\nq,a\n", encoding="utf-8")
    record = {
        "sources": [
            {"key": "data.input", "path": str(here), "sha256": "0" * 64},
            {"key": "data.mix[0].input", "path": str(tmp_path / "gone.csv"), "sha256": "1" * 64},
        ]
    }
    changes = runs.changed_sources(record)
    assert changes == [(str(here), "changed"), (str(tmp_path / "gone.csv"), "missing")]
    note = ev.changed_data_note(changes, 7)
    assert note.count("。") == 1 and note.endswith("。") and CHANGED in note and "已不在原處" in note
    assert "訓練時記錄的測試集（7 筆）" in note
    assert ev.changed_data_note([], 7) is None


def test_damaged_record_is_refused_in_chinese(tmp_path):
    (tmp_path / runs.DATA_SPLIT_FILE).write_text("{ torn", encoding="utf-8")
    with pytest.raises(DataError, match="資料切分紀錄") as err:
        runs.read_data_split(tmp_path)
    assert err.value.hint


def test_record_written_from_given_datasets(tmp_path, demo_tokenizer):
    """The demo, quality and notebook 05 pass prepared datasets: the record holds their rows exactly."""
    splits = small_splits(n_train=6, n_eval=2)
    cfg = RunConfig()
    cfg.data.input = "data/medquad_sample.csv"  # relative, as a config names it: found by the one path rule
    runs.write_data_split(tmp_path, cfg, splits)
    record = json.loads((tmp_path / runs.DATA_SPLIT_FILE).read_text(encoding="utf-8"))
    assert record["sources"][0]["sha256"] == file_sha256(SAMPLE) and record["prepare_report"] is None
    assert record["held_out"]["test"] == [dict(r) for r in splits["test"]]
    assert record["train_ids"] == list(splits["train"]["id"])


@pytest.mark.slow
def test_run_without_record_is_split_again_with_a_note(tmp_path, tiny_model_dir, capsys):
    """A run folder from before the record still evaluates: split again from its config, and says so."""
    run_dir = make_run(tmp_path / "old-run", str(tiny_model_dir), str(tiny_model_dir), "none")
    assert not (run_dir / runs.DATA_SPLIT_FILE).exists()
    run = runs.open_run(run_dir)
    capsys.readouterr()
    result = ev.run_evaluation(
        run, max_loss_examples=2, num_generate=0, chinese=False, bootstrap_resamples=0, write=False, verbose=True
    )
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if OLD_RUN in line] == [result["settings"]["test_split"]]
    splits, _ = prepare_from_config(run.config.data)
    assert result["settings"]["test_examples"] == len(splits["test"])
    assert [row["id"] for row in result["loss_examples"]] == list(splits["test"]["id"])[:2]


# ----------------------------------------------------------------------------------------------
# One rule for a relative data path: core.paths.resolve_path (config check, data step, evaluation, record)


def test_one_path_rule_resolves_as_the_old_copies_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    cases = {
        "mine.csv": Path("mine.csv"),  # in the working folder: kept as given
        "data/medquad_sample.csv": REPO_ROOT / "data" / "medquad_sample.csv",  # not here: the repository's
        str(SAMPLE): SAMPLE,  # absolute: itself
        "~/mine.csv": tmp_path / "mine.csv",  # home expanded
        "data/nowhere.csv": Path("data/nowhere.csv"),  # nowhere: as given (the error names it)
    }
    for given, expected in cases.items():
        assert resolve_path(given) == expected, given


def test_config_check_finds_data_as_the_data_step_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # like notebooks/: the config's relative data path is the repository's
    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path)
    cfg.data.input = "data/medquad_sample.csv"
    cfg.data.mix = [{"input": "data/medquad_sample.csv", "fraction": 0.1}]
    check_paths(cfg)
    cfg.data.mix = [{"input": "data/nowhere.csv", "fraction": 0.1}]
    with pytest.raises(ConfigError, match=r"找不到資料檔 data\.mix\[0\]\.input = data/nowhere\.csv"):
        check_paths(cfg)
    cfg.data.mix, cfg.data.input = [], "nowhere.csv"
    with pytest.raises(ConfigError, match="找不到資料檔 data.input = nowhere.csv"):
        check_paths(cfg)


def test_callers_keep_the_data_path_as_given(monkeypatch, tmp_path):
    """The demo no longer rewrites data.input to an absolute path: config.yaml keeps what the config says."""
    from medgemma_lib.demo import load_demo_config

    monkeypatch.chdir(tmp_path)
    cfg = load_demo_config()
    assert cfg.data.input == "data/medquad_sample.csv"
    assert resolve_path(cfg.data.input) == REPO_ROOT / "data" / "medquad_sample.csv"
