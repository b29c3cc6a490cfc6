"""Open once, pass the object (issue 33): ``export --verify``, ``chat`` and ``evaluate`` open their run once.

Each command goes through the real CLI on a tiny run whose adapter carries a completion marker (as training
writes it), while counting wrappers replace, in every loaded module of ours, the functions that read the run's
config, verify the adapter, hash it and resolve the base model. One of each per command: nothing after
:func:`~medgemma_lib.training.runs.open_run` does it again.
"""

from __future__ import annotations

import importlib
import io
import sys
from collections import Counter

import pytest
from _lora_runs import make_run

from medgemma_lib import cli
from medgemma_lib.core import config, profiles
from medgemma_lib.core.errors import EXIT_USER_ERROR
from medgemma_lib.training import checkpoints

ADAPTER_WEIGHTS = checkpoints.ADAPTER_WEIGHTS
STEP_MODULES = (
    "medgemma_lib.training.runs",
    "medgemma_lib.training.train",
    "medgemma_lib.evaluation.evaluate",
    "medgemma_lib.evaluation.chat",
    "medgemma_lib.export.merge",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A run folder on the tiny random Gemma 3 whose adapter is marked complete (size + SHA-256 per file)."""
    run = make_run(
        tmp_path_factory.mktemp("open-once") / "tiny-run",
        str(tiny_model_dir),
        str(tiny_model_dir),
        "none",
        max_eval_examples=2,
        num_generate=1,
        max_new_tokens=2,
        batch_size=2,
        bootstrap_resamples=0,
    )
    checkpoints.write_completion_marker(run / "adapter")
    return run


@pytest.fixture
def counts(monkeypatch):
    """Count config reads, adapter verifications, adapter hashes and model resolutions, wherever they are called."""
    counter: Counter = Counter()

    def counting(key, real, only=None):
        def wrapper(*args, **kwargs):
            if only is None or only(*args, **kwargs):
                counter[key] += 1
            return real(*args, **kwargs)

        return wrapper

    patches = {
        config.load_config: counting("config", config.load_config),
        checkpoints.verify_adapter: counting("verify", checkpoints.verify_adapter),
        checkpoints.sha256_of: counting(
            "hash", checkpoints.sha256_of, only=lambda path, *a, **k: str(path).endswith(ADAPTER_WEIGHTS)
        ),
        profiles.model_source: counting("resolve", profiles.model_source),
    }
    # Every module that imported one of them by name gets the wrapper too (``from x import f`` binds its own name);
    # the step modules are imported first, so none binds a wrapper that outlives this test.
    for step in STEP_MODULES:
        importlib.import_module(step)
    for name, module in list(sys.modules.items()):
        if not name.startswith("medgemma_lib") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            for real, wrapper in patches.items():
                if value is real:
                    monkeypatch.setattr(module, attr, wrapper)
    return counter


ONCE = {"config": 1, "verify": 1, "hash": 1, "resolve": 1}


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["memory", "stream"])
def test_export_verify_opens_the_run_once(tiny_run, tmp_path, counts, merge):
    from medgemma_lib.export import merge as ex

    # float32: the tiny random model must give the same greedy answers, so --verify passes and exits 0
    argv = ["export", "--run", str(tiny_run), "--output", str(tmp_path / "out"), "--dtype", "float32", "--verify"]
    assert cli.main([*argv, "--merge", merge]) == 0
    assert dict(counts) == ONCE
    manifest = (tmp_path / "out" / ex.EXPORT_MANIFEST).read_text(encoding="utf-8")
    recorded = checkpoints._marker_hashes(tiny_run / "adapter")[ADAPTER_WEIGHTS]
    assert recorded in manifest  # the digest verified at opening, reused, is the file's real SHA-256
    assert recorded == checkpoints.sha256_of(tiny_run / "adapter" / ADAPTER_WEIGHTS)


@pytest.mark.slow
def test_chat_opens_the_run_once(tiny_run, counts, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is glaucoma?\n"))
    assert cli.main(["chat", "--run", str(tiny_run), "--greedy", "--max-new-tokens", "2"]) == 0
    assert "共回答 1 個問題" in capsys.readouterr().out
    assert dict(counts) == ONCE


@pytest.mark.slow
def test_evaluate_opens_the_run_once(tiny_run, counts):
    argv = ["evaluate", "--run", str(tiny_run), "--num-generate", "1", "--no-chinese", "--max-new-tokens", "2"]
    assert cli.main([*argv, "--max-loss-examples", "2", "--bootstrap", "0"]) == 0
    assert dict(counts) == ONCE


@pytest.mark.parametrize("ratio, code", [(0.2, 0), (0.3, EXIT_USER_ERROR)])
def test_export_cutoff_has_one_owner(tiny_run, tmp_path, monkeypatch, ratio, code):
    """The CLI fails ``--verify`` exactly where :data:`~medgemma_lib.export.merge.MAX_MERGE_ERROR_RATIO` says."""
    from medgemma_lib.export import merge as ex

    assert ex.MAX_MERGE_ERROR_RATIO == 0.25
    monkeypatch.setattr(ex, "merge_adapter", lambda run, *a, **k: tmp_path)
    result = {"merge_error_ratio": ratio, "same": True, "dtype": "bfloat16"}
    monkeypatch.setattr(ex, "verify_export", lambda out, run, **k: result)
    assert cli.main(["export", "--run", str(tiny_run), "--verify"]) == code
    assert ex.verify_passed(result) is (code == 0)
    assert not ex.verify_passed({**result, "merge_error_ratio": 0.01, "same": False, "dtype": "float32"})


@pytest.mark.slow
def test_train_resolves_the_model_once(tiny_model_dir, tmp_path, counts):
    """``train`` on a local model folder: its config.json and shards are checked once, then that result is loaded."""
    from train_helpers import tiny_overrides

    overrides = tiny_overrides(tiny_model_dir, tmp_path, "once", max_steps=1, eval_steps=1, save_steps=1)
    overrides += ["model.quantization=none", "train.report_to=[]", "train.optim=adamw_torch"]
    assert cli.main(["train", "--config", "configs/demo.yaml", *overrides]) == 0
    assert counts["resolve"] == 1
