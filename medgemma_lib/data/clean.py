"""Map columns, validate and clean a raw table; every dropped row is counted by reason.

The invariant the report relies on: ``rows_in == kept + sum(dropped.values())``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field

from medgemma_lib.core.errors import DataError

REQUIRED = ("question", "answer")
OPTIONAL = ("source", "focus_area", "qtype")
# Reasons, in report order, with the Chinese label shown to the learner.
DROP_REASONS = {
    "malformed": "格式錯誤的列",
    "empty_question": "問題是空的",
    "empty_answer": "答案是空的",
    "control_tokens": "含有對話模板的控制符號（例如 <start_of_turn>）",
    "duplicate": "完全重複（問題與答案都相同）",
    "answer_too_long": "答案超過長度上限（drop）",
}
# What the HTML cleanup counts, with the Chinese label shown to the learner.
CLEAN_COUNTS = {
    "html_tags": "移除的 HTML 標籤",
    "html_entities": "解碼的 HTML 字元實體（例如 &amp;）",
    "rows_with_html": "含 HTML 而被清理的列",
    "emptied_by_html": "清理後答案或問題變成空的列（計入捨棄原因「空的」）",
}
# Literal Gemma control tokens in data would be parsed as real turn markers and break the masking.
_CONTROL_TOKENS = re.compile(
    r"<(?:bos|eos|pad|start_of_turn|end_of_turn|start_of_image|end_of_image|image_soft_token)>"
)
# HTML cleanup: only these known tags are removed; "<140/90", "a < b", "<5 mm" or "<start_of_turn>" are text.
# Attributes must be name=value (no bare words), so "if a <b and c> d" is text too.
_HTML_LINE_TAGS = (
    "br",
    "p",
    "div",
    "ul",
    "ol",
    "tr",
    "table",
    "thead",
    "tbody",
    "hr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
)
_HTML_SPACE_TAGS = ("td", "th")
_HTML_INLINE_TAGS = ("a", "b", "strong", "i", "em", "u", "span", "font", "small", "sup", "sub", "code", "abbr")
_HTML_TAG = re.compile(
    r"<(/?)(li|" + "|".join((*_HTML_LINE_TAGS, *_HTML_SPACE_TAGS, *_HTML_INLINE_TAGS)) + r")"
    r"(?=[\s/>])(?:\s+[a-z_:][-a-z0-9_:.]*\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))*\s*/?>",
    re.IGNORECASE,
)
# Real entity patterns only (a bare "&" or "AT&T" stays as it is).
_HTML_ENTITY = re.compile(r"&(?:[a-z][a-z0-9]{1,31}|#[0-9]{1,7}|#x[0-9a-f]{1,6});", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；;])\s|(?<=[。！？；])|\n")


@dataclass
class CleanResult:
    rows: list[dict[str, str]]
    rows_in: int
    dropped: dict[str, int]
    truncated_answers: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few locations per reason
    # HTML cleanup over every row read (before the drop decisions): tags removed, entities decoded, rows changed.
    cleaned: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLEAN_COUNTS, 0))
    cleaned_examples: list[str] = field(default_factory=list)  # a few locations of rows that carried HTML

    def check(self) -> None:
        total = len(self.rows) + sum(self.dropped.values())
        assert total == self.rows_in, f"rows_in {self.rows_in} != kept {len(self.rows)} + dropped {self.dropped}"


def parse_column_mapping(spec: str | dict | None) -> dict[str, str]:
    """``question=ask,answer=answer`` (or a dict) -> {target: source column}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise DataError(
                    f"--columns 的 {part!r} 格式不對。",
                    hint="格式為 目標欄=檔案中的欄，例如 --columns question=ask,answer=answer,focus_area=department",
                )
            target, src = (x.strip() for x in part.split("=", 1))
            items.append((target, src))
    allowed = (*REQUIRED, *OPTIONAL)
    for target, src in items:
        if target not in allowed:
            raise DataError(
                f"--columns 的目標欄 {target!r} 不認識。",
                hint=f"目標欄只能是：{'、'.join(allowed)}（等號左邊是目標，右邊是檔案中的欄名）。",
            )
        if not src:
            raise DataError(f"--columns 的 {target}= 後面沒有欄名。", hint="例如 question=ask")
    return dict(items)


def resolve_columns(found: list[str], mapping: dict[str, str], where: str) -> dict[str, str]:
    """Which file column feeds each target (header names matched case-insensitively)."""
    by_lower = {c.strip().lower(): c for c in found}
    resolved: dict[str, str] = {}
    for target, src in mapping.items():
        if src.lower() not in by_lower:
            raise DataError(
                f"{where} 沒有 --columns 指定的欄位 {src!r}（用於 {target}）。找到的欄位：{', '.join(found)}。",
                hint="請檢查 --columns 等號右邊的欄名是否與檔案標題列一致。",
            )
        resolved[target] = by_lower[src.lower()]
    for target in (*REQUIRED, *OPTIONAL):
        if target not in resolved and target in by_lower:
            resolved[target] = by_lower[target]
    missing = [t for t in REQUIRED if t not in resolved]
    if missing:
        guess = _guess_mapping(found)
        raise DataError(
            f"{where} 缺少必要欄位 {', '.join(missing)}。找到的欄位：{', '.join(found) or '（無）'}。",
            hint=f"以 --columns 指定對應，例如 --columns {guess}",
        )
    return resolved


