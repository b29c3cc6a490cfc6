"""`python -m medgemma_lib data prepare` as a user runs it: success on the sample, exit 2 on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from cli_helpers import run_cli

ZH = [
    ("什麼是糖尿病？", "糖尿病是一種慢性代謝疾病，血糖長期偏高，需要飲食控制與規律運動。"),
    ("高血壓要終身服藥嗎？", "多數患者需要長期服藥，請依照醫師指示，並定期量測血壓。"),
] * 3


def _run(args, cwd):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "MEDGEMMA_DEBUG": "0"}
    return run_cli("data", "prepare", *args, cwd=cwd, env=env, timeout=300)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        digest.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_prepare_shipped_sample(repo_root, tmp_path):
    result = _run(
        ["--input", "data/medquad_sample.csv", "--output", str(tmp_path / "prepared"), "--tokenizer", "none"], repo_root
    )
    assert result.returncode == 0, result.stderr
    assert "讀入 1,057 筆 ＝ 保留 1,057 筆 ＋ 捨棄 0 筆" in result.stdout
    assert "跨集合的主題 0 個" in result.stdout
    report = json.loads((tmp_path / "prepared" / "prepare_report.json").read_text(encoding="utf-8"))
    assert report["counts"]["rows_in"] == 1057
    # A second run refuses to overwrite, --overwrite replaces it.
    again = _run(
        ["--input", "data/medquad_sample.csv", "--output", str(tmp_path / "prepared"), "--tokenizer", "none"], repo_root
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    third = _run(
        [
            "--input",
            "data/medquad_sample.csv",
            "--output",
            str(tmp_path / "prepared"),
            "--tokenizer",
            "none",
            "--overwrite",
            "--seed",
            "3",
            "--max-train-examples",
            "50",
        ],
        repo_root,
    )
    assert third.returncode == 0, third.stderr
    assert (
        json.loads((tmp_path / "prepared" / "prepare_report.json").read_text(encoding="utf-8"))["counts"]["final"][
            "train"
        ]
        == 50
    )
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary folders left behind
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    stats = run_cli(
        "data",
        "stats",
        str(tmp_path / "prepared"),
        cwd=repo_root,
        env=env,
        timeout=120,
    )
    assert stats.returncode == 0 and "目前資料夾中的筆數：train 50" in stats.stdout


def test_cli_options_and_config(repo_root, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "data:\n  input: data/zh_toyhom_sample_gb18030.csv\n  columns: {question: ask, answer: answer}\n  seed: 5\n",
        encoding="utf-8",
    )
    result = _run(
        ["--config", str(cfg), "--convert", "s2twp", "--val-fraction", "0.2", "--tokenizer", "none", "--json"],
        repo_root,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["options"]["seed"] == 5 and report["options"]["chinese_conversion"] == "s2twp"
    assert report["options"]["validation_fraction"] == 0.2 and report["input"]["encoding"] == "gb18030"


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else lambda c: path.write_text(c, encoding="utf-8"))(content)
    return path


def _zh_csv(encoding="utf-8") -> bytes:
    return ("question,answer\n" + "".join(f"{q},{a}\n" for q, a in ZH)).encode(encoding)


# name -> (files to create {relative path: content}, extra CLI args, words the message must contain)
BAD_INPUTS = {
    "wrong encoding": ({"in.csv": _zh_csv("cp950")}, ["--encoding", "utf-8"], ["無法以指定的編碼", "第 2 行"]),
    "ambiguous encoding": (
        {"in.csv": "question,answer\n頭痛,休息\n".encode("cp950")},
        [],
        ["編碼無法確定", "--encoding"],
    ),
    "missing column": ({"in.csv": "ask,reply\nq,a\n"}, [], ["缺少必要欄位", "ask, reply", "--columns"]),
    "bad column mapping": (
        {"in.csv": "ask,reply\nq,a\n"},
        ["--columns", "question=ask,answer=answer"],
        ["沒有 --columns 指定的欄位", "ask, reply"],
    ),
    "empty file": ({"in.csv": b""}, [], ["是空的"]),
    "header only": ({"in.csv": "question,answer\n"}, [], ["只有標題列"]),
    "all answers empty": ({"in.csv": "question,answer\nq1,\nq2,  \nq3,\n"}, [], ["一筆都不剩", "答案是空的 3 筆"]),
    "malformed quoting": ({"in.csv": 'question,answer\n"ok","fine"\n"broken,"no end\nq,a\n'}, [], ["第 3 行", "引號"]),
    "binary garbage": ({"in.csv": bytes(range(256)) * 64}, [], ["不是文字檔"]),
    "unknown format": ({"in.xlsx": b"PK\x03\x04 not really excel"}, [], ["無法從檔名判斷", "CSV"]),
    "unreadable path": ({}, [], ["找不到輸入檔"]),
    "input is a folder without xml": ({"folder/readme.txt": "hi"}, ["--format", "xml"], ["找不到任何 .xml"]),
    "jsonl all broken": ({"in.jsonl": "{bad\n[1]\n"}, [], ["2 行都無法解析", "第 1 行"]),
    "csv wrong field counts": (
        {"in.csv": "question,answer\nq1,a1,extra\nq2\n"},
        [],
        ["欄位數都與標題列不符", "第 2 行"],
    ),
    "too few groups to split": ({"in.csv": "question,answer,focus_area\nq1,a1,X\nq2,a2,X\n"}, [], ["資料太少"]),
    "bad fractions": ({"in.csv": _zh_csv()}, ["--val-fraction", "0.5", "--test-fraction", "0.5"], ["加起來太大"]),
    "refuse personal data": (
        {
            "in.csv": "question,answer\n"
            + "".join(f"問{i},答{i}\n" for i in range(20))
            + "電話 0912-345-678,請聯絡王小明醫師\n"
        },
        ["--deidentify", "refuse"],
        ["個人資料"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_exits_2_with_chinese_message_and_no_output(kind, tmp_path):
    files, extra, words = BAD_INPUTS[kind]
    for name, content in files.items():
        _write(tmp_path / name, content)
    target = next(iter(files), "missing.csv").split("/")[0]
    out = tmp_path / "out" / "prepared"
    result = _run(["--input", target, "--output", str(out), "--tokenizer", "none", *extra], tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("錯誤：") and "解決方法：" in result.stderr
    assert re.search(r"[\u4e00-\u9fff]{4}", result.stderr)
    for word in words:
        assert word in result.stderr, f"{word!r} not in {result.stderr!r}"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_output_not_writable_and_existing_output_unchanged(repo_root, tmp_path):
    blocker = _write(tmp_path / "a_file", "x")
    result = _run(
        ["--input", "data/medquad_sample.csv", "--output", str(blocker / "sub"), "--tokenizer", "none"], repo_root
    )
    assert result.returncode == 2 and "是檔案，不是資料夾" in result.stderr and "Traceback" not in result.stderr
    existing = tmp_path / "mine"
    _write(existing / "notes.txt", "my own notes")
    before = _tree_digest(existing)
    for extra in ([], ["--overwrite"]):
        result = _run(
            ["--input", "data/medquad_sample.csv", "--output", str(existing), "--tokenizer", "none", *extra], repo_root
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _tree_digest(existing) == before


def test_failure_after_a_good_run_leaves_the_old_output_unchanged(repo_root, tmp_path):
    out = tmp_path / "prepared"
    assert (
        _run(["--input", "data/medquad_sample.csv", "--output", str(out), "--tokenizer", "none"], repo_root).returncode
        == 0
    )
    before = _tree_digest(out)
    bad = _write(tmp_path / "bad.csv", "question,answer\n")
    result = _run(["--input", str(bad), "--output", str(out), "--tokenizer", "none", "--overwrite"], repo_root)
    assert result.returncode == 2 and _tree_digest(out) == before
