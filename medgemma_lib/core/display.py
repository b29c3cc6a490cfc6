"""What a learner sees in a notebook: outputs that still read well when the notebook is opened, not run.

A stored notebook is read in JupyterLab (untrusted on a fresh clone), on GitHub and through nbconvert. Each
of them shows the richest output it can draw and falls back to ``text/plain`` otherwise, so every output the
course stores has a Chinese ``text/plain`` that says what is there:

* :func:`with_fallback`: an ipywidget whose plain-text fallback is a Chinese sentence (「執行這一格即可顯示提問框」)
  instead of ``VBox(children=(HBox(...``. The widget itself is drawn from the widget state that the notebook
  stores when it is executed.
* :class:`Progress`: one Chinese status line, updated in place in a notebook and stored as its final line
  (「計算 loss：24／24 ✓（16 秒）」), instead of a tqdm bar that a stored notebook shows frozen at 0 %.
  :func:`quiet_progress_bars` turns the bars of datasets, transformers and huggingface_hub off in notebooks.
* :class:`Markdown` and :func:`markdown_table`: Markdown whose plain text is the Markdown itself (IPython's
  own shows ``<IPython.core.display.Markdown object>``); tables rendered as Markdown are left-aligned in
  JupyterLab, where HTML tables are right-aligned.
* :func:`frame`: a DataFrame for display with Chinese column names and ``—`` for missing values, never ``NaN``.
* :func:`collapse_repeats`: runs of a repeated word, phrase or line shown once with a count
  (「BOTTOMS……（重複 14 次）」), so a degenerate answer is shown as what it is.
* :func:`human_size` and :func:`display_width` / :func:`wrap_display`: sizes that never read "0.00 MB" and
  line wrapping that counts a CJK character as two columns.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence

MISSING = "—"
NO_ROWS = "（無資料）"  # a table without rows


# ----------------------------------------------------------------------------------------------
# Where we run


def in_notebook() -> bool:
    """True in a Jupyter kernel (JupyterLab, nbconvert/nbclient, nbval); False in a terminal or a script."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the pinned requirements
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


_quieted: list[bool] = []


def quiet_progress_bars(force: bool = False) -> bool:
    """In a notebook, switch off the tqdm bars of datasets, transformers and huggingface_hub; True when done.

    Their notebook bars are widgets that a stored notebook shows frozen at ``0%| | 0/157``; the library shows
    its own :class:`Progress` line instead. In a terminal the bars stay (they are useful there) unless
    ``force``. Called by the functions that notebooks use (loading, training, evaluation, export).
    """
    if not (force or in_notebook()):
        return False
    if _quieted:
        return True
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    _quieted.append(True)
    return True


# ----------------------------------------------------------------------------------------------
# Rich outputs with a Chinese plain-text fallback


def with_fallback(widget, fallback: str):
    """Give ``widget`` a Chinese ``text/plain`` (what a viewer shows where it cannot draw the widget); returns it.

    ipywidgets' own plain text is ``VBox(children=(HBox(...`` . ``fallback`` tells a reader of the stored
    notebook what the widget is and how to get it, e.g. 「（提問框：在 JupyterLab 執行這一格即可顯示）」.
    """
    original = widget._repr_mimebundle_

    def bundle(**kwargs):
        data = original(**kwargs)
        data = dict(data[0] if isinstance(data, tuple) else (data or {}))
        data["text/plain"] = fallback
        return data

    widget._repr_mimebundle_ = bundle  # IPython looks the method up on the instance
    widget.plain_text_fallback = fallback
    return widget


class Markdown:
    """Markdown for display whose ``text/plain`` is the Markdown text itself (readable everywhere)."""

    def __init__(self, text: str):
        self.data = text

    def _repr_markdown_(self) -> str:
        return self.data

    def __repr__(self) -> str:
        return self.data

    def _repr_pretty_(self, printer, cycle):  # IPython's plain-text form
        printer.text(self.data)


