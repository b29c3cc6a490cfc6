"""What notebooks show: collapsed repeats, one disclaimer per block, tables without NaN, Chinese status lines,
widget fallbacks, and plots whose Chinese labels have glyphs in the bundled font (no tofu)."""

from __future__ import annotations

import math
import warnings

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from medgemma_lib import MEDICAL_DISCLAIMER  # noqa: E402
from medgemma_lib.core import display, plots
from medgemma_lib.models import generation

# ----------------------------------------------------------------------------------------------
# Repeats


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("糖尿病的症狀是什麼?\n" + "BOTTOMS\n" * 14, "糖尿病的症狀是什麼?\nBOTTOMS……（重複 14 次）\n"),
        ("aspirin aspirin aspirin aspirin. Next", "aspirin……（重複 4 次）. Next"),
        ("What is it? mendatang\n" * 4 + "What", "What is it? mendatang……（重複 4 次）\nWhat"),
        ("高血壓高血壓高血壓高血壓高血壓", "高血壓……（重複 5 次）"),
        ("The dose is 1000000 mg, 2222 units.", "The dose is 1000000 mg, 2222 units."),  # numbers stay
        ("哈哈哈，好。 Normal text. Normal text.", "哈哈哈，好。 Normal text. Normal text."),  # two repeats stay
        ("", ""),
    ],
)
def test_collapse_repeats_known_answers(text, shown):
    assert display.collapse_repeats(text) == shown


def test_collapse_keeps_the_count_of_characters():
    text = "Glaucoma damages the optic nerve. " * 9 + "See a doctor."
    out = display.collapse_repeats(text)
    assert out == "Glaucoma damages the optic nerve.……（重複 9 次） See a doctor."


def test_show_answers_one_disclaimer_per_block_and_collapsed():
    questions = ["What is glaucoma?", "糖尿病的症狀是什麼?", "心臟病的原因是什麼?"]
    answers = ["Glaucoma is an eye disease.", "BOTTOMS\n" * 14, "口渴、多尿。"]
    text = generation.show_answers(questions, answers, note="小模型常常答錯。")
    assert text.count(MEDICAL_DISCLAIMER) == 1 and text.startswith(MEDICAL_DISCLAIMER + "\n小模型常常答錯。")
    assert "BOTTOMS……（重複 14 次）" in text and text.count("BOTTOMS") == 1
    assert all(f"問：{q}" in text for q in questions)


def test_show_answers_keeps_the_emergency_alert_before_the_answer():
    text = generation.show_answers(["我爸爸突然嘴歪、講話不清楚"], ["中風可能的原因……"])
    assert text.index("119") < text.index("中風可能的原因")


# ----------------------------------------------------------------------------------------------
# Tables, sizes, widths


def test_markdown_table_left_aligned_with_dash_for_missing():
    table = display.markdown_table([{"欄": "a|b", "值": float("nan")}, {"欄": "多行\n文字", "值": None}]).data
    lines = table.splitlines()
    assert lines[0] == "| 欄 | 值 |" and lines[1] == "|:---|:---|"
    assert lines[2] == "| a\\|b | — |" and lines[3] == "| 多行<br>文字 | — |"
    assert "NaN" not in table and repr(display.markdown_table([{"a": 1}])) == "| a |\n|:---|\n| 1 |"


def test_frame_renames_and_never_shows_nan():
    df = display.frame(
        [{"step": 0, "loss": None, "eval_loss": 2.87691}, {"step": 2, "loss": 3.49581, "eval_loss": float("nan")}],
        {"step": "步數", "loss": "訓練 loss", "eval_loss": "驗證 loss"},
        digits=4,
        index="步數",
    )
    assert list(df.columns) == ["訓練 loss", "驗證 loss"] and list(df.index) == [0, 2]
    assert df.loc[0, "訓練 loss"] == "—" and df.loc[2, "驗證 loss"] == "—"
    assert df.loc[0, "驗證 loss"] == "2.8769" and df.loc[2, "訓練 loss"] == "3.4958"
    assert "NaN" not in df.to_string() and "NaN" not in df.to_html()


def test_log_frame_and_profile_frame_have_chinese_headers_and_no_nan():
    from medgemma_lib.models import loading as models
    from medgemma_lib.training import monitor

    records = [
        {"step": 0, "eval_loss": 2.8769, "cpu_rss_gib": 2.0},
        {"step": 2, "loss": 3.4958, "learning_rate": 0.0005, "cpu_rss_gib": 2.7},
    ]
    records += [{"step": 4, "loss": 2.1, "cpu_rss_gib": 2.7}, {"step": 4, "eval_loss": 2.0, "cpu_rss_gib": 2.8}]
    records += [{"step": 4, "train_runtime": 112.0, "cpu_rss_gib": 2.9}]  # the Trainer's summary at the last step
    log = monitor.log_frame(records)
    assert list(log.columns) == ["訓練 loss", "學習率", "驗證 loss", "CPU 記憶體（GiB）"]
    assert list(log.index) == [0, 2, 4]  # one row per step
    assert log.loc[2, "學習率"] == "5.00e-04" and log.loc[0, "訓練 loss"] == "—"
    assert log.loc[4, "訓練 loss"] == "2.1000" and log.loc[4, "驗證 loss"] == "2.0000" and log.loc[4, "學習率"] == "—"
    profiles = models.profile_frame()
    assert profiles.index.name == "設定檔" and "NaN" not in profiles.to_html()
    assert profiles.loc["demo", "Hub 名稱"] == "（隨課程離線提供）"
    assert profiles.loc["medgemma-4b-it", "影像編碼器"].startswith("有")


