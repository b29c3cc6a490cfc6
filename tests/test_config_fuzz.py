"""Property-based fuzzing of run configs through the CLI (`config check`).

Whatever a user writes into a YAML config or on the command line, the result is either a valid
run (exit 0) or a Traditional Chinese error with exit code 2 — never a Python traceback.
"""

from __future__ import annotations

import contextlib
import io
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgemma_lib import cli
from medgemma_lib.core.config import RunConfig

SECTIONS = RunConfig().to_dict()
CJK = re.compile(r"[\u4e00-\u9fff]")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["-1", "0", "1e-4", "2e-4", "1e9", "nf4", "all-linear", "/nonexistent/path", "/proc/forbidden", "results"]
    ),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
known_key = st.sampled_from([(s, k) for s, keys in SECTIONS.items() for k in keys])
any_key = st.one_of(
    known_key, st.tuples(st.sampled_from([*SECTIONS, "trainer", "x"]), st.text(min_size=1, max_size=12))
)


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _assert_clean(code, out, err):
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        assert CJK.search(err), f"error message must be Chinese: {err!r}"
    else:
        assert "設定檢查通過" in out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(any_key, values), max_size=6))
def test_any_yaml_config_is_valid_or_a_chinese_error(tmp_path_factory, entries):
    folder = tmp_path_factory.mktemp("fuzz")
    data: dict = {}
    for (section, key), value in entries:
        data.setdefault(section, {})[key] = value
    sample = folder / "sample.csv"
    sample.write_text("question,answer\nq,a\n", encoding="utf-8")
    data.setdefault("data", {}).setdefault("input", str(sample))
    path = folder / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except yaml.YAMLError:
        return
    _assert_clean(*run_main(["config", "check", "--config", str(path)]))


@settings(max_examples=150, deadline=None)
@given(
    overrides=st.lists(
        st.one_of(
            st.builds(lambda kv, v: f"{kv[0]}.{kv[1]}={v}", any_key, st.text(max_size=15)),
            st.builds(
                lambda kv, v: f"{kv[0]}.{kv[1]}={v}",
                known_key,
                st.sampled_from(["-5", "0", "1e30", "nan", "[1,2]", "{a: 1}", "true", "", "~"]),
            ),
            st.text(max_size=15),
        ),
        max_size=4,
    )
)
def test_any_command_line_override_is_valid_or_a_chinese_error(overrides):
    _assert_clean(
        *run_main(["config", "check", "data.input=README.md", *[o for o in overrides if not o.startswith("-")]])
    )


def test_paths_that_do_not_exist_or_are_not_writable(tmp_path):
    code, _, err = run_main(["config", "check", "data.input=/no/such/file.csv"])
    assert code == 2 and "找不到資料檔" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_main(["config", "check", "data.input=README.md", f"train.output_dir={blocker}/sub"])
    assert code == 2 and "無法寫入輸出資料夾" in err
    code, _, err = run_main(["config", "check", "data.prepared_dir=/no/such/dir"])
    assert code == 2 and "data prepare" in err


def test_a_valid_config_passes():
    code, out, _ = run_main(["config", "show", "data.input=README.md", "train.learning_rate=1e-4"])
    assert code == 0 and "learning_rate: 0.0001" in out
