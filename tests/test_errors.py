"""``core.errors``: a lesson shows a user's mistake as its Chinese message, not a traceback."""

from __future__ import annotations

import pytest

from medgemma_lib.core.errors import DataError, raised_by


def _read(encoding: str):
    if encoding != "utf-8":
        raise DataError("無法以 cp950 解碼第 2 行。", hint="請改用 --encoding gb18030。")
    return "ok"


def test_raised_by_returns_the_error_or_none():
    err = raised_by(_read, encoding="cp950")
    assert (
        isinstance(err, DataError)
        and err.format() == "無法以 cp950 解碼第 2 行。\n解決方法：請改用 --encoding gb18030。"
    )
    assert raised_by(_read, "utf-8") is None


def test_raised_by_lets_other_exceptions_through():
    with pytest.raises(ZeroDivisionError):
        raised_by(lambda: 1 / 0)
