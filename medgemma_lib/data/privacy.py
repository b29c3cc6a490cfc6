"""Find and mask likely personal data in question/answer text (de-identification).

This is pattern matching tuned for Taiwan and English medical text, not a guarantee of anonymity.
It looks for:

* Taiwan national ID numbers (checksum verified) and resident certificate numbers (old and new
  formats, checksum verified);
* phone numbers: Taiwan mobiles and landlines, and international numbers written with ``+``;
* e-mail addresses;
* dates of birth (a date only counts when a birth cue such as 出生 / 生日 / DOB / born is next to it);
* medical record numbers and health-insurance card numbers (only after their cue words);
* personal names next to a title (王小明先生, 陳醫師, 李小姐, Dr. Smith).

:func:`scan_text` returns :class:`Finding` objects; :func:`deidentify_frame` applies one of the
modes ``report`` / ``mask`` / ``refuse`` to a table and returns a report that never contains the
raw personal data (examples are shown already masked).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from medgemma_lib.core.errors import DataError

MODES = ("report", "mask", "refuse")
MAX_EXAMPLES = 5

# Type key -> Chinese label; the label is also the mask placeholder text: [label].
TYPE_LABELS: dict[str, str] = {
    "national_id": "身分證字號",
    "resident_id": "居留證號",
    "phone": "電話",
    "email": "電子郵件",
    "birth_date": "出生日期",
    "medical_record": "病歷號",
    "nhi_card": "健保卡號",
    "name": "姓名",
}


@dataclass(frozen=True)
class Finding:
    """One piece of likely personal data found in a text.

    ``type`` is a key of :data:`TYPE_LABELS`, ``label`` its Chinese name, ``start``/``end`` the
    character span in the original text and ``text`` the matched characters (raw personal data:
    never write it into reports or logs).
    """

    type: str
    label: str
    start: int
    end: int
    text: str

    @property
    def placeholder(self) -> str:
        return placeholder(self.type)


def placeholder(type_key: str) -> str:
    """The typed mask placeholder for a type key, e.g. ``[身分證字號]``."""
    return f"[{TYPE_LABELS[type_key]}]"


# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space map one-to-one to ASCII, so spans
# found in the folded text are valid spans of the original text.
_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_FOLD[0x3000] = 0x20


def _fold(text: str) -> str:
    return text.translate(_FOLD)


# ---------------------------------------------------------------------------------------------
# Taiwan ID numbers
# ---------------------------------------------------------------------------------------------

# Official letter codes of the first character (I, O, W, Z ... are out of alphabetical order).
_LETTER_CODES = {
    "A": 10,
    "B": 11,
    "C": 12,
    "D": 13,
    "E": 14,
    "F": 15,
    "G": 16,
    "H": 17,
    "I": 34,
    "J": 18,
    "K": 19,
    "L": 20,
    "M": 21,
    "N": 22,
    "O": 35,
    "P": 23,
    "Q": 24,
    "R": 25,
    "S": 26,
    "T": 27,
    "U": 28,
    "V": 29,
    "W": 32,
    "X": 30,
    "Y": 31,
    "Z": 33,
}
_WEIGHTS = (1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1)


def _checksum_ok(first: str, second_value: int, digits: str) -> bool:
    """Weighted checksum shared by the ID formats: letter code (2 digits), second value, 8 digits."""
    code = _LETTER_CODES.get(first.upper())
    if code is None or len(digits) != 8:
        return False
    values = [code // 10, code % 10, second_value, *(int(d) for d in digits)]
    return sum(v * w for v, w in zip(values, _WEIGHTS)) % 10 == 0


def is_valid_national_id(value: str) -> bool:
    """True for a Taiwan national ID (letter, 1 or 2, eight digits) with a valid check digit."""
    v = value.upper()
    if not re.fullmatch(r"[A-Z][12][0-9]{8}", v):
        return False
    return _checksum_ok(v[0], int(v[1]), v[2:])


def is_valid_resident_id(value: str) -> bool:
    """True for a resident certificate number with a valid check digit.

    Old format (before 2021): letter + A-D + eight digits; the second letter counts as the units
    digit of its letter code (A→0, B→1, C→2, D→3). New format (2021 on): letter + 8 or 9 + eight
    digits, checked like a national ID.
    """
    v = value.upper()
    if re.fullmatch(r"[A-Z][A-D][0-9]{8}", v):
        return _checksum_ok(v[0], _LETTER_CODES[v[1]] % 10, v[2:])
    if re.fullmatch(r"[A-Z][89][0-9]{8}", v):
        return _checksum_ok(v[0], int(v[1]), v[2:])
    return False


_ID_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z][12ABCDabcd89][0-9]{8}(?![A-Za-z0-9])")

# ---------------------------------------------------------------------------------------------
# Phones, e-mail
# ---------------------------------------------------------------------------------------------

_SEP = r"[-\s.]?"
_PHONE_RES = [
    # Taiwan mobile: 0912-345-678, 0912 345678, 0912345678
    re.compile(r"(?<![0-9A-Za-z+/.-])09[0-9]{2}" + _SEP + r"[0-9]{3}" + _SEP + r"[0-9]{3}(?![0-9])"),
    # Taiwan landline with parentheses: (02)2345-6789, (049) 222-3333
    re.compile(r"\(0[2-9][0-9]{0,2}\)\s?[0-9]{3,4}[-\s]?[0-9]{3,4}(?![0-9])"),
    # Taiwan landline with a separator after the area code: 02-2345-6789, 07 123 4567, 049-2223333
    re.compile(r"(?<![0-9A-Za-z+/.-])0[2-8][0-9]{0,2}[-\s][0-9]{3,4}[-\s]?[0-9]{3,4}(?![0-9])"),
    # Taipei landline written without separators: 0223456789
    re.compile(r"(?<![0-9A-Za-z+/.-])02[0-9]{8}(?![0-9])"),
    # International, always written with +: +886 912 345 678, +1 (301) 496-4000, (+886)2-2345-6789
    re.compile(r"(?<![0-9A-Za-z])\(?\+[1-9][0-9]{0,2}\)?(?:[-\s.]?\(?[0-9]{1,5}\)?){2,6}(?![0-9])"),
]
# Plain digit strings only count as phones right after a phone cue: 電話 0423456789.
_PHONE_CUE_RE = re.compile(
    r"(?:電話|手機|市話|室話|連絡|聯絡|聯繫|撥打|傳真|[Tt]el\.?|[Pp]hone|[Mm]obile|[Cc]ell|[Ff]ax)"
    r"[^0-9\n]{0,6}?(0[2-9][0-9]{7,8})(?![0-9])"
)

_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9])"
)

# ---------------------------------------------------------------------------------------------
# Dates of birth
# ---------------------------------------------------------------------------------------------

_ZH_NUM = r"[0-9〇零一二三四五六七八九十]"
_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DATE_RE = re.compile(
    "|".join(
        [
            # 民國74年3月12日, 1985 年 3 月 12 日, 七十四年三月十二日
            r"(?:民國|西元)?\s?"
            + _ZH_NUM
            + r"{2,4}\s?年\s?"
            + _ZH_NUM
            + r"{1,3}\s?月\s?"
            + _ZH_NUM
            + r"{1,3}\s?[日號]",
            # 1985-03-12, 1985/3/12, 1985.03.12
            r"(?<![0-9])(?:19|20)[0-9]{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12][0-9]|3[01])(?![0-9])",
            # 03/12/1985, 12-03-1985, ROC 74/03/12, 074.03.12
            r"(?<![0-9])[0-9]{1,3}[-/.][0-9]{1,2}[-/.][0-9]{2,4}(?![0-9])",
            # March 12, 1985 / Mar. 12th 1985
            _MONTHS + r"\s[0-9]{1,2}(?:st|nd|rd|th)?,?\s(?:19|20)[0-9]{2}(?![0-9])",
            # 12 March 1985
            r"(?<![0-9])[0-9]{1,2}(?:st|nd|rd|th)?\s" + _MONTHS + r",?\s(?:19|20)[0-9]{2}(?![0-9])",
        ]
    )
)
_BIRTH_CUE_BEFORE_RE = re.compile(
    r"(?:出生|生日|生於|誕生|出世|[Dd]\.?[Oo]\.?[Bb]\.?|[Bb]irth\s?[Dd]ate|[Dd]ate\sof\s[Bb]irth|"
    r"[Bb]irthday|[Bb]orn(?:\son)?)[^。；;\n]{0,8}$"
)
# 1985年3月2日生 is a birth date; 生產 (gave birth), 生病 (fell ill) are not birth cues.
_BIRTH_CUE_AFTER_RE = re.compile(r"^\s?(?:出生|誕生|生(?!產|产|病|氣|气|活|理|效|小孩|了))")
# Any birth cue; dates are only searched in a window around one (the full date search is slow).
_BIRTH_CUE_ANY_RE = re.compile(r"出生|生日|生於|誕生|出世|[日號]\s?生|[Dd]\.?[Oo]\.?[Bb]|[Bb]irth|[Bb]orn")


def _birth_dates(text: str) -> Iterable[tuple[str, int, int]]:
    windows: list[tuple[int, int]] = []
    for cue in _BIRTH_CUE_ANY_RE.finditer(text):
        lo, hi = max(0, cue.start() - 30), cue.end() + 40
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    for lo, hi in windows:
        for m in _DATE_RE.finditer(text, lo, min(hi, len(text))):
            before = text[max(0, m.start() - 20) : m.start()]
            after = text[m.end() : m.end() + 3]
            if _BIRTH_CUE_BEFORE_RE.search(before) or _BIRTH_CUE_AFTER_RE.search(after):
                start = m.start()
                while start < m.end() and text[start].isspace():
                    start += 1
                yield "birth_date", start, m.end()


# ---------------------------------------------------------------------------------------------
# Record numbers behind cue words
# ---------------------------------------------------------------------------------------------

_MRN_RE = re.compile(
    r"(?:病歷號碼|病歷編號|病歷號|病歷|MRN|[Mm]edical\s[Rr]ecord\s(?:[Nn]umber|[Nn]o\.?|#)|[Cc]hart\s(?:[Nn]umber|[Nn]o\.?|#))"
    r"\s?(?:是|為|:|：|#|No\.?)?\s?([A-Za-z]{0,2}-?[0-9]{5,12})(?![0-9])"
)
_NHI_RE = re.compile(
    r"(?:健保卡卡號|健保卡號碼|健保卡號|健保卡|健保號碼|NHI\s?[Cc]ard\s?(?:[Nn]umber|[Nn]o\.?)?)"
    r"\s?(?:是|為|:|：|#)?\s?([0-9]{4}[-\s]?[0-9]{4}[-\s]?[0-9]{4})(?![0-9])"
)

# ---------------------------------------------------------------------------------------------
# Names next to titles
# ---------------------------------------------------------------------------------------------

# Common Taiwan surnames. Left out on purpose: characters that are far more often a word right
# before a title than a surname (向 as in 請向醫師諮詢, 和, 於, 常, 成, 由, 從, 及, 全, 那).
_COMPOUND_SURNAMES = "歐陽|司馬|諸葛|上官|張簡|范姜|司徒|東方|夏侯|皇甫|長孫|慕容"
_SURNAMES = (
    "陳林黃張李王吳劉蔡楊許鄭謝郭洪曾邱廖賴周徐蘇葉莊呂江何蕭羅高潘簡朱鍾游彭詹胡施沈余盧梁趙顏柯翁"
    "魏孫戴范方宋鄧杜傅侯曹薛丁卓阮馬董温溫唐藍石蔣古紀姚連馮歐程湯黎田康姜汪白鄒尤巫鐘涂龔嚴韓袁"
    "黎金童陸夏柳邵錢伍倪溫于譚駱熊任甘秦顧毛章史官萬俞雷粘饒張凃闕崔尹易殷麥"
    # Simplified forms, for Simplified Chinese data (陳 → 陈 ...)
    "陈刘张黄杨许郑谢赖苏叶庄吕萧罗钟颜赵孙邓冯汤蒋纪邹龚严韩陆钱谭骆顾饶阙"
)
_ZH_TITLES = (
    "先生|小姐|女士|太太|醫師|醫生|護理師|護士|藥師|老師|教授|院長|主任|阿姨|伯伯|阿伯|阿嬤|阿公|奶奶|爺爺|同學|"
    "治療師|營養師|個管師|心理師|"
    "医师|医生|护理师|护士|药师|院长|爷爷|同学|治疗师|营养师|心理师"
)
# Characters that never start or end a given name here: verbs and particles that commonly sit
# between a surname-like character and a title (常看醫師, 高度懷疑醫師, 林口的醫師).
_NOT_NAME_CHARS = (
    "的了是在和與跟向給讓被請問看找去說叫有要會能可就都也還又再才很太最更和或及而但因為所以如果"
    "位個名些每各該此這那哪誰某其他她它們我你您之於由從把對將把等及以並且卻嗎呢吧啊喔哦"
    "主專醫科院所部門診病患者人員師生業務級次天年月日時分號"
    "这们对将还为专医门诊员务级时号间个么让给说问请长"
    "一二三四五六七八九十百千萬兩幾多少老壞男"
)
_ZH_NAME_RE = re.compile(
    r"(" + _COMPOUND_SURNAMES + r"|[" + _SURNAMES + r"])"
    r"([\u4e00-\u9fff]{0,2}?)"
    r"(" + _ZH_TITLES + r")"
)
_EN_NAME_RE = re.compile(
    r"(?<![A-Za-z])(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s"
    r"((?:[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?)(?:\s[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?)?)"
)
# Capitalised words after a title that are not names. Spelled-out "Doctor" is not a title here:
# MedQuAD headings read "Talking With Your Doctor Bring this ...".
_EN_NOT_NAMES = {
    "Office",
    "Offices",
    "Visit",
    "Visits",
    "Appointment",
    "Appointments",
    "If",
    "The",
    "A",
    "An",
    "And",
    "Or",
    "Who",
    "Will",
    "May",
    "Can",
    "Should",
    "Says",
    "Said",
    "Is",
    "Are",
}
# Two-character words whose second character is also a surname: 兒童醫師 is not Dr. 童.
# Found on real Chinese medical dialogues: 謝謝醫生, 感謝醫生, 健康檢查醫生, 高中同學.
_ZH_WORDS_ENDING_IN_SURNAME = {
    "兒童",
    "孩童",
    "學童",
    "蛋白",
    "明白",
    "空白",
    "結石",
    "基金",
    "現金",
    "年金",
    "相關",
    "有關",
    "機關",
    "感謝",
    "感谢",
    "多謝",
    "多谢",
    "謝謝",
    "谢谢",
    "健康",
    "小康",
    "安康",
    "儿童",
    "学童",
    "结石",
    "现金",
    "相关",
    "有关",
    "机关",
}
# Words that start with a surname character but are not names: 謝謝醫生 is "thank you, doctor".
_ZH_WORDS_STARTING_WITH_SURNAME = {
    "謝謝",
    "谢谢",
    "高中",
    "高級",
    "高级",
    "健康",
    "康復",
    "康复",
    "黃金",
    "黄金",
    "溫柔",
    "温柔",
    "方便",
    "紀錄",
    "纪录",
    "白天",
    "白袍",
    "金牌",
    "石頭",
    "石头",
    "古代",
    "古早",
    "田野",
    "江湖",
    "夏天",
    "秦朝",
    "余生",
    "何時",
    "何时",
    "何處",
    "何处",
}


# Role mailboxes of organisations (info@, service@, 2020@...) are contact points, not personal data.
_ROLE_MAILBOX_RE = re.compile(
    r"^(?:[0-9._-]+|.*(?:info|help|service|contact|support|staff|webmail|webmaster|admin|office|noreply|no-reply|enquir|inquir|feedback).*)@",
    re.IGNORECASE,
)


def _zh_names(text: str) -> Iterable[tuple[int, int]]:
    for m in _ZH_NAME_RE.finditer(text):
        surname, given, _title = m.group(1), m.group(2), m.group(3)
        if any(ch in _NOT_NAME_CHARS for ch in given):
            continue
        if len(surname) == 1 and surname in _NOT_NAME_CHARS:
            continue
        start = m.start(1)
        if len(surname) == 1 and start > 0 and text[start - 1] + surname in _ZH_WORDS_ENDING_IN_SURNAME:
            continue
        if (surname + given)[:2] in _ZH_WORDS_STARTING_WITH_SURNAME:
            continue
        yield start, m.end(2)


def _en_names(text: str) -> Iterable[tuple[int, int]]:
    for m in _EN_NAME_RE.finditer(text):
        words = m.group(1).split()
        if words[0] in _EN_NOT_NAMES:
            continue
        if len(words) == 2 and words[1] in _EN_NOT_NAMES:
            yield m.start(1), m.start(1) + len(words[0])
        else:
            yield m.start(1), m.end(1)


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------

# Earlier types win when spans overlap (an e-mail's digits are not a phone, a record number
# is not a phone).
_PRIORITY = ["email", "national_id", "resident_id", "nhi_card", "medical_record", "birth_date", "phone", "name"]


def _raw_spans(text: str) -> Iterable[tuple[str, int, int]]:
    for m in _EMAIL_RE.finditer(text) if "@" in text else ():
        if not _ROLE_MAILBOX_RE.match(m.group(0)):
            yield "email", m.start(), m.end()
    for m in _ID_RE.finditer(text):
        value = m.group(0)
        if is_valid_national_id(value):
            yield "national_id", m.start(), m.end()
        elif is_valid_resident_id(value):
            yield "resident_id", m.start(), m.end()
    for m in _NHI_RE.finditer(text):
        yield "nhi_card", m.start(1), m.end(1)
    for m in _MRN_RE.finditer(text):
        yield "medical_record", m.start(1), m.end(1)
    yield from _birth_dates(text)
    for pattern in _PHONE_RES:
        for m in pattern.finditer(text):
            start, end = m.start(), m.end()
            while end > start and not text[end - 1].isdigit() and text[end - 1] != ")":
                end -= 1
            # A greedy match can run into a following number: drop trailing groups until it fits E.164.
            while sum(ch.isdigit() for ch in text[start:end]) > 15:
                cut = max(text.rfind(sep, start, end) for sep in " -.(")
                if cut <= start:
                    break
                end = cut
            digits = sum(ch.isdigit() for ch in text[start:end])
            if 8 <= digits <= 15:
                yield "phone", start, end
    for m in _PHONE_CUE_RE.finditer(text):
        yield "phone", m.start(1), m.end(1)
    for start, end in _zh_names(text):
        yield "name", start, end
    for start, end in _en_names(text):
        yield "name", start, end


def scan_text(text: str) -> list[Finding]:
    """Find likely personal data in ``text``; non-overlapping findings sorted by position."""
    if not isinstance(text, str) or not text:
        return []
    folded = _fold(text)
    rank = {t: i for i, t in enumerate(_PRIORITY)}
    candidates = sorted(set(_raw_spans(folded)), key=lambda s: (rank[s[0]], -(s[2] - s[1]), s[1]))
    chosen: list[tuple[str, int, int]] = []
    for type_key, start, end in candidates:
        if end <= start:
            continue
        if any(start < c_end and c_start < end for _, c_start, c_end in chosen):
            continue
        chosen.append((type_key, start, end))
    chosen.sort(key=lambda s: s[1])
    return [Finding(t, TYPE_LABELS[t], s, e, text[s:e]) for t, s, e in chosen]


def mask_text(text: str, findings: Sequence[Finding] | None = None) -> str:
    """Replace every finding in ``text`` with its typed placeholder, e.g. ``[電話]``."""
    if findings is None:
        findings = scan_text(text)
    out, last = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        out.append(text[last : f.start])
        out.append(f.placeholder)
        last = f.end
    out.append(text[last:])
    return "".join(out)


def _snippet(masked: str, anchor: int, width: int = 40) -> str:
    """A short window of already-masked text around position ``anchor``."""
    start = max(0, anchor - width // 2)
    end = min(len(masked), anchor + width)
    text = masked[start:end].replace("\n", " ")
    return ("…" if start > 0 else "") + text + ("…" if end < len(masked) else "")


def deidentify_frame(frame, mode: str = "report", columns: Sequence[str] = ("question", "answer")):
    """Scan text columns of a table for personal data and report, mask, or refuse.

    ``mode``: ``"report"`` returns the frame unchanged, ``"mask"`` returns a copy where each
    finding is replaced by its placeholder, ``"refuse"`` raises :class:`DataError` when anything
    is found. Columns that the frame lacks are skipped.

    Returns ``(frame, report)``; the report holds ``mode``, ``counts`` (type key → count, all
    types listed), ``counts_by_label`` (Chinese label → count, found types only), ``total``,
    ``rows_affected``, ``rows_scanned``, ``columns`` and up to :data:`MAX_EXAMPLES` ``examples``
    (``row`` = 0-based position, ``column``, ``type``, ``label``, ``masked`` snippet). Examples are
    cut from masked text, so the report never contains the raw personal data.
    """
    if mode not in MODES:
        raise DataError(
            f"不認得的去識別化模式：{mode!r}。",
            hint="請使用 report（只回報）、mask（遮蔽）或 refuse（發現個資即停止）。",
        )
    present = [c for c in columns if c in frame.columns]
    counts = {key: 0 for key in TYPE_LABELS}
    examples: list[dict] = []
    affected: set[int] = set()
    masked_columns: dict[str, list] = {}
    for column in present:
        values = frame[column].tolist()
        new_values = list(values)
        for pos, value in enumerate(values):
            if not isinstance(value, str):
                continue
            findings = scan_text(value)
            if not findings:
                continue
            affected.add(pos)
            masked = mask_text(value, findings)
            new_values[pos] = masked
            shift = 0
            for f in findings:
                counts[f.type] += 1
                if len(examples) < MAX_EXAMPLES and not any(e["type"] == f.type for e in examples):
                    examples.append(
                        {
                            "row": pos,
                            "column": column,
                            "type": f.type,
                            "label": f.label,
                            "masked": _snippet(masked, f.start + shift),
                        }
                    )
                shift += len(f.placeholder) - (f.end - f.start)
        masked_columns[column] = new_values
    total = sum(counts.values())
    report = {
        "mode": mode,
        "columns": present,
        "rows_scanned": int(len(frame)),
        "rows_affected": len(affected),
        "total": total,
        "counts": counts,
        "counts_by_label": {TYPE_LABELS[k]: v for k, v in counts.items() if v},
        "examples": examples,
    }
    if mode == "refuse" and total:
        raise DataError(
            "資料中發現疑似個人資料，已停止處理（--deidentify refuse）。\n" + format_report(report),
            hint=(
                "請先清理原始檔案，移除姓名、身分證字號、電話等個資；或改用 --deidentify mask "
                "以類型標記（例如 [身分證字號]、[電話]）自動遮蔽後再繼續。"
            ),
        )
    if mode == "mask" and total:
        frame = frame.copy()
        for column, new_values in masked_columns.items():
            frame[column] = new_values
    return frame, report


def format_report(report: dict) -> str:
    """Traditional Chinese summary of a :func:`deidentify_frame` report (counts and examples)."""
    if not report.get("total"):
        return f"個資掃描：{report.get('rows_scanned', 0)} 筆資料中未發現疑似個人資料。"
    parts = "、".join(f"{label} {n} 處" for label, n in report["counts_by_label"].items())
    lines = [
        f"個資掃描：{report['rows_scanned']} 筆資料中有 {report['rows_affected']} 筆含疑似個人資料，"
        f"共 {report['total']} 處（{parts}）。"
    ]
    if report.get("mode") == "mask":
        lines.append("已用類型標記遮蔽（例如 [電話]）。")
    if report.get("examples"):
        lines.append("範例（已遮蔽）：")
        for ex in report["examples"]:
            lines.append(f"  第 {ex['row'] + 1} 筆（{ex['column']} 欄，{ex['label']}）：{ex['masked']}")
    return "\n".join(lines)
