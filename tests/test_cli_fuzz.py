"""Property-based tests of every sub-command: any YAML shape, any argument value of any type and sign.

The sub-commands are read from the argparse parser (``cli.build_parser``), so a new one is covered
without editing this file. Each call gives exit 0, or exit 2 with a Traditional Chinese message and
no traceback, and a refused call (exit 2) leaves no file or folder behind (the working folder, the
repository's ``results/`` and the output options are compared before and after).

Commands whose real work takes minutes (training, evaluation, chat, export, benchmarks) are run up
to the point where that work starts: loading a model or picking the device raises :class:`Reached`.
Everything before it is validation, and must refuse or pass like the other commands. ``config check``
and ``train`` are compared on every generated config: check passes exactly when train gets past its
validation, and both refuse with the same message otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgemma_lib import cli
from medgemma_lib.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")
SECTIONS = RunConfig().to_dict()
# derandomize: CI explores the same cases on every machine (a red CI must be reproducible); FUZZ_EXAMPLES=500
# explores more, locally.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_EXAMPLES"),
    database=None if not os.environ.get("FUZZ_EXAMPLES") else settings.default.database,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Reached(Exception):
    """The command got past its validation and was about to start its real work."""


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple = ()):
    """``(path, parser)`` for every command and sub-action (``config check``, ``data prepare``…) and each group."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if prefix:
        yield prefix, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_commands(child, (*prefix, name))


COMMANDS = dict(leaf_commands(cli.build_parser()))

_STEP_MODULES = (
    "setup.env",
    "setup.auth",
    "data",
    "setup.memory",
    "models.loading",
    "training.train",
    "demo",
    "evaluation.evaluate",
    "evaluation.quality",
    "evaluation.chat",
)
_HEAVY = ("load_model", "load_tokenizer", "ensure_demo_model", "default_device")


@pytest.fixture(scope="module")
def heavy_work_stops():
    """Replace model loading and device choice (wherever a step module imported them) by :class:`Reached`."""
    import importlib

    from medgemma_lib.checks import bench, gradcheck, trainbench, unsloth
    from medgemma_lib.export import merge as export
    from medgemma_lib.models import loading as models

    mods = [importlib.import_module(f"medgemma_lib.{m}") for m in _STEP_MODULES] + [bench, export, gradcheck]
    mods += [m for name, m in sys.modules.items() if name.startswith("medgemma_lib.") and m not in mods]

    def stop(*args, **kwargs):
        raise Reached

    saved = []
    for mod in mods:
        for name in _HEAVY:
            if getattr(mod, name, None) is getattr(models, name):
                saved.append((mod, name, getattr(mod, name)))
    for mod, name in [
        (bench, "run_bench"),
        (unsloth, "run_unsloth"),
        (bench, "packed_matches_unpacked"),
        (trainbench, "run"),
    ]:
        saved.append((mod, name, getattr(mod, name)))
    for mod, name, _ in saved:
        setattr(mod, name, stop)
    yield
    for mod, name, original in saved:
        setattr(mod, name, original)


def run_main(argv, stdin: str = ""):
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse usage errors and --help
                code = exc.code
            except Reached:
                code = "reached"
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def snapshot(*folders: Path) -> set:
    seen = set()
    for folder in folders:
        if folder.exists():
            for dirpath, _dirnames, filenames in os.walk(folder):
                seen.add(dirpath)
                seen.update(os.path.join(dirpath, f) for f in filenames)
    return seen


def check_outcome(code, out, err):
    assert code in (0, 2, "reached"), (code, out[-500:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err
    if code == 2:
        assert CJK.search(err) or CJK.search(out), f"a refusal must be Chinese: {err!r} {out!r}"


# ----------------------------------------------------------------------------------------------
# Argument values of any type and sign


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    (tmp_path / "qa.csv").write_text("question,answer\nWhat is flu?,A virus infection.\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


numbers_as_text = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["-3", "0", "-0", "1", "0.5", "1e309", "nan", "-inf", "1e-300", "3.", "0x10", "1_000", "２"]),
)
any_text = st.one_of(
    numbers_as_text,
    st.text(max_size=12).filter(lambda s: "\x00" not in s),
    st.sampled_from(["", " ", "qa.csv", "empty.txt", "bad.yaml", "folder", "no/such/file", "/proc/nope", "a/b/c"]),
    st.sampled_from(["demo", "all-linear", "q_proj,", ",", "cpu", "cuda", "27b", "tiny", "none", "nf4"]),
)


def _value(action: argparse.Action):
    if action.choices:
        return st.one_of(st.sampled_from(sorted(map(str, action.choices))), any_text)
    return any_text


def argv_for(parser: argparse.ArgumentParser):
    """A strategy of argument lists for one parser: any subset of its options with values of any type and sign."""
    parts = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:  # positional
            if action.nargs in ("*", "+", argparse.REMAINDER):
                parts.append(st.lists(any_text.filter(lambda s: not s.startswith("-")), max_size=3))
            else:
                parts.append(any_text.filter(lambda s: not s.startswith("-")).map(lambda v: [v]))
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            parts.append(st.sampled_from([[], [flag]]))
        else:
            required = action.required
            values = _value(action).map(lambda v, f=flag: [f"{f}={v}"])
            parts.append(values if required else st.one_of(st.just([]), values))
    return st.tuples(*parts).map(lambda lists: [x for xs in lists for x in xs]) if parts else st.just([])


def test_every_sub_command_is_covered():
    names = {" ".join(path) for path in COMMANDS}
    top = {a.dest for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)}
    assert top == {"command"}
    for expected in ("doctor", "config check", "config show", "data prepare", "memory", "train", "export", "chat"):
        assert expected in names
    assert len({p[0] for p in COMMANDS}) == len(cli.COMMANDS)  # every registered command has a parser here


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: "-".join(p))
def test_any_arguments_exit_0_or_a_chinese_refusal_that_writes_nothing(path, workdir, heavy_work_stops):
    parser = COMMANDS[path]

    @FUZZ
    @given(args=argv_for(parser))
    def check(args):
        before = snapshot(workdir, ROOT / "results")
        code, out, err = run_main([*path, *args])
        check_outcome(code, out, err)
        if code == 2:
            assert snapshot(workdir, ROOT / "results") == before, f"a refused call wrote files: {args}"

    check()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["memory", "--gpu-gib", "-3"], "--gpu-gib"),
        (["memory", "--gpu-gib", "abc"], "不是數字"),
        (["memory", "--batch", "0"], "至少 1"),
        (["memory", "--seq", "2.5"], "不是整數"),
        (["memory", "--lora-dropout", "nan"], "有限"),
        (["chat", "--run", "x", "--top-p", "0"], "大於 0"),
        (["evaluate", "--run", "x", "--num-generate", "-1"], "至少 0"),
        (["bench", "--steps", "-5"], "--steps"),
        (["trainbench", "--warmup", "0"], "至少 1"),
    ],
)
def test_numeric_options_of_wrong_sign_or_type_are_refused_in_chinese(argv, fragment, workdir):
    before = snapshot(workdir)
    code, out, err = run_main(argv)
    assert code == 2 and fragment in err and "參數錯誤" in err and "例如" in err
    assert snapshot(workdir) == before