class Text:
    """Plain text for display (a status line); ``display_id`` handles update it in place."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer, cycle):
        printer.text(self.text)


def _cell(value) -> str:
    text = MISSING if is_missing(value) else str(value)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(rows: Sequence[Mapping] | object, columns: Sequence[str] | None = None) -> Markdown:
    """A left-aligned Markdown table from a list of dicts or a DataFrame; missing values show as ``—``, no rows as
    「（無資料）」. In a Markdown document, ``.data`` followed by a blank line (a line right after a table joins it)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a DataFrame: its index becomes a column
        df = rows
        if df.index.name is not None or not _is_range_index(df):
            df = df.reset_index()
        rows = df.to_dict("records")
        columns = columns or [str(c) for c in df.columns]
    rows = list(rows)
    if not rows:
        return Markdown(NO_ROWS)
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "|".join(":---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return Markdown("\n".join(lines))


def _is_range_index(df) -> bool:
    import pandas as pd

    return isinstance(df.index, pd.RangeIndex)


def is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value)) if not isinstance(value, (list, tuple, dict, str)) else False
    except (TypeError, ValueError):
        return False


def frame(data, columns: Mapping[str, str] | None = None, digits: int | None = None, index: str | None = None):
    """A DataFrame for display: ``columns`` maps the names to keep onto Chinese names (in that order),
    numbers are rounded to ``digits``, missing values become ``—`` (never ``NaN``); ``index`` names the column
    to use as the index (after renaming)."""
    import pandas as pd

    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    if columns:
        keep = [c for c in columns if c in df.columns]
        df = df[keep].rename(columns=dict(columns))
    df = df.copy()
    for col in df.columns:
        series = df[col]
        if digits is not None and pd.api.types.is_float_dtype(series):
            series = series.round(digits)
        if series.isna().any() or pd.api.types.is_float_dtype(series):
            df[col] = [MISSING if is_missing(v) else _number(v, digits) for v in series]
    if index is not None:
        df = df.set_index(index)
    return df


def _number(value, digits):
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"  # the same decimals in a whole column
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------
# Progress


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} 秒"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} 分 {sec:02d} 秒"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} 小時 {minutes:02d} 分"


