"""Read question/answer tables from CSV, JSONL/JSON or the official MedQuAD XML collection.

Every reader returns a :class:`RawTable`: the rows as dicts of strings, plus the rows it could not
parse (with their line number or file name) so the cleaning report can count them. Text files are
decoded strictly: the encoding is given, or detected from the BOM, strict UTF-8, or
charset-normalizer; a guess that could be wrong (Big5 vs GB18030 look alike) is refused with a
message that suggests ``--encoding`` instead of producing mojibake.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_lib.errors import DataError

FORMATS = ("csv", "jsonl", "xml")
# Encodings we detect on our own; a detector result outside these needs --encoding.
_SUPERSETS = {
    "ascii": "utf-8", "utf_8": "utf-8", "utf-8": "utf-8", "utf_8_sig": "utf-8-sig", "utf-8-sig": "utf-8-sig",
    "big5": "cp950", "big5hkscs": "cp950", "cp950": "cp950",
    "gb2312": "gb18030", "gbk": "gb18030", "gb18030": "gb18030", "hz": None,
    "utf_16": "utf-16", "utf-16": "utf-16", "utf_16_le": "utf-16-le", "utf_16_be": "utf-16-be",
}
_SUPPORTED_TEXT = "UTF-8、UTF-8 BOM、Big5（cp950）、GB18030、UTF-16"
MAX_LISTED_PROBLEMS = 20


@dataclass
class RawTable:
    """Rows read from one input, before cleaning."""

    rows: list[dict[str, str]]
    columns: list[str]
    format: str
    encoding: str | None = None
    encoding_detected: bool = False
    malformed: list[str] = field(default_factory=list)  # where each unparseable row was ("第 12 行", "file.xml")
    locations: list[str] = field(default_factory=list)  # where each row came from, parallel to rows

    @property
    def rows_in(self) -> int:
        return len(self.rows) + len(self.malformed)


# ----------------------------------------------------------------------------------------------
# Format and encoding


def detect_format(path: Path, forced: str | None = None) -> str:
    """``csv``, ``jsonl`` or ``xml`` from ``forced`` or the file name / folder content."""
    if forced:
        if forced not in FORMATS:
            raise DataError(f"不支援的格式 {forced!r}。", hint=f"--format 可用：{'、'.join(FORMATS)}")
        return forced
    name = path.name.lower()
    if path.is_dir() or name.endswith((".tar.gz", ".tgz", ".tar", ".xml")):
        return "xml"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise DataError(
        f"無法從檔名判斷 {path.name} 的格式（副檔名 {path.suffix or '（無）'}）。",
        hint="支援 .csv、.jsonl/.json、MedQuAD XML 資料夾或 .tar.gz；Excel 檔請先另存為 CSV（UTF-8），"
        "或以 --format csv|jsonl|xml 指定格式。",
    )


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
            raise DataError(f"不認識的編碼名稱 {encoding!r}。", hint=f"常用的有：utf-8、utf-8-sig、cp950（Big5）、gb18030、utf-16。") from None
        try:
            return data.decode(encoding), encoding, False
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{where} 無法以指定的編碼 {encoding} 解碼：第 {_line_of(data, exc.start)} 行附近（第 {exc.start} 個位元組）有不合法的位元組。",
                hint="請確認檔案的實際編碼；不加 --encoding 讓程式自動偵測，或改用 "
                + "、".join(e for e in ("utf-8", "cp950", "gb18030", "utf-16") if codecs.lookup(e).name != codecs.lookup(encoding).name)
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
    encoding = "utf-16-le" if odd > 0.3 * half and even < 0.05 * half else "utf-16-be" if even > 0.3 * half and odd < 0.05 * half else None
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
        hint="請以 --encoding 指定，例如 --encoding cp950（台灣 Big5）、--encoding gb18030（中國大陸 GBK）或 --encoding utf-8。",
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
    from charset_normalizer import from_bytes

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


# ----------------------------------------------------------------------------------------------
# CSV


def read_csv(path: Path, encoding: str | None = None) -> RawTable:
    """CSV (comma, or tab for .tsv) with a header row; rows with a wrong field count are malformed."""
    text, enc, detected = read_text_file(path, encoding)
    delimiter = "\t" if path.name.lower().endswith(".tsv") else ","
    csv.field_size_limit(16 * 1024 * 1024)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"輸入檔 {path.name} 是空的。", hint="請確認匯出是否成功。") from None
    except csv.Error as exc:
        raise DataError(f"{path.name} 第 1 行（標題列）無法解析：{exc}。", hint="請確認這是逗號分隔的 CSV。") from None
    columns = [h.strip() for h in header]
    if not any(columns):
        raise DataError(f"{path.name} 第 1 行（標題列）是空的。", hint="CSV 第一行必須是欄位名稱，例如 question,answer,source,focus_area。")
    rows: list[dict[str, str]] = []
    malformed: list[str] = []
    locations: list[str] = []
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(
                f"{path.name} 第 {start} 行開始的引號格式錯誤（{exc}），之後的內容無法可靠地分欄。",
                hint="通常是欄位內的雙引號沒有寫成兩個（\"\"）或少了結尾引號；請在試算表軟體中重新匯出 CSV。",
            ) from None
        line = start
        start = reader.line_num + 1
        if not values or (len(values) == 1 and not values[0].strip()):
            continue  # blank line: not a row
        if len(values) != len(columns):
            malformed.append(f"第 {line} 行（{len(values)} 個欄位，標題列有 {len(columns)} 個）")
            continue
        rows.append(dict(zip(columns, values)))
        locations.append(f"第 {line} 行")
    if not rows and malformed:
        raise DataError(
            f"{path.name} 的 {len(malformed)} 個資料列欄位數都與標題列不符：{'；'.join(malformed[:3])}。",
            hint="請確認分隔符號是逗號（Tab 分隔請存成 .tsv）、欄位內的逗號有用雙引號括起來。",
        )
    if not rows and not malformed:
        raise DataError(f"{path.name} 只有標題列（{', '.join(columns)}），沒有任何資料列。", hint="請確認匯出時有包含資料。")
    return RawTable(rows, columns, "csv", enc, detected, malformed, locations)


# ----------------------------------------------------------------------------------------------
# JSONL / JSON


def read_jsonl(path: Path, encoding: str | None = None) -> RawTable:
    """JSON Lines (one object per line) or a JSON list of objects."""
    text, enc, detected = read_text_file(path, encoding)
    rows: list[dict[str, str]] = []
    malformed: list[str] = []
    locations: list[str] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name} 第 {exc.lineno} 行第 {exc.colno} 欄的 JSON 格式錯誤：{exc.msg}。", hint="請用 JSON 檢查工具修正，或改存為每行一筆的 JSONL。") from None
        numbered = [(f"第 {i + 1} 筆", item) for i, item in enumerate(items)]
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"第 {i} 行", json.loads(line)))
            except json.JSONDecodeError as exc:
                malformed.append(f"第 {i} 行（JSON 錯誤：{exc.msg}）")
    columns: list[str] = []
    for where, item in numbered:
        if not isinstance(item, dict):
            malformed.append(f"{where}（不是物件，而是 {type(item).__name__}）")
            continue
        row = {str(k): _as_text(v) for k, v in item.items()}
        for k in row:
            if k not in columns:
                columns.append(k)
        rows.append(row)
        locations.append(where)
    if not rows and not malformed:
        raise DataError(f"{path.name} 沒有任何資料（只有空行）。", hint="JSONL 每行一筆，例如 {\"question\": \"...\", \"answer\": \"...\"}。")
    if not rows:
        raise DataError(
            f"{path.name} 的 {len(malformed)} 行都無法解析成問答物件：{'；'.join(malformed[:3])}。",
            hint='JSONL 每行必須是一個 JSON 物件，例如 {"question": "...", "answer": "..."}；請用 JSON 檢查工具修正。',
        )
    for row in rows:
        for c in columns:
            row.setdefault(c, "")
    return RawTable(rows, columns, "jsonl", enc, detected, malformed, locations)


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# MedQuAD XML

_XML_COLUMNS = ["question", "answer", "source", "focus_area", "qtype", "document_id", "collection"]


def _xml_pairs(root: ET.Element, collection: str) -> list[dict[str, str]] | None:
    """QA pairs of one MedQuAD document (current or older layout); None when it has no QA container."""
    source = root.get("source") or root.get("corpus") or ""
    doc_id = root.get("id") or root.get("fid") or root.get("docid") or ""
    focus = root.findtext("Focus") or root.findtext("doctitle-focus") or ""
    if root.find("QAPairs") is None and root.find("qaPairs") is None:
        return None
    pairs = root.findall("./QAPairs/QAPair") or root.findall("./qaPairs/pair")
    out = []
    for pair in pairs:
        q = pair.find("Question")
        if q is None:
            q = pair.find("question")
        a = pair.find("Answer")
        if a is None:
            a = pair.find("answer")
        out.append({
            "question": "".join(q.itertext()) if q is not None else "",
            "answer": "".join(a.itertext()) if a is not None else "",
            "source": source, "focus_area": focus,
            "qtype": (q.get("qtype") if q is not None else "") or "",
            "document_id": doc_id, "collection": collection,
        })
    return out


def _iter_xml_members(path: Path):
    """Yield (display name, collection folder, bytes) for every .xml under a folder or in a tarball."""
    if path.is_dir():
        for f in sorted(path.rglob("*.xml")):
            yield str(f.relative_to(path)), f.parent.name, f.read_bytes()
    elif path.name.lower().endswith(".xml"):
        yield path.name, path.parent.name, path.read_bytes()
    else:
        try:
            # Read in archive order (seeking back in a gzip stream re-decompresses it), then sort.
            found = []
            with tarfile.open(path, "r:*") as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith(".xml"):
                        handle = tar.extractfile(m)
                        found.append((m.name, Path(m.name).parent.name, handle.read() if handle else b""))
            yield from sorted(found)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"無法讀取壓縮檔 {path.name}：{exc}。", hint="請確認檔案下載完整，或先用 tar -xzf 解壓縮後指向資料夾。") from None


def read_medquad_xml(path: Path) -> RawTable:
    """The official MedQuAD XML collection (folder, .tar.gz, or one .xml file)."""
    rows: list[dict[str, str]] = []
    malformed: list[str] = []
    locations: list[str] = []
    files = 0
    for name, collection, data in _iter_xml_members(path):
        files += 1
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            malformed.append(f"{name}（XML 錯誤：{exc}）")
            continue
        pairs = _xml_pairs(root, collection)
        if pairs is None:  # a document with an empty <QAPairs/> simply has no rows
            malformed.append(f"{name}（不是 MedQuAD 文件：找不到 <QAPairs>）")
            continue
        rows.extend(pairs)
        locations.extend(f"{name} 第 {k} 組" for k in range(1, len(pairs) + 1))
    if files == 0:
        raise DataError(
            f"{path} 裡找不到任何 .xml 檔。",
            hint="請指向 MedQuAD 的資料夾（含 1_CancerGov_QA … 12_MPlusHerbsSupplements_QA）或 medquad_xml.tar.gz。",
        )
    if not rows:
        raise DataError(
            f"{path} 的 {files} 個 XML 檔中沒有任何 MedQuAD 問答（<Document><QAPairs><QAPair>）。",
            hint="請確認這是 MedQuAD 的 XML 集合（github.com/abachaa/MedQuAD）。",
        )
    return RawTable(rows, list(_XML_COLUMNS), "xml", "utf-8", False, malformed, locations)


def read_table(path: str | Path, fmt: str | None = None, encoding: str | None = None) -> RawTable:
    """Read ``path`` in the given or detected format."""
    p = Path(path).expanduser()
    if not p.exists():
        near = ""
        if p.parent.is_dir():
            similar = sorted(x.name for x in p.parent.iterdir() if x.suffix.lower() in (".csv", ".jsonl", ".json", ".gz"))[:5]
            near = f"同一資料夾裡有：{'、'.join(similar)}。" if similar else ""
        raise DataError(f"找不到輸入檔 {p}。", hint=f"請確認路徑（相對於目前的工作資料夾 {Path.cwd().name}/）。{near}")
    kind = detect_format(p, fmt)
    if kind == "csv":
        if p.is_dir():
            raise DataError(f"{p} 是資料夾，不是 CSV 檔。", hint="請指向 .csv 檔；MedQuAD XML 資料夾請用 --format xml。")
        return read_csv(p, encoding)
    if kind == "jsonl":
        if p.is_dir():
            raise DataError(f"{p} 是資料夾，不是 JSONL 檔。", hint="請指向 .jsonl 檔。")
        return read_jsonl(p, encoding)
    return read_medquad_xml(p)
