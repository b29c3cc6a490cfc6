"""Streaming (shard-by-shard) export equals PEFT's ``merge_and_unload``; truncated shards are refused before writing."""

from __future__ import annotations

import shutil

import pytest
from _lora_runs import make_run

from medgemma_lib import cli
from medgemma_lib.core.errors import EXIT_USER_ERROR, ModelError
from medgemma_lib.core.weightfiles import model_shards
from medgemma_lib.export import merge as ex

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_model_dir):
    """The tiny random Gemma 3 re-saved in several small shards, with an all-linear adapter (non-zero B)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("sharded") / "base"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.save_pretrained(base, max_shard_size="3MB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, base / f.name)
    run = make_run(base.parent / "run", str(base), str(base), "none", targets=ALL_LINEAR, b_scale=0.5)
    return run, base


@pytest.fixture(scope="module")
def token_rows_run(sharded_run):
    """The same sharded base with an adapter that also trained the turn tokens' embedding rows (105, 106)."""
    _, base = sharded_run
    run = make_run(
        base.parent / "run-rows",
        str(base),
        str(base),
        "none",
        targets=ALL_LINEAR,
        b_scale=0.5,
        token_ids=[105, 106],
        seed=2,
    )
    return run, base


@pytest.mark.slow
def test_stream_merge_writes_trained_embedding_rows_as_peft_does(token_rows_run, tmp_path):
    """A stop-token adapter: the two rows replace the base's (PEFT's merge), every other row stays bit-identical."""
    import torch

    run, base = token_rows_run
    out = ex.merge_adapter(run, tmp_path / "m", dtype="float32", method="stream", verbose=False)
    got, want, original = _state(out), _peft_reference(run, "float32"), _state(base)
    key = "model.embed_tokens.weight"
    moved = (got[key] != original[key]).any(dim=1).nonzero().flatten().tolist()
    assert moved == [105, 106]
    assert torch.equal(got[key], want[key])
    for k, w in want.items():
        if k in got:
            assert torch.allclose(got[k], w, rtol=1e-6, atol=1e-6), k
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    # tied output layer: the reloaded model scores with the trained rows too
    assert torch.equal(reloaded.get_output_embeddings().weight[106], got[key][106])


def _state(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _peft_reference(run, dtype):
    pair, _, _ = ex.load_merge_pair(run, dtype, "cpu")
    return {k: v.detach().clone() for k, v in pair.merge_and_unload().state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stream_merge_equals_peft_merge_and_unload(sharded_run, tmp_path, dtype):
    import torch

    run, base = sharded_run
    assert len(model_shards(base)) > 1  # the multi-shard case really is exercised
    out = ex.merge_adapter(run, tmp_path / "m", dtype=dtype, method="stream", verbose=False)
    got, want, original = _state(out), _peft_reference(run, dtype), _state(base)
    assert (out / "model.safetensors.index.json").is_file()
    assert set(want) - set(got) <= {"lm_head.weight"}  # tied to the embedding, stored once
    changed = 0
    for key, w in want.items():
        if key not in got:
            continue
        g = got[key]
        assert g.dtype == getattr(torch, dtype) and g.shape == w.shape, key
        if dtype == "float32":
            assert torch.allclose(g, w, rtol=1e-6, atol=1e-6), key
        else:  # PEFT rounds ΔW to bf16, then W + ΔW: each operand's rounding (2^-8 relative) bounds the gap
            base_w, w32 = original[key].float(), w.float()
            tol = 2**-7 * (base_w.abs() + (w32 - base_w).abs() + w32.abs()) + 1e-30
            assert ((g.float() - w.float()).abs() <= tol).all(), key
        if not torch.equal(original[key].to(g.dtype), g):
            changed += 1
    assert changed == 7 * 2  # every LoRA layer of both blocks moved, nothing else
    manifest = __import__("json").loads((out / ex.EXPORT_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["merge_method"] == "stream" and manifest["merge_device"] == "cpu"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype))  # a normal folder
    assert torch.equal(
        reloaded.state_dict()["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.slow
def test_auto_streams_when_the_model_does_not_fit(sharded_run, tmp_path, monkeypatch, capsys):
    run, base = sharded_run
    monkeypatch.setattr(ex, "available_ram_bytes", lambda: 1000)
    assert ex.choose_merge_method(base, "bfloat16")[0] == "stream"
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "a")]) == 0
    assert "逐檔合併" in capsys.readouterr().out
    monkeypatch.setattr(ex, "available_ram_bytes", lambda: 10**15)
    method, reason = ex.choose_merge_method(base, "bfloat16")
    assert method == "memory" and "整個模型" in reason
    assert ex.choose_merge_method(base, "bfloat16", "stream")[0] == "stream"


def test_merge_device_selection(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ex.merge_device("auto") == "cpu" and ex.merge_device("cpu") == "cpu"
    with pytest.raises(Exception, match="沒有可用的 CUDA"):
        ex.merge_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ex.merge_device("auto") == "cuda"


@pytest.mark.parametrize("method", ["stream", "memory"])
def test_truncated_shard_is_refused_before_anything_is_written(sharded_run, tmp_path, method, capsys):
    run, base = sharded_run
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    run2 = make_run(tmp_path / "run", str(base), str(broken), "none", targets=ALL_LINEAR)
    with pytest.raises(ModelError, match="不完整"):
        ex.merge_adapter(run2, tmp_path / "out", method=method, verbose=False)
    assert cli.main(["export", "--run", str(run2), "--merge", method]) == EXIT_USER_ERROR
    assert "不完整" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (run2 / "merged").exists()
    assert not [p for p in run2.iterdir() if p.name.startswith(".")]


def test_one_shard_with_an_index_keeps_its_index(sharded_run, tmp_path):
    """A base saved as ``model-00001-of-00001.safetensors`` + index: the streamed copy must still load."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    run, sharded = sharded_run
    base = tmp_path / "base1"
    shutil.copytree(sharded, base)
    state = _state(sharded)
    for f in base.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(base / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")})
    )
    out = tmp_path / "merged"
    out.mkdir()
    info = ex.stream_merge(base, run / "adapter", out)
    assert info["shards"] == 1 and info["merged_layers"] == 14
    for f in base.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    merged = load_file(str(out / "model-00001-of-00001.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(reloaded.state_dict()[key], merged[key])
    assert not torch.equal(merged[key], state[key].to(merged[key].dtype))  # the adapter really was added