class Progress:
    """One Chinese status line: ``desc：done／total`` while it runs, ``desc：total／total ✓（16 秒）`` at the end.

    In a notebook the line is one display updated in place (at most every ``interval`` seconds), so the stored
    notebook keeps the final line; in a terminal a tqdm bar is drawn on standard error (``leave=False``), and the
    caller prints what it wants to keep. ``enabled=False`` shows nothing. Use as an iterator wrapper
    (:meth:`wrap`) or call :meth:`update` / :meth:`close`.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "筆",
        enabled: bool = True,
        interval: float = 0.5,
        notebook: bool | None = None,
    ):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.done = 0
        self.note = ""
        self.started = time.time()
        self.interval = interval
        self.notebook = in_notebook() if notebook is None else notebook
        self._handle = None
        self._bar = None
        self._last = 0.0
        self.closed = False
        if not enabled:
            return
        if self.notebook:
            from IPython.display import display

            self._handle = display(Text(self.line()), display_id=True)
        else:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, leave=False, unit="")
            except ImportError:  # pragma: no cover
                self._bar = None

    def line(self, final: bool = False) -> str:
        count = f"{self.done:,}" + (f"／{self.total:,}" if self.total is not None else "") + f" {self.unit}"
        note = f"｜{self.note}" if self.note else ""
        if final:
            return f"{self.desc}：{count} ✓（{format_seconds(time.time() - self.started)}）{note}"
        return f"{self.desc}：{count}…{note}"

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        now = time.time()
        if self._handle is not None and now - self._last >= self.interval:
            self._handle.update(Text(self.line()))
            self._last = now

    def close(self, note: str | None = None) -> str:
        """Show the final line (in a notebook) and return it."""
        if note is not None:
            self.note = note
        final = self.line(final=True)
        if self.closed or not self.enabled:
            self.closed = True
            return final
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if self._handle is not None:
            self._handle.update(Text(final))
        return final

    def wrap(self, items: Iterable) -> Iterator:
        for item in items:
            yield item
            self.update()
        self.close()


def progress(items: Sequence, desc: str, enabled: bool = True, unit: str = "筆") -> Iterator:
    """``for x in progress(items, "計算 loss")``: :class:`Progress` over a sized sequence."""
    return Progress(desc, total=len(items), unit=unit, enabled=enabled).wrap(items)


# ----------------------------------------------------------------------------------------------
# Text


def collapse_repeats(text: str, min_repeats: int = 3, min_span: int = 12, max_unit: int = 200) -> str:
    """Runs of the same word, phrase or line (``min_repeats`` or more times in a row, together at least
    ``min_span`` characters) shown once, followed by 「……（重複 N 次）」.

    Only consecutive repeats are collapsed, and only when the unit holds two or more non-space characters (or
    one symbol between spaces, ``( ( ( (``), so numbers such as 1000 and ordinary text are left alone.
    """
    if not text:
        return text
    longest, more = str(max_unit), str(min_repeats - 1)
    pattern = re.compile(r"(.{2," + longest + r"}?)(?:\1){" + more + ",}", re.DOTALL)
    out: list[str] = []
    pos = 0
    while True:
        m = pattern.search(text, pos)
        if m is None:
            out.append(text[pos:])
            break
        unit = m.group(1)
        count = len(m.group(0)) // len(unit)
        core = unit.strip()
        spaced_symbol = len(core) == 1 and unit != core and not core.isdigit()  # "( ( ( (" but not "0 0 0"
        if (len(core) < 2 and not spaced_symbol) or len(m.group(0)) < min_span:
            out.append(text[pos : m.start() + 1])
            pos = m.start() + 1
            continue
        out.append(text[pos : m.start()])
        lead = unit[: len(unit) - len(unit.lstrip())]
        trail = unit[len(unit.rstrip()) :]
        end = m.end()
        if trail and text.startswith(lead + unit.strip(), end):  # "word word word" ends without the space
            count += 1
            end += len(lead + unit.strip())
            trail = ""
        out.append(f"{lead}{unit.strip()}……（重複 {count} 次）{trail}")
        pos = end
    return "".join(out)


def clip(text: str, limit: int = 600, markdown: bool = False) -> str:
    """An answer for display: repeats collapsed (:func:`collapse_repeats`), whitespace joined, cut at ``limit``;
    with ``markdown``, escaped (:func:`md_escape`) to sit inside a Markdown report as the model wrote it."""
    text = collapse_repeats(text or "")
    text = collapse_repeats(" ".join(text.split()))
    text = text if len(text) <= limit else text[:limit] + "…"
    return md_escape(text) if markdown else text


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def md_escape(text: str) -> str:
    """Model text inside Markdown: ``*``, ``_``, backquotes, brackets, ``<``/``>`` and ``|`` shown literally."""
    return _MD_SPECIAL.sub(r"\\\1", text or "")


def human_size(num_bytes: float) -> str:
    """``536.2 MB``, ``33.4 MB``, ``4.2 KB``, ``812 B`` (decimal units, as file managers show them)."""
    n = float(num_bytes)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def char_width(ch: str) -> int:
    """Columns a character takes in a notebook's output area: 2 for CJK and full-width, 0 for combining marks."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F", "A") else 1


def display_width(text: str) -> int:
    return sum(char_width(ch) for ch in text)


def wrap_display(pieces: Iterable[str], width: int = 80) -> list[str]:
    """Join ``pieces`` into lines of at most ``width`` display columns (a piece is never split)."""
    lines: list[str] = []
    current, used = "", 0
    for piece in pieces:
        w = display_width(piece)
        if current and used + w > width:
            lines.append(current)
            current, used = "", 0
        current += piece
        used += w
    if current or not lines:
        lines.append(current)
    return lines


def bullets(items: Mapping | Iterable) -> str:
    """A plain-text list, one ``- `` line per item; a mapping shows as ``- key：value`` (a notebook prints it)."""
    if isinstance(items, Mapping):
        return "\n".join(f"- {key}：{value}" for key, value in items.items())
    return "\n".join(f"- {item}" for item in items)
