"""Plot helpers shared by the steps: CJK font selection with an honest English fallback.

Chinese labels need a CJK font. :func:`setup_cjk_font` picks one when the system has it (Noto
Sans CJK, Source Han, Microsoft JhengHei, PingFang, ...). When none is installed it returns
False and :func:`label` returns the English text instead, so a plot never shows empty boxes.
"""

from __future__ import annotations

import matplotlib
from matplotlib import font_manager, rcParams

_CJK_FONT_NAMES = [
    "Noto Sans CJK TC",
    "Noto Sans TC",
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Source Han Sans TC",
    "Source Han Sans",
    "Microsoft JhengHei",
    "PingFang TC",
    "Heiti TC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "AR PL UMing TW",
    "Droid Sans Fallback",
]
_state: dict[str, str | None] = {}


def setup_cjk_font() -> str | None:
    """Configure matplotlib to use an installed CJK font; return its name or None."""
    if "font" in _state:
        return _state["font"]

    matplotlib.use("Agg") if not _in_notebook() else None

    installed = {f.name for f in font_manager.fontManager.ttflist}
    chosen = next((name for name in _CJK_FONT_NAMES if name in installed), None)
    if chosen:
        rcParams["font.sans-serif"] = [chosen, *rcParams.get("font.sans-serif", [])]
        rcParams["font.family"] = "sans-serif"
        rcParams["axes.unicode_minus"] = False
    _state["font"] = chosen
    return chosen


def has_cjk_font() -> bool:
    return setup_cjk_font() is not None


def label(chinese: str, english: str) -> str:
    """The Chinese label when a CJK font is available, else the English one (never empty boxes)."""
    return chinese if has_cjk_font() else english


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False
