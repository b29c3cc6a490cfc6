"""Bad files on the inference side: `evaluate`, `chat` and `export` refuse, in Chinese and before loading or
writing anything, a local base model whose ``model.safetensors`` is cut short, and an adapter whose
``adapter_config.json`` names another base model, also when the layer shapes are equal (PEFT would attach it)."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from _lora_runs import make_run
from conftest import build_tiny_gemma3

from medgemma_lib import cli
from medgemma_lib.core.errors import EXIT_USER_ERROR, ModelError
from medgemma_lib.core.profiles import base_identity
from medgemma_lib.training import runs

COMMANDS = {
    "evaluate": lambda run: ["evaluate", "--run", str(run), "--num-generate", "1", "--no-chinese"],
    "chat": lambda run: ["chat", "--run", str(run), "--greedy", "--max-new-tokens", "3"],
    "export": lambda run: ["export", "--run", str(run)],
}


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _refused(argv, folder, monkeypatch, capsys, *needles):
    """exit 2, every needle in the Chinese message, no traceback, nothing created or changed under ``folder``."""
    before = _tree(folder)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is glaucoma?\n"))
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err and "解決方法" in err
    for needle in needles:
        assert needle in err, err
    assert _tree(folder) == before
    return err


@pytest.fixture(scope="module")
def bases(tmp_path_factory, demo_tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("bases")
    other = build_tiny_gemma3(root / "other-weights", demo_tokenizer, seed=1)  # same shapes, other weights
    copy = root / "copy-of-tiny"
    shutil.copytree(tiny_model_dir, copy)
    cut = root / "truncated"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 4096])
    return {"tiny": tiny_model_dir, "other": other, "copy": copy, "truncated": cut}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny-run", str(tiny_model_dir), str(tiny_model_dir), "none")


def _variant(tiny_run, tmp_path, profile=None, recorded=None):
    run = tmp_path / "results" / "variant"
    shutil.copytree(tiny_run, run)
    if profile is not None:
        text = (run / "config.yaml").read_text(encoding="utf-8")
        old = next(line for line in text.splitlines() if line.strip().startswith("profile:"))
        (run / "config.yaml").write_text(text.replace(old, f"  profile: {profile}"), encoding="utf-8")
    if recorded is not None:
        cfg_file = run / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = recorded
        cfg_file.write_text(json.dumps(cfg), encoding="utf-8")
    return run


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_truncated_base_weights_are_refused_before_loading(command, tiny_run, bases, tmp_path, monkeypatch, capsys):
    run = _variant(tiny_run, tmp_path, profile=str(bases["truncated"]))
    with pytest.raises(ModelError, match="被截斷"):
        runs.open_run(run)
    err = _refused(COMMANDS[command](run), tmp_path, monkeypatch, capsys, "model.safetensors", "被截斷", "重新下載")
    assert "載入基礎模型" not in err  # refused from the header, before the model was read


def test_truncated_standalone_model_is_refused_by_chat(bases, tmp_path, monkeypatch, capsys):
    _refused(["chat", "--model", str(bases["truncated"])], tmp_path, monkeypatch, capsys, "被截斷")


def test_truncated_base_fails_config_check_too(bases, tmp_path, monkeypatch, capsys):
    _refused(["config", "check", f"model.profile={bases['truncated']}"], tmp_path, monkeypatch, capsys, "被截斷")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_adapter_of_another_base_with_equal_shapes_is_refused(command, tiny_run, bases, tmp_path, monkeypatch, capsys):
    """config.yaml names a folder with the same layer shapes but other weights: PEFT alone would attach it."""
    run = _variant(tiny_run, tmp_path, profile=str(bases["other"]))
    with pytest.raises(ModelError, match="不是同一個模型"):
        runs.open_run(run)
    _refused(COMMANDS[command](run), tmp_path, monkeypatch, capsys, "不是同一個模型", "model.profile")


@pytest.mark.parametrize(
    "profile, recorded",
    [
        ("demo", "google/medgemma-4b-it"),  # two known models
        ("medgemma-27b-text-it", "google/medgemma-4b-it"),  # same kind of name, other model
        ("TINY", "google/medgemma-27b-text-it"),  # a local folder whose shapes are not the 27B's
        ("TINY", "/home/teacher/.cache/medgemma_lib/gemma3-270m-demo"),  # the demo on another machine
    ],
)
def test_adapter_naming_another_model_is_refused(profile, recorded, tiny_run, bases, tmp_path, monkeypatch, capsys):
    profile = str(bases["tiny"]) if profile == "TINY" else profile
    run = _variant(tiny_run, tmp_path, profile=profile, recorded=recorded)
    with pytest.raises(ModelError, match="不是同一個模型"):
        runs.open_run(run)
    _refused(COMMANDS["evaluate"](run), tmp_path, monkeypatch, capsys, "不是同一個模型")


def test_the_same_base_under_other_names_is_accepted(tiny_run, bases, tmp_path):
    # a copy of the base folder elsewhere (same weights) is the same model
    assert runs.open_run(_variant(tiny_run, tmp_path / "a", profile=str(bases["copy"]))).config.model.profile == str(
        bases["copy"]
    )
    # the demo trained on one machine and evaluated on another: the cache paths differ, the model does not
    run = _variant(
        tiny_run, tmp_path / "b", profile="demo", recorded="/home/teacher/.cache/medgemma_lib/gemma3-270m-demo"
    )
    assert runs.open_run(run).config.model.profile == "demo"
    # profile name and Hub id, or a Hub cache snapshot, name the same model
    run = _variant(tiny_run, tmp_path / "c", profile="medgemma-4b-it", recorded="google/medgemma-4b-it")
    assert runs.open_run(run).config.model.profile == "medgemma-4b-it"
    snapshot = "/root/.cache/huggingface/hub/models--google--medgemma-27b-text-it/snapshots/0123abc"
    run = _variant(tiny_run, tmp_path / "d", profile="medgemma-27b-text-it", recorded=snapshot)
    assert runs.open_run(run).config.model.profile == "medgemma-27b-text-it"
    # a base recorded as a folder that does not exist here cannot be compared: not refused
    run = _variant(tiny_run, tmp_path / "e", recorded="/somewhere/else/my-model")
    assert runs.open_run(run).config.model.profile == str(bases["tiny"])


def test_base_identity_names():
    assert base_identity("medgemma-4b-it") == base_identity("google/medgemma-4b-it") == "medgemma-4b-it"
    assert base_identity("/x/models--google--medgemma-4b-it/snapshots/abc/") == "medgemma-4b-it"
    assert base_identity("C:/Users/a/.cache/medgemma_lib/gemma3-270m-demo") == "demo"
    assert base_identity("google/gemma-3-4b-it") == "google/gemma-3-4b-it"  # a Hub model the course does not know
    assert base_identity("/srv/models/medgemma") is None