@pytest.mark.parametrize(
    ("size", "shown"), [(536_220_000, "536.2 MB"), (33_370_000, "33.4 MB"), (4_200, "4.2 KB"), (812, "812 B")]
)
def test_human_size(size, shown):
    assert display.human_size(size) == shown


def test_wrap_display_counts_cjk_as_two_columns():
    lines = display.wrap_display(["糖尿病"] * 10, width=20)  # 6 columns each: three per line
    assert lines == ["糖尿病" * 3] * 3 + ["糖尿病"]
    assert all(display.display_width(line) <= 20 for line in lines)
    assert display.wrap_display(["x" * 30], width=10) == ["x" * 30]  # a piece is never split


def test_format_masking_fits_the_output_area(demo_tokenizer):
    from medgemma_lib.data import format_masking, to_record

    record = to_record({"question": "What are the symptoms of glaucoma?", "answer": "視神經受損，" * 20})
    for line in format_masking(demo_tokenizer, record).splitlines()[1:]:
        assert display.display_width(line) <= 72


# ----------------------------------------------------------------------------------------------
# Progress lines and widgets


def test_progress_final_line_and_terminal_silence(capsys):
    bar = display.Progress("計算測試集 loss", total=24, notebook=False, enabled=False)
    for _ in range(24):
        bar.update()
    final = bar.close()
    assert final.startswith("計算測試集 loss：24／24 筆 ✓（") and final.endswith("秒）")
    assert capsys.readouterr().out == ""
    assert list(display.progress([1, 2, 3], "x", enabled=False)) == [1, 2, 3]


def test_format_seconds():
    assert display.format_seconds(16.4) == "16 秒"
    assert display.format_seconds(112) == "1 分 52 秒"
    assert display.format_seconds(3 * 3600 + 65) == "3 小時 01 分"


def test_notebook_trainer_progress_line():
    from types import SimpleNamespace

    from medgemma_lib.training.trainer import NotebookChineseProgress

    cb = NotebookChineseProgress()
    cb.started = __import__("time").time() - 52
    cb.train_loss, cb.eval_loss = 2.27531, 2.074
    line = cb.line(SimpleNamespace(global_step=12, max_steps=20))
    expected = "訓練中：第 12／20 步（60%）｜訓練 loss 2.2753｜驗證 loss 2.0740｜已用 52 秒，預估還要 35 秒"
    assert line.startswith(expected)
    assert cb.line(SimpleNamespace(global_step=20, max_steps=20), final=True).startswith("訓練結束：第 20／20 步 ✓")


def test_widget_fallbacks_are_chinese():
    from medgemma_lib.setup import auth

    widget = auth.token_widget("google/medgemma-4b-it", check=False)
    bundle = widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("（權杖輸入框：在 JupyterLab 執行這一格即可顯示")
    assert "VBox(" not in bundle["text/plain"]


def test_quiet_progress_bars_turns_library_bars_off():
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    try:
        assert display.quiet_progress_bars(force=True)
        assert not datasets.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
        assert are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
        enable_progress_bars()
        display._quieted.clear()


# ----------------------------------------------------------------------------------------------
# The bundled CJK font and the plots' labels


def _tc_face():
    from matplotlib.ft2font import FT2Font

    path = plots.cjk_font_file()
    assert path is not None, "noto-cjk-sans-otc (requirements.txt) is not installed"
    for index in range(10):
        face = FT2Font(path, face_index=index)
        if face.family_name == "Noto Sans CJK TC":
            return face
    raise AssertionError("no Traditional Chinese face in the bundled collection")


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]


def _library_figures():
    from medgemma_lib.data import plot_token_lengths
    from medgemma_lib.evaluation import report
    from medgemma_lib.training import monitor

    records = [{"step": 0, "eval_loss": 2.9}, {"step": 2, "loss": 3.2}, {"step": 4, "loss": 2.1, "eval_loss": 2.0}]
    yield "loss", monitor.plot_loss_curve(records)
    lengths = {
        "lengths": {"total": [30, 50, 203, 531, 900]},
        "recommended": {"max_length": 512, "examples_cut_pct": 20.0},
    }
    yield "lengths", plot_token_lengths(lengths).figure
    m = {"loss": 3.29, "rougeL": 25.4, "bleu": 4.2, "chrf": 26.0}
    yield "eval", report.plot_comparison({"models": {"base": m, "tuned": m}, "run": "r", "profile": "demo"})


def test_bundled_font_is_chosen_and_has_every_glyph_of_the_labels():
    plots._state.clear()
    assert plots.setup_cjk_font() == "Noto Sans CJK TC"
    face = _tc_face()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font" would fail here
        for name, fig in _library_figures():
            texts = _texts(fig)
            title = fig.axes[0].get_title()
            assert any("\u4e00" <= ch <= "\u9fff" for ch in title), f"{name}: title not Chinese: {title!r}"
            missing = {ch for t in texts for ch in t if ord(ch) > 127 and face.get_char_index(ord(ch)) == 0}
            assert not missing, f"{name}: no glyph for {sorted(missing)}"
            fig.canvas.draw()
            plt.close(fig)


def test_bundled_font_file_is_the_noto_package():
    path = plots.cjk_font_file()
    assert path and path.endswith("NotoSansCJK-Regular.ttc") and "noto_cjk_sans_otc" in path
    assert math.isclose(_tc_face().units_per_EM, 1000)


def test_bullets_lists_a_mapping_or_a_sequence():
    assert display.bullets({"english": "字詞", "loss": "答案 token"}) == "- english：字詞\n- loss：答案 token"
    assert display.bullets(["loss 下降", "ROUGE-L 上升"]) == "- loss 下降\n- ROUGE-L 上升"
    assert display.bullets([]) == ""