def _guess_mapping(found: list[str]) -> str:
    lower = [c.lower() for c in found]
    pick = {}
    for target, words in {
        "question": ("ask", "question", "q", "問題", "问题", "title", "prompt", "input"),
        "answer": ("answer", "response", "a", "回答", "答案", "output", "reply"),
    }.items():
        pick[target] = next((found[lower.index(w)] for w in words if w in lower), found[0] if found else "欄名")
    return f"question={pick['question']},answer={pick['answer']}"


def _tag_replacement(match: re.Match) -> str:
    closing, name = match.group(1), match.group(2).lower()
    if name == "li":
        return "\n" if closing else "\n- "
    if name in _HTML_LINE_TAGS:
        return "\n"
    return " " if name in _HTML_SPACE_TAGS else ""


def _decode_entity(match: re.Match) -> str:
    return html.unescape(match.group(0))


def strip_html(text: str) -> tuple[str, int, int]:
    """Remove known HTML tags (block tags become line breaks, ``<li>`` a "- " line), then decode entities.

    Returns (text, tags removed, entities decoded). Tags go first, so ``&lt;p&gt;`` stays the literal text
    ``<p>`` and an encoded ``&lt;start_of_turn&gt;`` becomes the control token the drop check then catches.
    """
    text, tags = _HTML_TAG.subn(_tag_replacement, text)
    entities = sum(1 for m in _HTML_ENTITY.finditer(text) if html.unescape(m.group(0)) != m.group(0))
    if entities:
        text = _HTML_ENTITY.sub(_decode_entity, text)
    return text, tags, entities


def normalize_inline(text: str) -> str:
    """Collapse every whitespace run to one space (questions, focus areas)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalize_answer(text: str) -> str:
    """Collapse whitespace inside each line, drop empty lines, keep line breaks."""
    lines = (" ".join(line.split()) for line in unicodedata.normalize("NFC", text).replace("\r\n", "\n").split("\n"))
    return "\n".join(line for line in lines if line)


def truncate_at_sentence(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at the last sentence end if one is in the second half."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    cut = ends[-1] if ends and ends[-1] >= limit // 2 else limit
    return head[:cut].rstrip()


def clean_rows(
    rows: list[dict[str, str]],
    columns: dict[str, str],
    *,
    rows_in: int,
    malformed: list[str] = (),
    locations: list[str] | None = None,
    max_answer_chars: int = 8000,
    long_answers: str = "truncate",
    convert=None,
) -> CleanResult:
    """Map columns, remove HTML, normalise whitespace, optionally convert script, drop bad rows (counted)."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["malformed"] = len(malformed)
    examples: dict[str, list[str]] = {"malformed": list(malformed[:20])}
    kept: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    truncated = 0
    cleaned = dict.fromkeys(CLEAN_COUNTS, 0)
    cleaned_examples: list[str] = []
    mapped_sources = set(columns.values())
    for index, raw in enumerate(rows):
        row = {t: raw.get(c) or "" for t, c in columns.items()}
        q_raw, q_tags, q_entities = strip_html(row.get("question", ""))
        a_raw, a_tags, a_entities = strip_html(row.get("answer", ""))
        q = normalize_inline(q_raw)
        a = normalize_answer(a_raw)
        if q_tags + a_tags + q_entities + a_entities:
            cleaned["html_tags"] += q_tags + a_tags
            cleaned["html_entities"] += q_entities + a_entities
            cleaned["rows_with_html"] += 1
            # Text is never dropped silently: a row emptied by the cleanup is counted (and dropped) as empty.
            if (not q and normalize_inline(row.get("question", ""))) or (
                not a and normalize_answer(row.get("answer", ""))
            ):
                cleaned["emptied_by_html"] += 1
            if len(cleaned_examples) < 5:
                cleaned_examples.append(locations[index] if locations else f"第 {index + 1} 筆")
        extras = {
            k: ("" if v is None else str(v)) for k, v in raw.items() if k not in mapped_sources and k not in columns
        }
        if convert is not None:
            q, a = convert(q), convert(a)
        reason, pair = None, (q, a)
        if not q:
            reason = "empty_question"
        elif not a:
            reason = "empty_answer"
        elif _CONTROL_TOKENS.search(q) or _CONTROL_TOKENS.search(a):
            reason = "control_tokens"
        elif pair in seen:
            reason = "duplicate"
        elif len(a) > max_answer_chars:
            if long_answers == "drop":
                reason = "answer_too_long"
            else:
                a = truncate_at_sentence(a, max_answer_chars)
                truncated += 1
        if reason:
            dropped[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < 5:
                examples[reason].append(locations[index] if locations else f"第 {index + 1} 筆")
            continue
        seen.add(pair)
        focus = normalize_inline(row.get("focus_area", ""))
        kept.append(
            {
                **extras,
                "question": q,
                "answer": a,
                "source": normalize_inline(row.get("source", "")),
                "focus_area": convert(focus) if (convert and focus) else focus,
                "qtype": normalize_inline(row.get("qtype", "")),
            }
        )
    result = CleanResult(
        kept, rows_in, dropped, truncated, {k: v for k, v in examples.items() if v}, cleaned, cleaned_examples
    )
    result.check()
    return result
