"""data.mix: other sources sampled into train by fraction, their test splits held out as test_mix."""

from __future__ import annotations

import csv
import dataclasses
import re

import pytest
import yaml
from cli_helpers import run_cli_here

from medgemma_lib.core.config import DataSection, config_from_dict
from medgemma_lib.core.errors import ConfigError
from medgemma_lib.data import format_report, load_prepared, mix_table, prepare_from_config, prepare_records

ZH_COLUMNS = {"question": "ask", "answer": "reply", "focus_area": "department"}


def _write(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def files(tmp_path):
    main = _write(
        tmp_path / "main.csv",
        ["question", "answer", "focus_area"],
        [(f"What is condition {i}?", f"Condition {i} is treatable.", f"Topic {i // 2}") for i in range(200)],
    )
    zh = _write(
        tmp_path / "zh_simplified.csv",
        ["ask", "reply", "department"],
        [
            (f"第{i}个问题：电脑软件让我头痛怎么办？", f"回答{i}：请少用软件，头痛持续请就医。", f"科{i // 3}")
            for i in range(90)
        ],
    )
    small = _write(
        tmp_path / "small_zh.csv",
        ["question", "answer", "focus_area"],
        [(f"小问题{i}：血压高吗？", f"小回答{i}：请测量血压。", f"组{i}") for i in range(20)],
    )
    return {"main": main, "zh": zh, "small": small}


def _cfg(files, mix, **kw) -> DataSection:
    return config_from_dict({"data": {"input": str(files["main"]), "mix": mix, **kw}}).data


def _zh(files, fraction, **kw):
    return {"input": str(files["zh"]), "fraction": fraction, "chinese_conversion": "s2twp", "columns": ZH_COLUMNS, **kw}


def _ids(records):
    return [r["id"] for r in records]


def test_counts_follow_the_formula(files):
    plain, plain_report = prepare_records(_cfg(files, []))
    n_main = len(plain["train"])
    assert n_main == 160 and plain_report["counts"]["final"] == {"train": 160, "validation": 20, "test": 20}
    mix = [_zh(files, 0.2), {"input": str(files["small"]), "fraction": 0.1}]
    by_split, report = prepare_records(_cfg(files, mix))
    n_total = n_main / (1 - 0.3)  # 228.57...
    expected = {"zh_simplified": round(0.2 * n_total), "small_zh": round(0.1 * n_total)}
    assert expected == {"zh_simplified": 46, "small_zh": 23}
    sources = {s["name"]: s for s in report["mix"]["sources"]}
    assert {name: s["sampled_into_train"] for name, s in sources.items()} == expected
    assert len(by_split["train"]) == report["mix"]["train_total"] == 160 + 46 + 23
    counted = {name: sum(r.get("mix_source") == name for r in by_split["train"]) for name in expected}
    assert counted == expected
    assert sum("mix_source" not in r for r in by_split["train"]) == 160  # main records carry no mix_source
    assert sources["zh_simplified"]["fraction_actual"] == round(46 / 229, 6)
    assert abs(sources["small_zh"]["fraction_actual"] - 0.1) < 1 / 229
    for s in sources.values():
        assert s["rows_in"] == s["kept"] + sum(s["dropped"].values())
        assert s["leakage"] == {"focus_areas_in_two_splits": 0, "questions_in_two_splits": 0}
    assert sources["zh_simplified"]["splits"] == {"train": 72, "validation": 9, "test": 9}
    assert sources["small_zh"]["splits"] == {"train": 16, "validation": 2, "test": 2}
    # validation: fraction > 0 sources add all of theirs (no max_eval_examples); test_mix: every source's test split
    assert len(by_split["validation"]) == 20 + 9 + 2
    assert [r["mix_source"] for r in by_split["test_mix"]] == ["zh_simplified"] * 9 + ["small_zh"] * 2
    assert report["counts"]["final"] == {"train": 229, "validation": 31, "test": 20, "test_mix": 11}
    text = format_report(report)
    assert "資料混合（data.mix）：主要訓練 160 筆，混合後訓練集 229 筆" in text
    assert "進訓練集 46 筆；比例 設定 20.00%、實際 20.09%；驗證集 9 筆；test_mix 9 筆" in text
    assert "混合來源測試集（test_mix）：11 筆" in text
    table = mix_table(report)
    assert table.loc["zh_simplified"].to_dict() == {
        "讀入": 90,
        "保留": 90,
        "自己的訓練集": 72,
        "抽進訓練": 46,
        "其中重複": 0,
        "設定比例": "20.00%",
        "實際比例": "20.09%",
        "加入驗證": 9,
        "test_mix": 9,
    }
    assert list(table.index) == ["zh_simplified", "small_zh"]


def test_small_pool_repeats_are_reported(files):
    by_split, report = prepare_records(_cfg(files, [{"input": str(files["small"]), "fraction": 0.3}]))
    src = report["mix"]["sources"][0]
    # n = round(0.3 × 160 / 0.7) = 69 from a pool of 16 training records: 53 repeats, every record used 4-5 times
    assert (src["sampled_into_train"], src["repeats"], src["splits"]["train"]) == (69, 53, 16)
    sampled = [r["id"] for r in by_split["train"] if r.get("mix_source") == "small_zh"]
    assert len(sampled) == 69 and len(set(sampled)) == 16
    assert sorted({sampled.count(i) for i in set(sampled)}) == [4, 5]
    assert "其中重複 53 筆（來源的訓練集只有 16 筆）" in format_report(report)


def test_deterministic_and_main_test_unchanged(files):
    plain, _ = prepare_records(_cfg(files, []))
    mix = [_zh(files, 0.2), {"input": str(files["small"]), "fraction": 0.1}]
    first, _ = prepare_records(_cfg(files, mix))
    second, _ = prepare_records(_cfg(files, mix))
    for name in first:
        assert first[name] == second[name]
    assert first["test"] == plain["test"]  # the main test split does not depend on the mix
    assert set(_ids(plain["train"])) <= set(_ids(first["train"]))
    assert _ids(first["train"])[:160] != _ids(plain["train"])  # the combined list is shuffled with the seed
    # A source's split does not depend on the other sources or its own fraction.
    alone, _ = prepare_records(_cfg(files, [_zh(files, 0.0)]))
    assert alone["test_mix"] == [r for r in first["test_mix"] if r["mix_source"] == "zh_simplified"]
    other_seed, _ = prepare_records(_cfg(files, mix, seed=7))
    assert _ids(other_seed["train"]) != _ids(first["train"])


def test_fraction_zero_is_held_out_only(files):
    plain, _ = prepare_records(_cfg(files, []))
    by_split, report = prepare_records(_cfg(files, [_zh(files, 0.0)]))
    assert by_split["train"] == plain["train"] and by_split["validation"] == plain["validation"]
    assert by_split["test"] == plain["test"]
    assert len(by_split["test_mix"]) == 9 and {r["mix_source"] for r in by_split["test_mix"]} == {"zh_simplified"}
    src = report["mix"]["sources"][0]
    assert (src["sampled_into_train"], src["validation_used"], src["fraction_actual"]) == (0, 0, 0.0)
    assert "（fraction 0：只用來評估，不訓練）" in format_report(report)


def test_s2twp_converts_to_taiwan_usage(files):
    by_split, _ = prepare_records(_cfg(files, [_zh(files, 0.2)]))
    zh = [r for recs in by_split.values() for r in recs if r.get("mix_source") == "zh_simplified"]
    assert len({r["id"] for r in zh}) == 40 + 9 + 9  # round(0.2 × 160 / 0.8) sampled + validation + test_mix
    for r in zh:  # 个→個、电脑软件→電腦軟體、头痛→頭痛、怎么→怎麼、请→請
        m = re.fullmatch(r"第(\d+)個問題：電腦軟體讓我頭痛怎麼辦？", r["prompt"][-1]["content"])
        assert m, r["prompt"][-1]["content"]
        assert r["completion"][0]["content"] == f"回答{m[1]}：請少用軟體，頭痛持續請就醫。"
        assert re.fullmatch(r"科\d+", r["focus_area"])


def test_max_eval_examples_is_shared_by_fraction(files):
    mix = [_zh(files, 0.2), {"input": str(files["small"]), "fraction": 0.1}]
    by_split, report = prepare_records(_cfg(files, mix, max_eval_examples=10))
    # round(0.2 × 10) = 2 from zh, round(0.1 × 10) = 1 from small, the main input the other 7
    got = [r.get("mix_source", "main") for r in by_split["validation"]]
    assert (got.count("main"), got.count("zh_simplified"), got.count("small_zh")) == (7, 2, 1)
    assert report["counts"]["removed_by_limits"]["validation"] == 20 - 7
    assert "round(fraction × M)" in report["mix"]["rules"]["validation"]


def test_save_load_and_prepared_dir_keep_test_mix(files, tmp_path):
    cfg = _cfg(files, [_zh(files, 0.2)])
    splits, report = prepare_from_config(cfg, output_dir=tmp_path / "out")
    assert list(splits) == ["train", "validation", "test", "test_mix"]
    loaded = load_prepared(tmp_path / "out")
    assert list(loaded) == list(splits)
    for name in splits:
        assert loaded[name].to_list() == splits[name].to_list()
    assert len(loaded["test_mix"]) == 9 and set(loaded["test_mix"]["mix_source"]) == {"zh_simplified"}
    again, again_report = prepare_from_config(dataclasses.replace(cfg, prepared_dir=str(tmp_path / "out")))
    assert again["test_mix"].to_list() == splits["test_mix"].to_list()
    assert again_report["counts"]["final"]["test_mix"] == 9
    assert again_report["mix"]["sources"][0]["sampled_into_train"] == report["mix"]["sources"][0]["sampled_into_train"]


def test_no_mix_keeps_three_splits(files):
    splits, report = prepare_from_config(_cfg(files, []))
    assert list(splits) == ["train", "validation", "test"] and "mix" not in report


@pytest.mark.parametrize(
    "mix, message",
    [
        ([{"input": "x.csv", "fractoin": 0.1}], "設定中有不認識的鍵 data.mix[0].fractoin。"),
        ([{"fraction": 0.1}], "設定 data.mix[0] 缺少 input（混合來源的資料檔）。"),
        ([{"input": "x.csv", "fraction": 0.9}], "設定 data.mix[0].fraction 的值 0.9 太大（必須小於 0.9）。"),
        ([{"input": "x.csv", "fraction": -0.1}], "設定 data.mix[0].fraction 的值 -0.1 太小（最小 0.0）。"),
        (
            [{"input": "a.csv", "fraction": 0.5}, {"input": "b.csv", "fraction": 0.4}],
            "data.mix 的 fraction 加起來是 0.5 + 0.4 = 0.9，太大（必須小於 0.9）",
        ),
        (
            [{"input": "x.csv", "chinese_conversion": "s2x"}],
            "設定 data.mix[0].chinese_conversion 的值 's2x' 不在允許的選項中",
        ),
        ([{"input": "a/x.csv"}, {"input": "b/x.csv"}], "data.mix 中有檔名相同的來源：x"),
        ("x.csv", "設定 data.mix 的值 'x.csv' 型別不對"),
        ([{"input": "/no/such/mix.csv", "fraction": 0.1}], "找不到資料檔 data.mix[0].input = /no/such/mix.csv。"),
    ],
)
def test_invalid_mix_is_a_chinese_error(files, tmp_path, mix, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"input": str(files["main"]), "mix": mix}}), encoding="utf-8")
    code, _, err = run_cli_here("config", "check", "--config", str(path))
    assert code == 2 and message in err and "解決方法" in err
    if "/no/such" not in str(mix):
        with pytest.raises(ConfigError, match="data.mix"):
            config_from_dict({"data": {"mix": mix}})


