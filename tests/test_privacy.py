"""De-identification: checksums, masking, report/mask/refuse, a labelled synthetic set, MedQuAD, CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest

from medgemma_lib.core.errors import DataError
from medgemma_lib.data import privacy
from medgemma_lib.data.privacy import TYPE_LABELS, deidentify_frame, format_report, mask_text, scan_text

# ---------------------------------------------------------------------------------------------
# Independent check-digit generator (written from the official description, not the library's code)
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHJKLMNPQRSTUVXYWZIO"  # official order: codes 10..35


def letter_code(letter: str) -> int:
    return 10 + LETTERS.index(letter)


def check_digit(letter: str, second: int, seven: str) -> int:
    code = letter_code(letter)
    total = code // 10 + (code % 10) * 9 + second * 8 + sum(int(d) * w for d, w in zip(seven, range(7, 0, -1)))
    return (10 - total % 10) % 10


def make_national_id(rng: random.Random, valid: bool = True) -> str:
    letter, gender, seven = rng.choice(LETTERS), rng.choice("12"), "".join(rng.choice("0123456789") for _ in range(7))
    check = check_digit(letter, int(gender), seven)
    if not valid:
        check = (check + rng.randint(1, 9)) % 10
    return f"{letter}{gender}{seven}{check}"


def make_resident_id(rng: random.Random, valid: bool = True) -> str:
    letter, seven = rng.choice(LETTERS), "".join(rng.choice("0123456789") for _ in range(7))
    if rng.random() < 0.5:  # old format: second letter A-D counts as the units digit of its code
        second_char = rng.choice("ABCD")
        second = letter_code(second_char) % 10
    else:  # new format (2021): 8 or 9
        second_char = rng.choice("89")
        second = int(second_char)
    check = check_digit(letter, second, seven)
    if not valid:
        check = (check + rng.randint(1, 9)) % 10
    return f"{letter}{second_char}{seven}{check}"


def test_known_valid_and_invalid_ids():
    # Widely published examples: A123456789 (national ID), A800000014 (new resident certificate),
    # AA00000009 (old resident certificate).
    assert privacy.is_valid_national_id("A123456789")
    assert privacy.is_valid_national_id("a123456789")
    assert not privacy.is_valid_national_id("A123456788")
    assert not privacy.is_valid_national_id("A323456789")
    assert privacy.is_valid_resident_id("A800000014")
    assert privacy.is_valid_resident_id("AA00000009")
    assert not privacy.is_valid_resident_id("AA00000008")
    assert not privacy.is_valid_resident_id("A800000015")
    rng = random.Random(3)
    for _ in range(300):
        assert privacy.is_valid_national_id(make_national_id(rng))
        assert not privacy.is_valid_national_id(make_national_id(rng, valid=False))
        assert privacy.is_valid_resident_id(make_resident_id(rng))
        assert not privacy.is_valid_resident_id(make_resident_id(rng, valid=False))


def test_invalid_checksum_is_not_flagged():
    assert scan_text("身分證 A123456788，居留證 A800000015") == []
    found = scan_text("身分證 A123456789，居留證 A800000014")
    assert [(f.type, f.text) for f in found] == [("national_id", "A123456789"), ("resident_id", "A800000014")]


def test_mask_text_examples():
    text = (
        "我是王小明先生，身分證 A123456789，手機 0912-345-678，家裡電話 (02)2345-6789，"
        "email wang.xm@example.com.tw，民國74年3月12日生，病歷號：12345678，健保卡號 0000 1234 5678，"
        "陳醫師說李小姐可以出院。Call Dr. Smith at +1 301 496 4000."
    )
    masked = mask_text(text)
    assert masked == (
        "我是[姓名]先生，身分證 [身分證字號]，手機 [電話]，家裡電話 [電話]，"
        "email [電子郵件]，[出生日期]生，病歷號：[病歷號]，健保卡號 [健保卡號]，"
        "[姓名]醫師說[姓名]小姐可以出院。Call Dr. [姓名] at [電話]."
    )


def test_full_width_digits_and_spans_point_into_original_text():
    text = "手機０９１２－３４５－６７８，身分證Ａ１２３４５６７８９"
    found = scan_text(text)
    assert [f.type for f in found] == ["phone", "national_id"]
    for f in found:
        assert text[f.start : f.end] == f.text


def test_titles_without_names_are_not_names():
    negatives = [
        "請教醫師該怎麼辦",
        "主治醫師說可以出院",
        "請向醫師諮詢",
        "兒童醫師建議打疫苗",
        "各位先生女士好",
        "常看醫師比較安心",
        "家醫科醫師會轉診",
        "去看醫師前先量血壓",
        "一位護理師來換藥",
        "牙醫師幫我洗牙",
        "Talk to your doctor about the flu",
        "When To See the Doctor Be sure to call",
    ]
    for text in negatives:
        assert [f for f in scan_text(text) if f.type == "name"] == [], text


def test_dates_without_birth_cue_are_not_flagged():
    for text in [
        "就診日期 2023-05-01",
        "手術於 2021/3/12 完成",
        "回診時間：113年5月6日",
        "Follow-up on March 3, 2024.",
        "born in 1985",
    ]:
        assert scan_text(text) == [], text


# ---------------------------------------------------------------------------------------------
# Frame-level modes
# ---------------------------------------------------------------------------------------------

PLANTED = {
    "national_id": "A123456789",
    "phone": "0912-345-678",
    "email": "chen.mei@example.com",
}


def planted_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "question": ["我的身分證是 A123456789，可以幫我查嗎？", "高血壓要吃什麼藥？", None],
            "answer": ["請撥 0912-345-678 或寫信到 chen.mei@example.com", "請遵照醫師指示服藥。", "無"],
            "source": ["x", "y", "z"],
        }
    )


def test_report_mode_leaves_frame_and_never_leaks_raw_data():
    frame = planted_frame()
    out, report = deidentify_frame(frame)
    pd.testing.assert_frame_equal(out, frame)
    assert report["mode"] == "report"
    assert report["counts"]["national_id"] == 1 and report["counts"]["phone"] == 1 and report["counts"]["email"] == 1
    assert report["total"] == 3 and report["rows_affected"] == 1 and report["rows_scanned"] == 3
    assert report["counts_by_label"] == {"身分證字號": 1, "電話": 1, "電子郵件": 1}
    assert set(TYPE_LABELS) == set(report["counts"])
    dumped = json.dumps(report, ensure_ascii=False) + format_report(report)
    for raw in PLANTED.values():
        assert raw not in dumped
    assert report["examples"] and all(ex["row"] == 0 for ex in report["examples"])
    assert any("[身分證字號]" in ex["masked"] for ex in report["examples"])


def test_mask_mode_replaces_and_counts():
    frame = planted_frame()
    out, report = deidentify_frame(frame, "mask")
    assert out.loc[0, "question"] == "我的身分證是 [身分證字號]，可以幫我查嗎？"
    assert out.loc[0, "answer"] == "請撥 [電話] 或寫信到 [電子郵件]"
    assert out.loc[1, "answer"] == "請遵照醫師指示服藥。"
    assert pd.isna(out.loc[2, "question"])
    assert list(out["source"]) == ["x", "y", "z"]
    assert frame.loc[0, "question"].endswith("A123456789，可以幫我查嗎？")  # input not modified
    assert report["total"] == 3
    assert "已用類型標記遮蔽" in format_report(report)


def test_refuse_mode_raises_chinese_error_with_counts_rows_and_fix():
    with pytest.raises(DataError) as info:
        deidentify_frame(planted_frame(), "refuse")
    text = str(info.value)
    assert "身分證字號 1 處" in text and "電話 1 處" in text and "電子郵件 1 處" in text
    assert "第 1 筆" in text and "[身分證字號]" in text
    assert "--deidentify mask" in text
    for raw in PLANTED.values():
        assert raw not in text
    clean = pd.DataFrame({"question": ["糖尿病是什麼？"], "answer": ["一種代謝疾病。"]})
    out, report = deidentify_frame(clean, "refuse")
    assert report["total"] == 0


def test_unknown_mode_is_a_data_error():
    with pytest.raises(DataError, match="mask"):
        deidentify_frame(planted_frame(), "delete")


# ---------------------------------------------------------------------------------------------
# Labelled synthetic set: positives and tricky negatives per type (seeded)
# ---------------------------------------------------------------------------------------------

SURNAMES = "陳林黃張李王吳劉蔡楊許鄭謝郭洪曾邱廖賴周徐蘇葉莊呂江何蕭羅高潘簡朱鍾彭詹胡施沈余盧梁趙顏柯翁"
GIVEN = "志明淑芬家豪怡君俊傑雅婷建宏美玲宗翰欣怡冠宇佩君承恩詩涵柏翰宜蓁"
ZH_TITLES = ["先生", "小姐", "女士", "醫師", "護理師", "老師", "太太", "阿姨"]
EN_SURNAMES = ["Smith", "Johnson", "Chen", "Garcia", "Nguyen", "Brown", "Lee", "Wang", "Miller", "Davis"]


def _digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def _gen_phone(rng):
    kind = rng.randrange(9)
    if kind == 7:
        return f"09{_digits(rng, 2)} {_digits(rng, 3)} {_digits(rng, 3)}"
    if kind == 8:
        return f"02 {_digits(rng, 4)} {_digits(rng, 4)}"
    if kind == 0:
        return f"09{_digits(rng, 2)}-{_digits(rng, 3)}-{_digits(rng, 3)}"
    if kind == 1:
        return f"09{_digits(rng, 8)}"
    if kind == 2:
        return f"+886 9{_digits(rng, 2)} {_digits(rng, 3)} {_digits(rng, 3)}"
    if kind == 3:
        return f"(02){_digits(rng, 4)}-{_digits(rng, 4)}"
    if kind == 4:
        area = rng.choice(["02", "04", "07", "03", "06"])
        rest = (
            f"{_digits(rng, 4)}-{_digits(rng, 4)}" if area in ("02", "04") else f"{_digits(rng, 3)}-{_digits(rng, 4)}"
        )
        return f"{area}-{rest}"
    if kind == 5:
        return rng.choice(
            [
                f"+1 301-{_digits(rng, 3)}-{_digits(rng, 4)}",
                f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}",
                f"+81 3-{_digits(rng, 4)}-{_digits(rng, 4)}",
            ]
        )
    return f"+886-2-{_digits(rng, 4)}-{_digits(rng, 4)}"


def _gen_birth(rng):
    y, m, d = rng.randint(1940, 2015), rng.randint(1, 12), rng.randint(1, 28)
    forms = [
        ("出生日期：", f"{y}-{m:02d}-{d:02d}", ""),
        ("生日是", f"{y}/{m}/{d}", ""),
        ("", f"民國{y - 1911}年{m}月{d}日", "生"),
        ("", f"{y}年{m}月{d}日", "出生"),
        ("DOB: ", f"{m:02d}/{d:02d}/{y}", ""),
        ("born on ", f"{['January', 'March', 'May', 'July', 'October'][m % 5]} {d}, {y}", ""),
        ("Date of birth ", f"{d} {['Jan', 'Mar', 'Jun', 'Sep', 'Dec'][m % 5]} {y}", ""),
        ("D.O.B. ", f"{y}.{m:02d}.{d:02d}", ""),
        ("生於", f"{y} 年 {m} 月 {d} 日", ""),
        ("出生：民國", f"{y - 1911}/{m:02d}/{d:02d}", ""),
    ]
    return rng.choice(forms)


def synthetic_set(seed: int = 20261129, per_type: int = 60):
    """Return [(text, [(type, start, end), ...])] with positives for every type and tricky negatives."""
    rng = random.Random(seed)
    samples = []

    def add(parts):
        """parts: list of str or (type, value); builds the text and the gold spans."""
        text, gold = "", []
        for part in parts:
            if isinstance(part, tuple):
                gold.append((part[0], len(text), len(text) + len(part[1])))
                text += part[1]
            else:
                text += part
        samples.append((text, gold))

    for _ in range(per_type):
        add(
            [
                rng.choice(["身分證字號 ", "我的身分證是", "ID: ", "病患身分證"]),
                ("national_id", make_national_id(rng)),
                rng.choice(["，請協助查詢。", "。", " 謝謝"]),
            ]
        )
        add(
            [
                rng.choice(["居留證號碼 ", "ARC: ", "外籍看護居留證"]),
                ("resident_id", make_resident_id(rng)),
                "，需要健保嗎？",
            ]
        )
        add(
            [
                rng.choice(["請打 ", "聯絡電話：", "手機", "Call me at ", "家裡電話是"]),
                ("phone", _gen_phone(rng)),
                rng.choice(["，謝謝。", " 找陳小姐" if False else "。", " anytime."]),
            ]
        )
        local = rng.choice(["amy.lin", "wang_dr", "chen1985", "patient.k", "j.doe"])
        add(
            [
                "可以寄到 ",
                ("email", f"{local}@{rng.choice(['gmail.com', 'ntuh.gov.tw', 'example.org', 'hospital.com.tw'])}"),
                " 嗎",
            ]
        )
        cue, date, tail = _gen_birth(rng)
        add(["病人", cue, ("birth_date", date), tail, "，最近血糖偏高。"])
        # A letter + 9 digits after 病歷號 could be a national ID (some hospitals use it); it is masked
        # as 身分證字號 then, so the generator leaves that shape out.
        add(
            [
                rng.choice(["病歷號：", "病歷號碼 ", "MRN: ", "medical record number "]),
                ("medical_record", rng.choice(["", "A"]) + _digits(rng, rng.choice([6, 7, 8, 10]))),
                "，請調閱。",
            ]
        )
        nhi = _digits(rng, 12)
        if rng.random() < 0.5:
            nhi = f"{nhi[:4]} {nhi[4:8]} {nhi[8:]}"
        add([rng.choice(["健保卡號 ", "健保卡號碼：", "NHI card number "]), ("nhi_card", nhi), " 遺失了"])
        surname = rng.choice(SURNAMES)
        given = "".join(rng.sample(GIVEN, rng.choice([0, 1, 2])))
        add(
            [
                rng.choice(["昨天", "門診時", "我問了", "聽說"]),
                ("name", surname + given),
                rng.choice(ZH_TITLES),
                rng.choice(["說要多喝水。", "建議回診。", "很親切"]),
            ]
        )
        add(
            [
                rng.choice(["I saw ", "Ask ", "According to "]),
                rng.choice(["Dr. ", "Mr. ", "Mrs. ", "Ms. ", "Dr ", "Prof. "]),
                ("name", rng.choice(EN_SURNAMES)),
                " yesterday.",
            ]
        )
        add(
            [
                "我是",
                ("name", rng.choice(SURNAMES) + "".join(rng.sample(GIVEN, 2))),
                rng.choice(["護理師", "藥師", "營養師"]),
                "，想請教糖尿病衛教。",
            ]
        )

    negatives = [
        f"身分證 {make_national_id(rng, valid=False)} 的檢查碼不對",
        f"居留證 {make_resident_id(rng, valid=False)} 打錯了",
        f"訂單編號 {_digits(rng, 10)}",
        f"血壓 {rng.randint(100, 160)}/{rng.randint(60, 100)} mmHg，心跳 {rng.randint(60, 100)}",
        f"血糖 {rng.randint(80, 300)} mg/dL，HbA1c {rng.randint(5, 12)}.{rng.randint(0, 9)}%",
        f"就診日期 {rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}，"
        f"下次回診 {rng.randint(110, 114)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日",
        f"出生後 {rng.randint(2, 30)} 天的新生兒黃疸",
        f"ICD-10 E11.{rng.randint(0, 9)}，藥品代碼 A0{_digits(rng, 8)}",
        f"每日 {rng.randint(1, 4)} 次，每次 {rng.choice([250, 500, 1000])} mg，共 {rng.randint(7, 28)} 天",
        f"金額 NT$ {rng.randint(1, 99)},{_digits(rng, 3)},{_digits(rng, 3)}",
        f"The study enrolled {rng.randint(100, 9999)} patients between 2010 and 2015.",
        f"Call 1-800-{_digits(rng, 3)}-{_digits(rng, 4)} for NIH information.",
        "寄到 service@hospital.org.tw 或 info@example.gov.tw 詢問",
        f"病歷上寫血糖 {rng.randint(100, 300)}，要注意嗎？",
        f"健保卡要帶，掛號費 {rng.randint(100, 500)} 元",
        f"{_digits(rng, 12)} 是檢驗單條碼",
        "請教醫師：主治醫師說我要住院",
        "請向醫師諮詢，兒童醫師與家醫科醫師都可以",
        "各位先生女士，門診護理師會叫號",
        "Talk to your doctor. When To See the Doctor Be sure to ask.",
        "Dr. Office hours are Monday to Friday.",
        "王道是多運動",
        "黃疸的原因",
        "方便的話請告訴醫師",
        f"她在 {rng.randint(2015, 2024)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日生產，產後出血",
        f"{rng.randint(2015, 2024)}/{rng.randint(1, 12)}/{rng.randint(1, 28)} 生病住院",
        "劑量 0.02-0.05 mg/kg，間隔 08:30-12:00",
        "伺服器 192.168.0.1 版本 v2.0.1.3",
        "WBC 12.3 x10^3/uL，CRP 0.5 mg/dL",
        "Born prematurely, the baby needed oxygen.",
        "Babies born between 1945 and 1965 should be tested.",
        # Found on real Chinese medical dialogues (surname characters inside ordinary words):
        "谢谢医生您的解释",
        "非常感謝醫師",
        "上次健康检查医生说我有脂肪肝",
        "我高中同學昨天打電話給我",
        "祝您健康医生",
    ]
    for text in negatives:
        samples.append((text, []))
    rng.shuffle(samples)
    return samples


PRECISION_FLOOR = 0.95
RECALL_FLOOR = 0.90


def test_synthetic_precision_recall_per_type():
    samples = synthetic_set()
    tp, fp, fn = Counter(), Counter(), Counter()
    mistakes = []
    for text, gold in samples:
        predicted = {(f.type, f.start, f.end) for f in scan_text(text)}
        gold_set = set(gold)
        for item in predicted & gold_set:
            tp[item[0]] += 1
        for item in predicted - gold_set:
            fp[item[0]] += 1
            mistakes.append(("FP", item[0], text[item[1] : item[2]], text))
        for item in gold_set - predicted:
            fn[item[0]] += 1
            mistakes.append(("FN", item[0], text[item[1] : item[2]], text))
    print(f"\n{'type':<16}{'TP':>5}{'FP':>5}{'FN':>5}{'precision':>11}{'recall':>8}")
    table = {}
    for key in TYPE_LABELS:
        p = tp[key] / (tp[key] + fp[key]) if tp[key] + fp[key] else 1.0
        r = tp[key] / (tp[key] + fn[key]) if tp[key] + fn[key] else 1.0
        table[key] = (p, r)
        print(f"{key:<16}{tp[key]:>5}{fp[key]:>5}{fn[key]:>5}{p:>11.3f}{r:>8.3f}")
    for m in mistakes:
        print(*m)
    for key, (p, r) in table.items():
        assert tp[key] >= 50, f"{key}: too few positives in the synthetic set"
        assert p >= PRECISION_FLOOR, f"{key} precision {p:.3f} < {PRECISION_FLOOR}"
        assert r >= RECALL_FLOOR, f"{key} recall {r:.3f} < {RECALL_FLOOR}"


# ---------------------------------------------------------------------------------------------
# Full MedQuAD: near-zero false positives
# ---------------------------------------------------------------------------------------------

# Measured 2026-11-29 on the full file (16,423 rows): 13 hits, all looked at:
# * 3 e-mail addresses of public health organisations (adear@nia.nih.gov, prpl@mail.cc.nih.gov,
#   resnaTA@resna.org): real addresses, not personal data; role mailboxes such as info@ are skipped.
# * 10 names after "Dr." of researchers and eponyms (Dr. Alois Alzheimer, Dr. Thomas Addison,
#   Dr. Daniel Kastner ...): correctly names, but public figures, not patients.
# Phones, IDs, dates of birth, record and card numbers: 0.
MEDQUAD_MAX_HITS = {"email": 3, "name": 10}


@pytest.mark.slow
@pytest.mark.shared
def test_medquad_false_positives_near_zero(shared_data):
    frame = pd.read_csv(shared_data / "medquad" / "medquad.csv")
    assert len(frame) == 16423
    hits = Counter()
    for column in ("question", "answer"):
        for row, value in enumerate(frame[column]):
            for f in scan_text(value) if isinstance(value, str) else ():
                hits[f.type] += 1
                context = value[max(0, f.start - 30) : f.end + 15].replace("\n", " ")
                print(f"row {row} {column} {f.type}: {f.text!r} … {context!r}")
    print("MedQuAD hits per type:", dict(hits))
    for key in TYPE_LABELS:
        assert hits[key] <= MEDQUAD_MAX_HITS.get(key, 0), f"{key}: {hits[key]} hits on MedQuAD"


# ---------------------------------------------------------------------------------------------
# CLI: data prepare --deidentify mask
# ---------------------------------------------------------------------------------------------


def _data_cli_has_deidentify() -> bool:
    try:
        from medgemma_lib.cli import build_parser

        parser = build_parser()
        help_text = subprocess.run(
            [sys.executable, "-m", "medgemma_lib", "data", "prepare", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        return parser is not None and "--deidentify" in help_text
    except Exception:
        return False


@pytest.mark.slow
def test_cli_mask_planted(tmp_path):
    if not _data_cli_has_deidentify():
        pytest.skip("medgemma_lib.data 尚未提供 data prepare --deidentify 選項")
    rng = random.Random(7)
    ids = [make_national_id(rng) for _ in range(4)]
    phones = ["0912-345-678", "0987654321", "(02)2345-6789", "+886 935 123 456"]
    rows = []
    for i in range(40):
        question = f"問題 {i}：高血壓患者每天要量幾次血壓？"
        answer = f"一般建議早晚各量一次，並記錄數值。第 {i} 題說明。"
        if i < 4:
            question = f"我的身分證字號是 {ids[i]}，第 {i} 題高血壓要吃藥嗎？"
            answer = f"請打 {phones[i]} 預約門診，第 {i} 題。"
        rows.append({"question": question, "answer": answer})
    source = tmp_path / "planted.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    out_dir = tmp_path / "prepared"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgemma_lib",
            "data",
            "prepare",
            "--input",
            str(source),
            "--output",
            str(out_dir),
            "--deidentify",
            "mask",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    from datasets import load_from_disk

    splits = load_from_disk(str(out_dir / "splits"))
    texts = json.dumps([row for name in splits for row in splits[name]], ensure_ascii=False)
    report_text = (out_dir / "prepare_report.json").read_text(encoding="utf-8")
    everything = texts + report_text + result.stdout + result.stderr
    for raw in ids + phones:
        assert raw not in everything, f"{raw} 未被遮蔽"
    assert sum(len(splits[name]) for name in splits) == 40
    assert texts.count("[身分證字號]") == 4 and texts.count("[電話]") == 4
    counts = json.loads(report_text)["deidentification"]["counts"]
    assert counts["national_id"] == 4 and counts["phone"] == 4, counts
    assert "身分證字號" in result.stdout and "電話" in result.stdout


@pytest.mark.shared
def test_real_chinese_dialogues_false_positives(shared_data):
    """Real Simplified Chinese patient questions and answers: names next to titles are rare."""
    frame = pd.read_csv(shared_data / "zh_medical_dialogue_toyhom" / "toyhom_im_sample2000.csv")
    hits = []
    for column in ("question", "answer"):
        for value in frame[column].dropna():
            for f in scan_text(value):
                hits.append((f.type, f.text))
                print(f.type, repr(f.text), value[max(0, f.start - 15) : f.end + 10].replace("\n", " "))
    # Measured 2026-11-29: one hit, 崔树旺 in 「用崔树旺教授研发的专利中药」, a real name (a
    # professor promoting a remedy). 謝謝醫生, 感謝醫生, 健康檢查醫生, 高中同學 were hits before the fix.
    assert hits == [("name", "崔树旺")]
