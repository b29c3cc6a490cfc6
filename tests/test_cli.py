"""CLI plumbing and the run config: Chinese messages, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import run_cli

from medgemma_lib.core.config import RunConfig, config_from_dict, load_config, save_config
from medgemma_lib.core.errors import ConfigError


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("doctor", "models"):
        assert cmd in proc.stdout


def test_unknown_command_gives_chinese_usage_error():
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "參數錯誤" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_equals_module(tmp_path):
    import shutil

    exe = shutil.which("medgemma", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "pyproject.toml must install the `medgemma` console script"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "doctor" in proc.stdout


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = RunConfig()
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_overrides_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 0.001\n  max_steps: 10\n", encoding="utf-8")
    cfg = load_config(f, ["train.learning_rate=5e-4", "lora.r=8"])
    assert cfg.train.learning_rate == 5e-4 and cfg.train.max_steps == 10 and cfg.lora.r == 8


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"train": {"learning_rat": 1e-4}}, "learning_rate"),  # typo gets a suggestion
        ({"trian": {}}, "train"),
        ({"train": {"max_steps": "many"}}, "型別"),
        ({"lora": {"r": 0}}, "太小"),
        ({"train": {"learning_rate": 5.0}}, "太大"),
        ({"model": {"quantization": "fp4"}}, "nf4"),
        ({"train": {"learning_rate": float("nan")}}, "有限"),
        ({"data": {"validation_fraction": 0.5, "test_fraction": 0.5}}, "0.9"),
        ([1, 2], "對應表"),
    ],
)
def test_bad_config_values_raise_chinese_config_error(data, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert fragment in str(info.value)


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert "第" in str(info.value) and "行" in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "找不到設定檔" in str(info.value)


def test_config_check_finds_the_data_where_training_does(repo_root, tmp_path):
    """From notebooks/ the default ``data/medquad_sample.csv`` is found in the repository, by ``config check`` as by
    the data step; a path that exists nowhere is refused with exit 2 and a Chinese message."""
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "config",
            "check",
            "--config",
            "../configs/demo.yaml",
            f"train.output_dir={tmp_path}",
        ],
        cwd=repo_root / "notebooks",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "設定檢查通過" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "config",
            "check",
            "--config",
            "../configs/demo.yaml",
            "data.input=data/no-such-file.csv",
        ],
        cwd=repo_root / "notebooks",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "找不到資料檔" in bad.stderr and "Traceback" not in bad.stderr


def test_config_show_applies_overrides_given_after_the_config_option(repo_root):
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "config",
            "show",
            "--config",
            "configs/demo.yaml",
            "lora.r=8",
            "train.max_steps=3",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "\n  r: 8\n" in shown.stdout and "\n  max_steps: 3\n" in shown.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "prepare", "--input", "data/no_such_file.csv"], "找不到輸入檔"),
        (["data", "prepare", "--input", "data/medquad_sample.csv", "--columns", "question=nope"], "'nope'"),
        (["train", "--config", "configs/demo.yaml", "data.input=data/no_such_file.csv"], "找不到資料檔"),
        (["train", "--config", "configs/demo.yaml", "train.learning_rate=-1"], "train.learning_rate"),
    ],
    ids=["data-prepare-missing-input", "data-prepare-bad-column", "train-missing-input", "train-bad-value"],
)
def test_mistakes_are_answered_before_torch_transformers_and_trl_are_imported(repo_root, argv, message):
    """A mistyped path, column or value is refused (exit 2, Chinese, the data files beside a mistyped one named) by
    checks that need no deep-learning library: none of them has been imported when the refusal is printed (the
    data step reads the file first and loads the tokenizer for token lengths only after)."""
    code = (
        "import sys\n"
        "from medgemma_lib import cli\n"
        f"rc = cli.main({argv!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', ','.join(heavy) or '-')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert "RC 2 HEAVY -" in proc.stdout, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if "no_such_file" in " ".join(argv) and argv[0] == "data":
        assert "medquad_sample.csv" in proc.stderr  # the files beside the mistyped one
