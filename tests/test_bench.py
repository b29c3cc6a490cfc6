"""bench: MedQuAD-shaped batches, useful-token accounting, packing that keeps examples apart,
CLI end to end (tiny, CPU)."""

from __future__ import annotations

import json

import pytest

from medgemma_lib.checks import bench, random_models
from medgemma_lib.cli import main
from medgemma_lib.models.attention import register_varlen_attention


def test_shipped_lengths_are_full_medquad():
    full, prompt = bench.load_token_lengths()
    assert len(full) == len(prompt) == 16_423
    assert sum(full) == 4_614_001  # GUIDE.md: 4.61 M tokens with the Gemma 3 chat template
    assert all(0 < p < n for n, p in zip(full, prompt))
    assert sorted(full)[len(full) // 2] == 197


def _variant(**kw):
    base = dict(name="t", description="", steps=6, warmup=0)
    base.update(kw)
    return bench.Variant(**base)


def test_padded_batches_never_count_padding():
    full = [10, 3, 700, 50, 9, 2]
    prompt = [2, 1, 20, 5, 3, 1]
    v = _variant(layout="padded", micro_batch=3, max_length=64)
    batches = bench.make_batches(v, full, prompt, 2, seed=1)
    for b in batches:
        inputs = bench.batch_tensors(b, 100, "cpu")
        mask = inputs["attention_mask"]
        assert mask.shape == (3, b.width)
        # useful tokens are exactly the unmasked ones, and each example is truncated at max_length
        assert int(mask.sum()) == b.useful_tokens == sum(min(n, 64) for row in b.rows for n, _ in row)
        assert b.tensor_tokens == 3 * b.width
        # padding never carries a label
        assert bool((inputs["labels"][mask == 0] == -100).all())


def test_grouped_batches_start_with_the_longest_and_stay_homogeneous():
    full, prompt = bench.load_token_lengths()
    v = _variant(layout="grouped", micro_batch=4, max_length=512)
    batches = bench.make_batches(v, full, prompt, 28)
    assert len(batches) == 28
    assert batches[0].width == 512
    # group_by_length keeps similar lengths together: little padding compared with random batches
    padded = bench.make_batches(_variant(layout="padded", micro_batch=4, max_length=512), full, prompt, 200)
    waste = lambda bs: 1 - sum(b.useful_tokens for b in bs) / sum(b.tensor_tokens for b in bs)  # noqa: E731
    assert waste(batches) < 0.1 < waste(padded)


def test_packed_rows_count_every_real_token_exactly():
    full = [30, 7, 120, 64, 5, 90, 33, 12, 41, 100, 8, 3]
    prompt = [3, 2, 10, 4, 1, 9, 3, 2, 5, 7, 1, 1]
    v = _variant(layout="packed", micro_batch=2, max_length=100, row_length=128)
    batches = bench.make_batches(v, full, prompt, 2, seed=3)
    seen = []
    for b in batches:
        assert all(sum(n for n, _ in row) <= 128 for row in b.rows)
        inputs = bench.batch_tensors(b, 1000, "cpu", varlen=True)
        pos, labels, ids = inputs["position_ids"], inputs["labels"], inputs["input_ids"]
        assert "attention_mask" not in inputs  # packed rows rely on position ids only
        for r, row in enumerate(b.rows):
            start = 0
            for n, p in row:
                assert pos[r, start : start + n].tolist() == list(range(n))
                assert int(ids[r, start]) == 2  # each example starts with <bos>
                assert bool((labels[r, start : start + p] == -100).all())  # prompt (and the first token) unlabelled
                assert bool((labels[r, start + p : start + n] == ids[r, start + p : start + n]).all())
                seen.append(n)
                start += n
            assert bool((labels[r, start:] == -100).all())  # the unused tail is never trained
        assert b.useful_tokens == sum(n for row in b.rows for n, _ in row)
        cu = inputs["cu_seq_lens_q"].tolist()
        assert cu[-1] == b.tensor_tokens and sorted(set(cu)) == cu
    # truncation at max_length, nothing else dropped or duplicated among the examples placed
    assert all(n <= 100 for n in seen) and 100 in seen


def test_packing_keeps_examples_apart_and_the_check_can_fail():
    for attn in ("sdpa", "varlen"):
        assert bench.packed_matches_unpacked("tiny", "cpu", attn=attn) < 1e-4
    # negative control: positions that do not restart let later examples attend to earlier ones
    assert bench.packed_matches_unpacked("tiny", "cpu", attn="sdpa", restart_positions=False) > 1e-2


@pytest.mark.slow
def test_cli_bench_tiny_cpu_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    code = main(["bench", "--arch", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in data["archs"]["tiny"]["variants"]}
    assert set(rows) == {"original", "packed"}
    for r in rows.values():
        assert r["steps_measured"] == 2 and r["warmup_steps"] == 1
        assert r["loss_finite"] and r["useful_tokens_per_s"] > 0
        assert 0 <= r["padding_share"] < 1
    assert rows["original"]["x_original"] == 1.0
    info = data["archs"]["tiny"]["model"]
    assert info["quantization"].startswith("nf4")
    table = (out / "bench.md").read_text(encoding="utf-8")
    assert "| tiny | original |" in table and "| tiny | packed |" in table and "useful tok/s" in table


def test_cli_bench_unknown_arch_is_a_chinese_error(tmp_path, capsys):
    code = main(["bench", "--arch", "70b", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "不認識的架構" in err and "27b" in err


def test_varlen_attention_finds_examples_from_position_ids_alone():
    """TRL's padding-free collator sends position ids only; the varlen attention must split on them."""
    import torch

    model, _ = random_models.build_model("tiny", "cpu", quantize=False)
    model.float().eval()
    batch = bench.Batch("packed", [[(6, 1), (9, 1), (4, 1)]], 19)
    inputs = bench.batch_tensors(batch, model.config.vocab_size, "cpu", varlen=False)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        reference = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
        model.config._attn_implementation = register_varlen_attention()
        packed = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
        # a padded batch with a mask still works (falls back to sdpa with the mask)
        ids = inputs["input_ids"][:, :6].repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        padded = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        padded_ref = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(packed, reference, atol=1e-5)
    assert torch.allclose(padded[mask.bool()], padded_ref[mask.bool()], atol=1e-5)


def test_prequantised_checkpoint_loads_to_the_same_model_without_quantising_again(tmp_path):
    """The NF4 checkpoint `bench --unsloth` gives Unsloth (the Hub's `*-bnb-4bit` format): from_pretrained
    reads the packed weights and their quantisation states as written, so its logits are the built model's
    exactly, in shards that name every tensor once; another seed gives other weights (the test can fail)."""
    import torch
    from transformers import AutoModelForCausalLM

    info = random_models.save_prequantised("tiny", tmp_path, "cpu", seed=3, shard_gib=0.001)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert info["shards"] > 1 and len(set(index["weight_map"].values())) == info["shards"]
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding, as the config says
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in index["weight_map"])
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True

    built, _ = random_models.build_model("tiny", "cpu", seed=3, storage=torch.uint8)
    other, _ = random_models.build_model("tiny", "cpu", seed=4, storage=torch.uint8)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"})
    down = loaded.model.layers[0].mlp.down_proj
    assert down.__class__.__name__ == "Linear4bit" and down.weight.dtype == torch.uint8
    assert torch.equal(down.weight.data, built.model.layers[0].mlp.down_proj.weight.data)  # not quantised again
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # from_pretrained returns an eval-mode model: on an AVX512-BF16 CPU bitsandbytes would then repack its weights
    # into the CPU inference layout (bf16 gemv) at the first forward, and the logits would differ from the built
    # model's for that reason alone. Compare both in the trainable layout, with the AVX512-BF16 flag on everywhere,
    # so that every CPU kind runs this test the same way.
    for model in (built, other, loaded):
        model.train()
        for m in model.modules():
            if m.__class__.__name__ == "Linear4bit":
                m.support_avx512bf16_for_cpu = True
    ids = torch.randint(0, built.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = built(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        far = other(input_ids=ids).logits
    assert torch.equal(got, want)
    assert (far - want).abs().max() > 1e-2
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit(loaded))


def _linear4bit(model):
    return [m for m in model.modules() if m.__class__.__name__ == "Linear4bit"]
