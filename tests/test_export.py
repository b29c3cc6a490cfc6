"""Export: the merged folder loads with plain transformers and answers exactly like base + adapter
(demo model, bf16; tiny model, fp32), refuses to clobber, and the Hub push validates its inputs."""

from __future__ import annotations

import json

import pytest
from _lora_runs import make_run

from medgemma_lib import cli
from medgemma_lib.core.errors import EXIT_USER_ERROR, AuthError, ConfigError, ModelError, OutputError
from medgemma_lib.export import merge as ex

QUESTIONS = ["What are the symptoms of diabetes?", "糖尿病的症狀是什麼?"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    return make_run(
        tmp_path_factory.mktemp("export-runs") / "tiny-run", str(tiny_model_dir), str(tiny_model_dir), "none"
    )


def _logits(model, tok, question):
    import torch

    from medgemma_lib.models.generation import build_prompt

    ids = tok(build_prompt(tok, question), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


def _check_standalone(folder, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        ex.EXPORT_MANIFEST,
    } <= names
    assert any(n.endswith(".safetensors") for n in names) and not any("adapter" in n for n in names)
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert {1, 106} <= set(gen["eos_token_id"])
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert "<start_of_turn>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    return model, tok


@pytest.mark.slow
def test_tiny_fp32_merge_is_exact(tiny_run):
    out = ex.merge_adapter(tiny_run, dtype="float32", verbose=False)
    assert out == tiny_run / "merged-float32" and not list(tiny_run.glob(".merged*tmp*"))
    merged, tok = _check_standalone(out, "float32")
    pair, _, _ = ex.load_merge_pair(tiny_run, "float32")
    want = _logits(pair, tok, QUESTIONS[0])
    got = _logits(merged, tok, QUESTIONS[0])
    with pair.disable_adapter():
        base = _logits(pair, tok, QUESTIONS[0])
    assert (want - base).abs().max() > 1e-3  # the adapter changes the model: skipping the merge would fail below
    assert (got - want).abs().max() < 1e-4
    result = ex.verify_export(out, tiny_run, QUESTIONS, max_new_tokens=8, verbose=False)
    assert result["same"] and result["exported_ids"] == result["adapter_ids"] and result["merge_error_ratio"] < 1e-3


def test_existing_output_is_not_overwritten(tiny_run, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(OutputError, match="已經存在"):
        ex.merge_adapter(tiny_run, target, verbose=False)
    assert cli.main(["export", "--run", str(tiny_run), "--output", str(target)]) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err and (target / "keep.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("dtype, error", [("float16", "float16"), ("int4", "不支援")])
def test_bad_dtype(tiny_run, dtype, error):
    from medgemma_lib.core.errors import MedgemmaError

    with pytest.raises(MedgemmaError, match=error):
        ex.merge_adapter(tiny_run, dtype=dtype, verbose=False)


def test_bad_run_folders_exit_2(tmp_path, tiny_run, capsys):
    import shutil

    assert cli.main(["export", "--run", str(tmp_path / "missing")]) == EXIT_USER_ERROR
    assert "找不到執行資料夾" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "adapter", broken / "adapter")
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelError, match="損毀"):
        ex.merge_adapter(broken, verbose=False)
    assert not (broken / "merged").exists()


@pytest.mark.parametrize("repo_id", ["", "no-owner", "a/b/c", "me/有中文", "me/name with space", "me/../x", "me/x.git"])
def test_repo_id_validation(repo_id, tiny_run, capsys):
    with pytest.raises(ConfigError, match="格式不正確"):
        ex.check_repo_id(repo_id)
    # The CLI refuses before spending minutes on merging.
    assert (
        cli.main(["export", "--run", str(tiny_run), "--output", str(tiny_run / "never"), "--push-to-hub", repo_id])
        == EXIT_USER_ERROR
    )
    assert not (tiny_run / "never").exists()


@pytest.mark.slow
def test_push_needs_token_and_uploads_privately(tiny_run, tmp_path, monkeypatch):
    out = ex.merge_adapter(tiny_run, tmp_path / "export", dtype="float32", verbose=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # read at import time
    with pytest.raises(AuthError, match="權杖"):
        ex.push_to_hub(out, "me/medgemma-zh-demo", verbose=False)
    with pytest.raises(ModelError, match="不是匯出的模型資料夾"):
        ex.push_to_hub(tmp_path, "me/medgemma-zh-demo", token="hf_fake_token_1234", verbose=False)

    calls = []

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://example.invalid/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = ex.push_to_hub(out, "me/medgemma-zh-demo", token="hf_fake_token_1234", verbose=False)
    assert url.endswith("me/medgemma-zh-demo")
    assert calls[0] == ("init", "hf_fake_token_1234")
    assert calls[1][2]["private"] is True
    assert calls[2][1]["folder_path"] == str(out) and calls[2][1]["repo_id"] == "me/medgemma-zh-demo"


@pytest.mark.slow
def test_demo_export_answers_like_base_plus_adapter(tmp_path, demo_model_dir):
    """The acceptance test on the real Gemma 3 270M with non-zero LoRA weights.

    fp32: the merged folder gives exactly the greedy answer of base + adapter. bf16: W + ΔW is
    rounded to 8 significant bits, so near-tied tokens may flip; the next-token logits must stay
    within 25 % (L2) of the adapter's own effect (a skipped merge would be 100 %).
    """
    run = make_run(tmp_path / "demo-run", str(demo_model_dir), "demo", "nf4", b_scale=0.2)
    out = ex.merge_adapter(run, dtype="bfloat16", verbose=False)
    assert out == run / "merged"
    _check_standalone(out, "bfloat16")
    bf16 = ex.verify_export(out, run, QUESTIONS, max_new_tokens=8, verbose=False)
    assert bf16["merge_error_ratio"] < ex.MAX_MERGE_ERROR_RATIO and ex.verify_passed(bf16), bf16
    out32 = ex.merge_adapter(run, dtype="float32", verbose=False)
    fp32 = ex.verify_export(out32, run, QUESTIONS, max_new_tokens=16, verbose=False)
    assert fp32["adapter_changes_answers"], fp32  # otherwise this test could not tell a skipped merge
    assert fp32["same"] and fp32["merge_error_ratio"] < 1e-3, fp32
    assert all(fp32["exported"])


def test_verify_markdown_shows_each_answer_under_the_disclaimer():
    from medgemma_lib import MEDICAL_DISCLAIMER

    check = {"dtype": "bfloat16", "questions": ["What is *flu*?"], "exported": ["A"], "adapter": ["B"], "base": [""]}
    text = ex.verify_markdown(check).data
    assert "**問：What is \\*flu\\*?**" in text and "匯出的模型（bf16）：A" in text
    assert "（bf16，未合併）：B" in text and "基礎模型（未微調）：（空白）" in text
    assert text.endswith(f"> {MEDICAL_DISCLAIMER}") and text.count(MEDICAL_DISCLAIMER) == 1