# ----------------------------------------------------------------------------------------------
# Config files of any YAML shape; `config check` agrees with `train`

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["demo", "nope", "qa.csv", "folder", "results", "bad.yaml", "/no/where", "1e-4", "-1", "a/b"]),
)
yaml_any = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = {
    ("model", "profile"): st.sampled_from(["demo", "medgemma-4b-it", "nope", "folder", "qa.csv", "", "google/x"]),
    ("data", "input"): st.sampled_from(["qa.csv", "missing.csv", "folder", "", "data/medquad_sample.csv"]),
    ("train", "output_dir"): st.sampled_from(["results", "out/new", "qa.csv/sub", "/proc/forbidden", ""]),
    ("train", "run_name"): st.sampled_from(["run1", "../up", "a/b", ".", " ", "qa.csv"]),
}
known = [(s, k) for s, keys in SECTIONS.items() for k in keys]
sectioned = st.lists(
    st.one_of(
        st.sampled_from(list(field_values)).flatmap(lambda sk: field_values[sk].map(lambda v, sk=sk: (sk, v))),
        st.tuples(st.sampled_from(known), yaml_any),
    ),
    max_size=6,
).map(lambda items: _nest(items))
documents = st.one_of(
    yaml_any, sectioned, st.sampled_from(["", "---\n", "~", "[]", "{}", "model: 3", "a: [1, {b: 2}]"])
)


def _nest(items) -> dict:
    data: dict = {}
    for (section, key), value in items:
        data.setdefault(section, {})[key] = value
    return data


@pytest.fixture()
def local_model_folder(workdir):
    """A folder that names itself a model but has no config.json, and one whose config.json is broken."""
    (workdir / "nomodel").mkdir()
    broken = workdir / "brokenmodel"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    return workdir


@FUZZ
@given(doc=documents)
def test_config_check_and_train_agree_on_any_yaml(doc, local_model_folder, heavy_work_stops):
    workdir = local_model_folder
    path = workdir / "c.yaml"
    if isinstance(doc, str):
        path.write_text(doc, encoding="utf-8")
    else:
        try:
            path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        except (yaml.YAMLError, ValueError):
            return
    before = snapshot(workdir, ROOT / "results")
    check = run_main(["config", "check", "--config", str(path)])
    train = run_main(["train", "--config", str(path)])
    check_outcome(*check)
    check_outcome(*train)
    if check[0] == 0:
        assert "設定檢查通過" in check[1]
        assert train[0] == "reached", f"check passed but train refused: {train[2]}"
    else:
        assert train[0] == 2, "check refused but train went on"
        assert check[2].splitlines()[0] == train[2].splitlines()[0]  # the same refusal
    assert snapshot(workdir, ROOT / "results") == before  # train stops before creating its run folder


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.profile=no-such-model"], "不認識"),
        (["model.profile=nomodel"], "config.json"),
        (["model.profile=brokenmodel"], "無法讀取模型設定"),
        (["data.input=missing.csv"], "找不到資料檔"),
        (["train.output_dir=qa.csv/sub"], "無法寫入輸出資料夾"),
        (["train.run_name=../elsewhere"], "單一資料夾名稱"),
    ],
)
def test_refusals_that_came_too_late_now_come_from_check_and_train_alike(
    overrides, fragment, local_model_folder, heavy_work_stops
):
    workdir = local_model_folder
    base = ["data.input=qa.csv", "train.output_dir=results"]
    before = snapshot(workdir, ROOT / "results")
    for command in (["config", "check"], ["train", "--config", str(ROOT / "configs" / "demo.yaml")]):
        code, _, err = run_main([*command, *base, *overrides])
        assert code == 2 and fragment in err, (command, err)
    assert snapshot(workdir, ROOT / "results") == before and not (workdir / "results").exists()


@pytest.mark.parametrize("text, shape", [("- a\n- b\n", "清單"), ("just text\n", "文字"), ("42\n", "整數")])
def test_top_level_not_a_mapping_is_a_chinese_error(text, shape, workdir):
    (workdir / "c.yaml").write_text(text, encoding="utf-8")
    code, _, err = run_main(["config", "check", "--config", "c.yaml", "train.max_steps=3"])
    assert code == 2 and "最上層必須是對應表" in err and shape in err and "Traceback" not in err
