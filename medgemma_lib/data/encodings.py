"""Decode text files strictly: a given encoding, or one detected without ever guessing silently.

Order: BOM (UTF-8 / UTF-16) -> UTF-16 without BOM (NULs on every other byte) -> strict UTF-8 ->
charset-normalizer for Big5 (cp950) / GB18030 / UTF-16. Big5 bytes often also decode as GB18030
(into plausible-looking nonsense) and vice versa, so when both fit and the text is short, or the
detector cannot separate them, the file is refused with a hint to pass ``--encoding``.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from charset_normalizer import from_bytes

from medgemma_lib.core.errors import DataError

# Encodings we detect on our own (mapped to the superset codec); a detector result outside these needs --encoding.
_SUPERSETS = {
    "ascii": "utf-8",
    "utf_8": "utf-8",
    "utf-8": "utf-8",
    "utf_8_sig": "utf-8-sig",
    "utf-8-sig": "utf-8-sig",
    "big5": "cp950",
    "big5hkscs": "cp950",
    "cp950": "cp950",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "gb18030": "gb18030",
    "hz": None,
    "utf_16": "utf-16",
    "utf-16": "utf-16",
    "utf_16_le": "utf-16-le",
    "utf_16_be": "utf-16-be",
}
_SUPPORTED_TEXT = "UTF-8、UTF-8 BOM、Big5（cp950）、GB18030、UTF-16"


def _looks_binary(data: bytes) -> bool:
    sample = data[:65536]
    if not sample:
        return False
    control = sum(1 for b in sample if b < 32 and b not in (9, 10, 13, 12))
    return control / len(sample) > 0.05


def _line_of(text_bytes: bytes, offset: int) -> int:
    return text_bytes.count(b"\n", 0, offset) + 1


def decode_bytes(data: bytes, where: str, encoding: str | None = None) -> tuple[str, str, bool]:
    """Decode ``data`` strictly. Returns (text, encoding used, whether it was detected)."""
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(
                f"不認識的編碼名稱 {encoding!r}。", hint="常用的有：utf-8、utf-8-sig、cp950（Big5）、gb18030、utf-16。"
            ) from None
        try:
            return data.decode(encoding), encoding, False
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{where} 無法以指定的編碼 {encoding} 解碼："
                f"第 {_line_of(data, exc.start)} 行附近（第 {exc.start} 個位元組）有不合法的位元組。",
                hint="請確認檔案的實際編碼；不加 --encoding 讓程式自動偵測，或改用 "
                + "、".join(
                    e
                    for e in ("utf-8", "cp950", "gb18030", "utf-16")
                    if codecs.lookup(e).name != codecs.lookup(encoding).name
                )
                + " 試試。",
            ) from None
    if data.startswith(codecs.BOM_UTF8):
        return _strict(data, "utf-8-sig", where), "utf-8-sig", True
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _strict(data, "utf-16", where), "utf-16", True
    utf16 = _utf16_without_bom(data)
    if utf16:
        return data.decode(utf16), utf16, True
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\x00" in text or _looks_binary(data):
            raise _binary_error(where)
        if _short_non_cjk_utf8(text, data):
            raise _ambiguous_error(where, ["utf-8", "gb18030", "cp950"])
        return text, "utf-8", True
    return _detect_legacy(data, where)


def _utf16_without_bom(data: bytes) -> str | None:
    """``utf-16-le``/``-be`` when NUL bytes sit on every other position (ASCII in UTF-16) and it decodes cleanly."""
    sample = data[: 4096 - 4096 % 2]
    if len(sample) < 4 or b"\x00" not in sample:
        return None
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    half = len(sample) // 2
    encoding = (
        "utf-16-le"
        if odd > 0.3 * half and even < 0.05 * half
        else "utf-16-be"
        if even > 0.3 * half and odd < 0.05 * half
        else None
    )
    if encoding is None or len(data) % 2:
        return None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text or _looks_binary(text.encode("utf-8")) else encoding


def _cjk(text: str) -> int:
    return sum(1 for ch in text if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")


def _non_ascii_bytes(data: bytes) -> int:
    return sum(1 for b in data if b >= 0x80)


def _legacy_decodes(data: bytes) -> list[str]:
    ok = []
    for enc in ("gb18030", "cp950"):
        try:
            data.decode(enc)
            ok.append(enc)
        except UnicodeDecodeError:
            pass
    return ok


def _short_non_cjk_utf8(text: str, data: bytes) -> bool:
    """A few non-ASCII bytes that are valid UTF-8 but no Chinese: could be GB/Big5 Chinese misread."""
    n = _non_ascii_bytes(data)
    return 0 < n < 64 and _cjk(text) == 0 and any(_cjk(data.decode(e)) for e in _legacy_decodes(data))


def _ambiguous_error(where: str, candidates: list[str]) -> DataError:
    return DataError(
        f"{where} 的編碼無法確定：可能是 {'、'.join(candidates)}，猜錯會產生亂碼，所以沒有繼續。",
        hint=(
            "請以 --encoding 指定，例如 --encoding cp950（台灣 Big5）、"
            "--encoding gb18030（中國大陸 GBK）或 --encoding utf-8。"
        ),
    )


def _strict(data: bytes, encoding: str, where: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where} 開頭的 BOM 表示 {encoding}，但第 {_line_of(data, exc.start)} 行附近有不合法的位元組。",
            hint="檔案可能被截斷或混用了編碼；請用文字編輯器另存為 UTF-8 再試。",
        ) from None


def _binary_error(where: str) -> DataError:
    return DataError(
        f"{where} 看起來不是文字檔（含有大量控制字元或 NUL 位元組），可能是壓縮檔、Excel 或損毀的檔案。",
        hint="請提供 CSV、JSONL 或 MedQuAD XML；Excel 檔請先另存為「CSV UTF-8」。",
    )


def _detect_legacy(data: bytes, where: str) -> tuple[str, str, bool]:
    """Big5 / GB18030 / UTF-16 without BOM, decided by charset-normalizer, refused when unclear."""

    matches = list(from_bytes(data[:200_000] if len(data) > 200_000 else data))
    candidates: dict[str, float] = {}
    for m in matches:
        target = _SUPERSETS.get(m.encoding.lower().replace("-", "_"), None)
        if target and target not in candidates:
            candidates[target] = m.chaos
    if not candidates:
        if b"\x00" in data or _looks_binary(data):
            raise _binary_error(where)
        guess = matches[0].encoding if matches else "（無法判斷）"
        raise DataError(
            f"{where} 不是 UTF-8，也無法可靠判斷它的編碼（偵測器猜測：{guess}）。",
            hint=f"請以 --encoding 指定編碼（支援自動偵測：{_SUPPORTED_TEXT}），或把檔案另存為 UTF-8。",
        )
    ranked = sorted(candidates.items(), key=lambda kv: kv[1])
    best, best_chaos = ranked[0]
    # Big5 bytes also decode as GB18030 (and vice versa) into plausible-looking nonsense.
    rivals = [enc for enc, chaos in ranked[1:] if {enc, best} == {"cp950", "gb18030"} and chaos - best_chaos < 0.05]
    # With little text both decodings can look plausible; refuse rather than risk mojibake.
    if best in ("cp950", "gb18030") and _non_ascii_bytes(data) < 64 and len(_legacy_decodes(data)) == 2:
        rivals = [e for e in ("cp950", "gb18030") if e != best]
    if rivals or best_chaos > 0.2:
        raise _ambiguous_error(where, [best, *rivals])
    try:
        return data.decode(best), best, True
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where} 看起來是 {best}，但第 {_line_of(data, exc.start)} 行附近有無法以 {best} 解碼的位元組。",
            hint="檔案可能混用了編碼；請以 --encoding 指定正確的編碼，或另存為 UTF-8。",
        ) from None


def read_text_file(path: Path, encoding: str | None = None) -> tuple[str, str, bool]:
    """Read and strictly decode a text file; errors name the file and how to fix it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"無法讀取輸入檔 {path}：{exc.strerror or exc}。", hint="請確認路徑與讀取權限。") from None
    if not data.strip():
        raise DataError(f"輸入檔 {path} 是空的（0 筆資料）。", hint="請確認匯出是否成功，或選擇另一個檔案。")
    return decode_bytes(data, f"輸入檔 {path.name}", encoding)
