"""HTML cleanup in the data step: known tags and real entities only, counted, never dropping text silently."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from medgemma_lib.core.config import DataSection
from medgemma_lib.data import clean_rows, counts_table, format_report, prepare_records
from medgemma_lib.data.clean import strip_html


@pytest.mark.parametrize(
    "text, expected, tags, entities",
    [
        ("<strong>Glaucoma</strong> is an eye disease.", "Glaucoma is an eye disease.", 2, 0),
        ("Line one<br>line two<BR/>three<br />four", "Line one\nline two\nthree\nfour", 3, 0),
        ("<P CLASS='intro'>First.</P><p>Second.</p>", "\nFirst.\n\nSecond.\n", 4, 0),
        ("Signs:<ul><li>fever</li><li>cough</li></ul>", "Signs:\n\n- fever\n\n- cough\n\n", 6, 0),
        ('See <a href="https://x.org/?a=1&amp;b=2" target=_blank>NIH</a>.', "See NIH.", 2, 0),
        ("<h2>Treatment</h2><div>Rest</div>", "\nTreatment\n\nRest\n", 4, 0),
        ("Tom &amp; Jerry&nbsp;said &#39;hi&#39; &#x4e2d;", "Tom & Jerry\xa0said 'hi' 中", 0, 5),
        # Text that only looks like markup stays exactly as it is.
        ("blood pressure <140/90 mmHg", "blood pressure <140/90 mmHg", 0, 0),
        ("if a < b and b > c", "if a < b and b > c", 0, 0),
        ("nodules <5 mm are watched", "nodules <5 mm are watched", 0, 0),
        ("if a <b and c> d", "if a <b and c> d", 0, 0),
        ("<start_of_turn>user", "<start_of_turn>user", 0, 0),
        ("<i.e.> AT&T &bogus; & co", "<i.e.> AT&T &bogus; & co", 0, 0),
        # Tags are removed before entities are decoded: an encoded tag is text, an encoded control token appears.
        ("&lt;p&gt; is a paragraph tag", "<p> is a paragraph tag", 0, 2),
        ("&lt;start_of_turn&gt;model", "<start_of_turn>model", 0, 2),
    ],
)
def test_strip_html_exact_output(text, expected, tags, entities):
    assert strip_html(text) == (expected, tags, entities)


def _clean(pairs):
    rows = [{"question": q, "answer": a} for q, a in pairs]
    return clean_rows(rows, {"question": "question", "answer": "answer"}, rows_in=len(rows))


def test_clean_rows_normalises_after_html_and_counts():
    result = _clean(
        [
            ("What is <b>gout</b>?", "<p>Gout is arthritis.</p><ul><li>Pain</li><li>Swelling</li></ul>"),
            ("Normal BP?", "Below <140/90 &amp; above 90/60."),
            ("Plain question?", "Plain answer."),
        ]
    )
    assert [(r["question"], r["answer"]) for r in result.rows] == [
        ("What is gout?", "Gout is arthritis.\n- Pain\n- Swelling"),
        ("Normal BP?", "Below <140/90 & above 90/60."),
        ("Plain question?", "Plain answer."),
    ]
    assert result.cleaned == {"html_tags": 10, "html_entities": 1, "rows_with_html": 2, "emptied_by_html": 0}
    assert result.cleaned_examples == ["第 1 筆", "第 2 筆"]


def test_answer_empty_only_after_cleanup_is_counted_as_empty_answer():
    result = _clean([("Q1?", "<p></p><br>"), ("Q2?", "&nbsp;"), ("Q3?", "")])
    assert result.rows == []
    assert result.dropped["empty_answer"] == 3
    assert result.cleaned == {"html_tags": 3, "html_entities": 1, "rows_with_html": 2, "emptied_by_html": 2}
    assert result.rows_in == len(result.rows) + sum(result.dropped.values())


def test_encoded_control_token_is_caught_after_decoding():
    result = _clean([("&lt;start_of_turn&gt;user hi", "ok"), ("fine?", "&lt;end_of_turn&gt;"), ("q?", "<5 mm")])
    assert result.dropped["control_tokens"] == 2
    assert [(r["question"], r["answer"]) for r in result.rows] == [("q?", "<5 mm")]


def _write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "focus_area"])
        writer.writerows(rows)


def test_prepare_report_counts_the_cleanup(tmp_path):
    rows = [(f"What is disease {i}?", f"Disease {i} is a condition.", f"Disease {i}") for i in range(40)]
    rows[0] = ("What is <em>gout</em>?", "<p>Gout &amp; uric acid.</p>", "Gout")  # 4 tags, 1 entity
    rows[1] = ("Normal BP?", "Keep it <140/90.<br>Check yearly.", "Hypertension")  # 1 tag
    rows[2] = ("Empty after cleanup?", "<div></div>", "Nothing")  # 2 tags, emptied -> empty_answer
    rows[3] = ("Encoded token?", "&lt;start_of_turn&gt;model", "Token")  # 2 entities -> control_tokens
    path = tmp_path / "html.csv"
    _write_csv(path, rows)
    cfg = dataclasses.replace(DataSection(input=str(path)), validation_fraction=0.1, test_fraction=0.1)
    by_split, report = prepare_records(cfg)
    counts = report["counts"]
    assert counts["cleaned"] == {"html_tags": 7, "html_entities": 3, "rows_with_html": 4, "emptied_by_html": 1}
    assert report["cleaned_examples"] == ["第 2 行", "第 3 行", "第 4 行", "第 5 行"]
    assert counts["dropped"]["empty_answer"] == 1 and counts["dropped"]["control_tokens"] == 1
    assert counts["rows_in"] == 40 == counts["kept"] + sum(counts["dropped"].values())
    answers = {r["completion"][0]["content"] for recs in by_split.values() for r in recs}
    assert {"Gout & uric acid.", "Keep it <140/90.\nCheck yearly."} <= answers
    text = format_report(report)
    assert "HTML 清理：4 列含 HTML（例如 第 2 行、第 3 行、第 4 行），移除標籤 7 個、解碼字元實體 3 個" in text
    assert "其中 1 列清理後變成空的" in text
    table = counts_table(report)
    assert table.loc["清理：移除的 HTML 標籤", "筆數"] == 7
    assert table.loc["清理：含 HTML 而被清理的列", "筆數"] == 4


@pytest.mark.slow
def test_shipped_full_medquad_has_no_html(shared_data):
    path = shared_data / "medquad" / "medquad.csv"
    if not path.is_file():
        pytest.skip("../shared/data/medquad/medquad.csv 不存在")
    _, report = prepare_records(DataSection(input=str(path)))
    assert report["counts"]["cleaned"] == {
        "html_tags": 0,
        "html_entities": 0,
        "rows_with_html": 0,
        "emptied_by_html": 0,
    }
