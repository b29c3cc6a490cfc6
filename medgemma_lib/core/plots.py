"""Plot helpers shared by the steps: a CJK font that comes with the requirements, so plot labels are Chinese.

Chinese labels need a CJK font, and a fresh machine often has none. The pinned requirements include the PyPI
package ``noto-cjk-sans-otc`` (Google's Noto Sans CJK, SIL Open Font License 1.1): :func:`setup_cjk_font`
registers its font file with matplotlib and selects the Traditional Chinese face, "Noto Sans CJK TC". A CJK
font the system has (Noto Sans CJK, Source Han, Microsoft JhengHei, PingFang, ...) is used when that
package is missing. Only when neither exists does :func:`label` return the English text instead, so a plot
never shows empty boxes.
"""

from __future__ import annotations

import os

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


def cjk_font_file() -> str | None:
    """The Noto Sans CJK file of the ``noto-cjk-sans-otc`` package, or None when it is not installed."""
    try:
        import noto_cjk_sans_otc
    except ImportError:
        return None
    path = str(noto_cjk_sans_otc.FONT_PATH)
    return path if os.path.isfile(path) else None


def setup_cjk_font() -> str | None:
    """Configure matplotlib to use a CJK font (the bundled Noto Sans CJK TC first); return its name or None."""
    if "font" in _state:
        return _state["font"]

    matplotlib.use("Agg") if not _in_notebook() else None

    bundled = cjk_font_file()
    if bundled and not any(f.fname == bundled for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(bundled)  # all faces of the collection (JP, KR, SC, TC, HK)
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