def test_config_show_prints_the_mix(files, tmp_path):
    path = tmp_path / "c.yaml"
    mix = [{"input": str(files["zh"]), "fraction": 0.1, "chinese_conversion": "s2twp"}]
    path.write_text(yaml.safe_dump({"data": {"input": str(files["main"]), "mix": mix}}), encoding="utf-8")
    code, out, _ = run_cli_here("config", "show", "--config", str(path))
    assert code == 0 and "設定檢查通過" in out
    shown = yaml.safe_load(out.split("設定檢查通過")[0])["data"]["mix"]
    assert shown == [
        {
            "input": str(files["zh"]),
            "fraction": 0.1,
            "chinese_conversion": "s2twp",
            "columns": {},
            "encoding": None,
            "max_answer_chars": None,
        }
    ]


@pytest.mark.slow
@pytest.mark.shared
def test_real_bilingual_mix(shared_data):
    paths = {
        "main": shared_data / "medquad" / "medquad.csv",
        "toyhom": shared_data / "zh_medical_dialogue_toyhom" / "toyhom_im_sample2000.csv",
        "cmb": shared_data / "cmb_clin" / "cmb_clin_qa.csv",
    }
    if not all(p.is_file() for p in paths.values()):
        pytest.skip("../shared/data 缺少 MedQuAD、Toyhom 或 CMB-Clin 的 CSV")
    fractions = {"toyhom_im_sample2000": 0.1, "cmb_clin_qa": 0.02}
    mix = [
        {"input": str(paths["toyhom"]), "fraction": 0.1, "chinese_conversion": "s2twp"},
        {"input": str(paths["cmb"]), "fraction": 0.02, "chinese_conversion": "s2twp"},
    ]
    by_split, report = prepare_records(config_from_dict({"data": {"input": str(paths["main"]), "mix": mix}}).data)
    total = len(by_split["train"])
    n_main = report["mix"]["main_train"]
    for src in report["mix"]["sources"]:
        n = sum(r.get("mix_source") == src["name"] for r in by_split["train"])
        assert n == src["sampled_into_train"] == round(fractions[src["name"]] * n_main / (1 - 0.12))
        assert abs(n / total - fractions[src["name"]]) <= 1 / total  # the stated fraction, within rounding
        assert src["leakage"] == {"focus_areas_in_two_splits": 0, "questions_in_two_splits": 0}
        assert src["rows_in"] == src["kept"] + sum(src["dropped"].values())
    for name in fractions:  # no focus area of a source in two of its splits
        seen: dict[str, set[str]] = {}
        for split_name in ("train", "validation", "test_mix"):
            for r in by_split[split_name]:
                if r.get("mix_source") == name and r["focus_area"]:
                    seen.setdefault(r["focus_area"].casefold(), set()).add(split_name)
        assert seen and all(len(v) == 1 for v in seen.values())
    assert {r["mix_source"] for r in by_split["test_mix"]} == set(fractions)
    assert report["leakage"] == {"focus_areas_in_two_splits": 0, "questions_in_two_splits": 0}


def test_mix_problems_agree_with_the_report_and_name_a_mismatch(files):
    from medgemma_lib.data import mix_problems

    splits, report = prepare_records(_cfg(files, [_zh(files, 0.1)]))
    assert mix_problems(splits, report) == []
    broken = {**splits, "train": splits["train"][1:], "test_mix": splits["test_mix"][:-1]}
    problems = mix_problems(broken, report)
    assert any("訓練集" in p for p in problems) and any("test_mix" in p for p in problems)
