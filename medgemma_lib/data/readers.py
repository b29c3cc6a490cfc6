"""Read question/answer tables from CSV, JSONL/JSON or the official MedQuAD XML collection.

Every reader returns a :class:`RawTable`: the rows as dicts of strings, plus the rows it could not
parse (with their line number or file name) so the cleaning report can count them. Text files are
decoded by :mod:`medgemma_lib.data.encodings`, which refuses a guess that could be wrong.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_lib.core.errors import DataError
from medgemma_lib.core.paths import require_input
from medgemma_lib.data.encodings import decode_bytes, read_text_file  # noqa: F401 - re-exported

FORMATS = ("csv", "jsonl", "xml")


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
        raise DataError(
            f"{path.name} 第 1 行（標題列）是空的。",
            hint="CSV 第一行必須是欄位名稱，例如 question,answer,source,focus_area。",
        )
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
                hint='通常是欄位內的雙引號沒有寫成兩個（""）或少了結尾引號；請在試算表軟體中重新匯出 CSV。',
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
        raise DataError(
            f"{path.name} 只有標題列（{', '.join(columns)}），沒有任何資料列。", hint="請確認匯出時有包含資料。"
        )
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
            raise DataError(
                f"{path.name} 第 {exc.lineno} 行第 {exc.colno} 欄的 JSON 格式錯誤：{exc.msg}。",
                hint="請用 JSON 檢查工具修正，或改存為每行一筆的 JSONL。",
            ) from None
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
        raise DataError(
            f"{path.name} 沒有任何資料（只有空行）。",
            hint='JSONL 每行一筆，例如 {"question": "...", "answer": "..."}。',
        )
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
        out.append(
            {
                "question": "".join(q.itertext()) if q is not None else "",
                "answer": "".join(a.itertext()) if a is not None else "",
                "source": source,
                "focus_area": focus,
                "qtype": (q.get("qtype") if q is not None else "") or "",
                "document_id": doc_id,
                "collection": collection,
            }
        )
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
            raise DataError(
                f"無法讀取壓縮檔 {path.name}：{exc}。", hint="請確認檔案下載完整，或先用 tar -xzf 解壓縮後指向資料夾。"
            ) from None


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
    p = require_input(path)
    kind = detect_format(p, fmt)
    if kind == "csv":
        if p.is_dir():
            raise DataError(
                f"{p} 是資料夾，不是 CSV 檔。", hint="請指向 .csv 檔；MedQuAD XML 資料夾請用 --format xml。"
            )
        return read_csv(p, encoding)
    if kind == "jsonl":
        if p.is_dir():
            raise DataError(f"{p} 是資料夾，不是 JSONL 檔。", hint="請指向 .jsonl 檔。")
        return read_jsonl(p, encoding)
    return read_medquad_xml(p)
