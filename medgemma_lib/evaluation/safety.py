"""Answer safety: emergency alerts before model text, and the disclaimer after it.

Every place that shows a generated answer calls :func:`present_answer`, which puts an emergency
message first when the question describes an emergency (call 119; suicide prevention lines for
self-harm), then the answer, then :data:`medgemma_lib.MEDICAL_DISCLAIMER`. A UI that wants to warn
before generation starts calls :func:`guard_question`.

The rules live in ``resources/emergency_rules.yaml`` (a teacher can extend it); extra rule files
are merged from the ``MEDGEMMA_EMERGENCY_RULES`` environment variable (paths separated by
:data:`os.pathsep`) or the ``extra`` argument of :func:`emergency_rules`. Matching is regular
expressions over the question text: a teaching aid, not a clinical triage system.

Policy: a rule that matches a general information question ("What are the symptoms of a
stroke?", 「中風的症狀有哪些？」) or a medical-history story (「我兩年前癲癇發作過，要吃什麼藥？」)
does not alert, unless the rule says ``info_questions: alert`` (suicide and self-harm always show
the help lines). A question counts as an information question when it has an information cue and
no first-person / family / right-now cue; as history when it has a past cue (去年, diagnosed, years
ago) and no still-happening cue (正在, 剛剛, right now). When in doubt, alert.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core.errors import ConfigError

RULES_ENV = "MEDGEMMA_EMERGENCY_RULES"
_BUNDLED = "emergency_rules.yaml"
_RULE_KEYS = {"id", "title", "title_en", "message", "match", "info_questions"}
_TOP_KEYS = {"version", "messages", "policy", "rules"}
_POLICY_KEYS = ("information_question", "personal_or_current", "asker_phrases", "past_event", "still_happening")


@dataclass(frozen=True)
class EmergencyRule:
    """One rule: fires when any trigger matches; a trigger is a tuple of regexes that must all match."""

    id: str
    title: str
    title_en: str
    message_zh: str  # template: {title} and {title_en} are filled in per alert
    message_en: str
    triggers: tuple[tuple[re.Pattern, ...], ...]
    info_questions: str = "skip"
    source: str = ""

    def matched_text(self, text: str) -> str | None:
        """The text the first firing trigger matched (joined with ' + '), or None."""
        for trigger in self.triggers:
            hits = [p.search(text) for p in trigger]
            if all(hits):
                return " + ".join(h.group(0) for h in hits)
        return None


@dataclass(frozen=True)
class RuleSet:
    """Loaded rules plus the information-question policy patterns."""

    rules: tuple[EmergencyRule, ...]
    information_question: tuple[re.Pattern, ...] = ()
    personal_or_current: tuple[re.Pattern, ...] = ()
    asker_phrases: tuple[re.Pattern, ...] = ()
    past_event: tuple[re.Pattern, ...] = ()
    still_happening: tuple[re.Pattern, ...] = ()
    sources: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def get(self, rule_id: str) -> EmergencyRule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


@dataclass(frozen=True)
class EmergencyAlert:
    """What a UI shows before any model text. ``rule_ids`` lists every rule that fired."""

    rule_id: str
    title: str
    message: str
    rule_ids: tuple[str, ...]
    matched: str
    language: str

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------
# Loading and validation (errors name the file and line)
# ---------------------------------------------------------------------------------------------


def _err(source: str, node, what: str, hint: str) -> ConfigError:
    line = node.start_mark.line + 1 if node is not None and getattr(node, "start_mark", None) else None
    where = f"{source} 第 {line} 行" if line else source
    return ConfigError(f"緊急規則檔有誤（{where}）：{what}", hint=hint)


def _mapping(node, source: str, what: str):
    if not isinstance(node, yaml.MappingNode):
        raise _err(source, node, f"{what}應該是「鍵: 值」的對照表。", "請參考內建的 emergency_rules.yaml 的寫法。")
    out = {}
    for key_node, value_node in node.value:
        if key_node.value in out:
            raise _err(source, key_node, f"{what}中的「{key_node.value}」重複出現。", "每個鍵只能寫一次。")
        out[key_node.value] = (key_node, value_node)
    return out


def _scalar(node, source: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
        raise _err(source, node, f"{what}應該是一段非空白的文字。", '請用引號包住文字，例如 "嘴歪|臉歪"。')
    return str(node.value)


def _sequence(node, source: str, what: str) -> list:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise _err(
            source, node, f"{what}應該是非空的清單（每項以「- 」開頭）。", "請參考內建的 emergency_rules.yaml 的寫法。"
        )
    return list(node.value)


def _regex(node, source: str, what: str) -> re.Pattern:
    text = _scalar(node, source, what)
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise _err(
            source,
            node,
            f"{what}不是有效的正規表示式：{text!r}（{exc}）。",
            "請檢查括號是否成對、特殊字元（如 ( ) [ ] ? * + \\）是否需要加反斜線。",
        ) from None


def _unknown_keys(found: dict, allowed: set, source: str, what: str) -> None:
    for key, (key_node, _) in found.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"是不是要寫「{close[0]}」？" if close else f"可用的鍵：{'、'.join(sorted(allowed))}。"
            raise _err(source, key_node, f"{what}有不認得的鍵「{key}」。", hint)


def _parse_file(path: Path, source: str) -> dict:
    """Parse one rule file into plain data with compiled regexes; raise ConfigError with the line."""

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"找不到緊急規則檔：{source}", hint=f"請確認路徑是否正確，或取消設定環境變數 {RULES_ENV}。"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"無法讀取緊急規則檔：{source}（{exc}）", hint="請確認檔案存在且以 UTF-8 編碼儲存。"
        ) from None
    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" 第 {mark.line + 1} 行" if mark else ""
        raise ConfigError(
            f"緊急規則檔有誤（{source}{line}）：YAML 格式錯誤（{exc.problem or exc}）。",
            hint="請檢查縮排（用空白，不要用 Tab）、冒號後面的空白，以及引號是否成對。",
        ) from None
    if root is None:
        raise ConfigError(f"緊急規則檔是空的：{source}", hint="請至少寫一個 rules 清單。")
    top = _mapping(root, source, "檔案最上層")
    _unknown_keys(top, _TOP_KEYS, source, "檔案最上層")

    messages: dict[str, tuple[str, str]] = {}
    if "messages" in top:
        for name, (name_node, msg_node) in _mapping(top["messages"][1], source, "messages").items():
            msg = _mapping(msg_node, source, f"訊息「{name}」")
            _unknown_keys(msg, {"zh", "en"}, source, f"訊息「{name}」")
            if "zh" not in msg:
                raise _err(source, name_node, f"訊息「{name}」缺少 zh（中文訊息）。", '請加上 zh: "..."。')
            zh = _scalar(msg["zh"][1], source, f"訊息「{name}」的 zh")
            en = _scalar(msg["en"][1], source, f"訊息「{name}」的 en") if "en" in msg else ""
            messages[name] = (zh, en)

    policy: dict[str, list[re.Pattern]] = {k: [] for k in _POLICY_KEYS}
    if "policy" in top:
        found = _mapping(top["policy"][1], source, "policy")
        _unknown_keys(found, set(_POLICY_KEYS), source, "policy")
        for key, (_, value_node) in found.items():
            policy[key] = [
                _regex(n, source, f"policy.{key} 的項目") for n in _sequence(value_node, source, f"policy.{key}")
            ]

    rules: list[dict] = []
    if "rules" in top:
        seen: set[str] = set()
        for rule_node in _sequence(top["rules"][1], source, "rules"):
            rule = _mapping(rule_node, source, "規則")
            _unknown_keys(rule, _RULE_KEYS, source, "規則")
            for required in ("id", "title", "message", "match"):
                if required not in rule:
                    raise _err(
                        source,
                        rule_node,
                        f"規則缺少必填的「{required}」。",
                        "每條規則都要有 id、title、message、match。",
                    )
            rule_id = _scalar(rule["id"][1], source, "規則的 id")
            if rule_id in seen:
                raise _err(
                    source,
                    rule["id"][1],
                    f"規則 id「{rule_id}」在同一個檔案中重複。",
                    "請改用不同的 id；要取代內建規則請寫在另一個檔案。",
                )
            seen.add(rule_id)
            mode = "skip"
            if "info_questions" in rule:
                mode = _scalar(rule["info_questions"][1], source, "info_questions")
                if mode not in ("skip", "alert"):
                    raise _err(
                        source,
                        rule["info_questions"][1],
                        f"info_questions 只能是 skip 或 alert，不能是「{mode}」。",
                        "skip：知識問題不提醒；alert：一律提醒。",
                    )
            triggers = []
            for item in _sequence(rule["match"][1], source, f"規則「{rule_id}」的 match"):
                if isinstance(item, yaml.MappingNode):
                    entry = _mapping(item, source, "match 的項目")
                    _unknown_keys(entry, {"all_of"}, source, "match 的項目")
                    if "all_of" not in entry:
                        raise _err(
                            source,
                            item,
                            "match 的項目應該是一個正規表示式，或 all_of 清單。",
                            '例如 - all_of: ["胸痛", "冷汗"]。',
                        )
                    parts = _sequence(entry["all_of"][1], source, "all_of")
                    triggers.append(tuple(_regex(n, source, f"規則「{rule_id}」all_of 的項目") for n in parts))
                else:
                    triggers.append((_regex(item, source, f"規則「{rule_id}」match 的項目"),))
            message_node = rule["message"][1]
            if isinstance(message_node, yaml.MappingNode):
                msg = _mapping(message_node, source, f"規則「{rule_id}」的 message")
                _unknown_keys(msg, {"zh", "en"}, source, f"規則「{rule_id}」的 message")
                if "zh" not in msg:
                    raise _err(source, message_node, f"規則「{rule_id}」的 message 缺少 zh。", '請加上 zh: "..."。')
                message: tuple[str, str] | str = (
                    _scalar(msg["zh"][1], source, "message.zh"),
                    _scalar(msg["en"][1], source, "message.en") if "en" in msg else "",
                )
            else:
                message = _scalar(message_node, source, f"規則「{rule_id}」的 message")
            title = _scalar(rule["title"][1], source, f"規則「{rule_id}」的 title")
            rules.append(
                {
                    "id": rule_id,
                    "title": title,
                    "title_en": _scalar(rule["title_en"][1], source, "title_en")
                    if "title_en" in rule
                    else rule_id.replace("_", " "),
                    "message": message,
                    "message_node": message_node,
                    "triggers": tuple(triggers),
                    "info_questions": mode,
                    "source": source,
                }
            )
    return {"messages": messages, "policy": policy, "rules": rules}


def _rule_paths(extra: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    paths: list[Path] = []
    env = os.environ.get(RULES_ENV, "").strip()
    if env:
        paths += [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    if extra is not None:
        items = [extra] if isinstance(extra, (str, os.PathLike)) else list(extra)
        paths += [Path(p).expanduser() for p in items]
    return paths


_CACHE: dict[tuple, RuleSet] = {}


def emergency_rules(extra: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> RuleSet:
    """Load the bundled rules merged with extra files (env ``MEDGEMMA_EMERGENCY_RULES``, then ``extra``).

    A later file's rule with an existing id replaces it; new ids are appended; messages are merged
    by name; policy pattern lists are extended. Invalid files raise
    :class:`~medgemma_lib.core.errors.ConfigError` naming the file and line.
    """
    bundled = resources.files("medgemma_lib") / "resources" / _BUNDLED
    files = [(Path(str(bundled)), f"medgemma_lib/resources/{_BUNDLED}")]
    files += [(p, str(p)) for p in _rule_paths(extra)]
    key = tuple((str(p), p.stat().st_mtime_ns if p.exists() else None) for p, _ in files)
    if key in _CACHE:
        return _CACHE[key]

    messages: dict[str, tuple[str, str]] = {}
    policy: dict[str, list[re.Pattern]] = {k: [] for k in _POLICY_KEYS}
    merged: dict[str, dict] = {}
    for path, source in files:
        parsed = _parse_file(path, source)
        messages.update(parsed["messages"])
        for k in _POLICY_KEYS:
            policy[k] += parsed["policy"][k]
        for rule in parsed["rules"]:
            merged[rule["id"]] = rule  # dict keeps first-insertion order; replacement keeps the slot

    built = []
    for rule in merged.values():
        message = rule["message"]
        if isinstance(message, str):
            if message not in messages:
                raise _err(
                    rule["source"],
                    rule["message_node"],
                    f"規則「{rule['id']}」使用的訊息「{message}」沒有定義。",
                    f'可用的訊息：{"、".join(sorted(messages)) or "（無）"}；或直接寫 message: {{zh: "..."}}。',
                )
            message = messages[message]
        zh, en = message
        fmt = {"title": rule["title"], "title_en": rule["title_en"]}
        try:
            zh.format(**fmt), en.format(**fmt)  # validate now; formatted per alert in check_emergency
        except (KeyError, IndexError, ValueError) as exc:
            raise _err(
                rule["source"],
                rule["message_node"],
                f"規則「{rule['id']}」的訊息含有無法替換的大括號（{exc}）。",
                "訊息中只能用 {title} 與 {title_en}；要顯示大括號本身請寫 {{ }}。",
            ) from None
        built.append(
            EmergencyRule(
                id=rule["id"],
                title=rule["title"],
                title_en=rule["title_en"],
                message_zh=zh,
                message_en=en,
                triggers=rule["triggers"],
                info_questions=rule["info_questions"],
                source=rule["source"],
            )
        )
    ruleset = RuleSet(
        rules=tuple(built),
        information_question=tuple(policy["information_question"]),
        personal_or_current=tuple(policy["personal_or_current"]),
        asker_phrases=tuple(policy["asker_phrases"]),
        past_event=tuple(policy["past_event"]),
        still_happening=tuple(policy["still_happening"]),
        sources=tuple(s for _, s in files),
    )
    _CACHE.clear()
    _CACHE[key] = ruleset
    return ruleset


# ---------------------------------------------------------------------------------------------
# Checking questions
# ---------------------------------------------------------------------------------------------

_CJK_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile(r"[A-Za-z]")


def question_language(text: str) -> str:
    """``"en"`` for a question with Latin letters and no Chinese characters, else ``"zh"``."""
    return "en" if _LATIN_RE.search(text) and not _CJK_RE.search(text) else "zh"


def is_information_question(text: str, rules: RuleSet | None = None) -> bool:
    """True for a general knowledge question with no first-person, family or right-now cue."""
    rules = rules or emergency_rules()
    if not any(p.search(text) for p in rules.information_question):
        return False
    stripped = text
    for p in rules.asker_phrases:
        stripped = p.sub(" ", stripped)
    return not any(p.search(stripped) for p in rules.personal_or_current)


def is_past_event(text: str, rules: RuleSet | None = None) -> bool:
    """True for a medical-history story (last year, diagnosed, 兩年前) with no still-happening cue."""
    rules = rules or emergency_rules()
    if not any(p.search(text) for p in rules.past_event):
        return False
    return not any(p.search(text) for p in rules.still_happening)


def check_emergency(text: str, rules: RuleSet | None = None) -> EmergencyAlert | None:
    """Return the alert to show before any model text when ``text`` describes an emergency.

    All firing rules are collected (an overdose can also be self-harm) and their distinct
    messages joined, first rule first. English questions get the Chinese message and the English
    line (with generic local emergency numbers). Returns None when nothing fires.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    rules = rules or emergency_rules()
    info = None
    fired: list[tuple[EmergencyRule, str]] = []
    for rule in rules:
        matched = rule.matched_text(text)
        if matched is None:
            continue
        if rule.info_questions == "skip":
            if info is None:
                info = is_information_question(text, rules) or is_past_event(text, rules)
            if info:
                continue
        fired.append((rule, matched))
    if not fired:
        return None
    language = question_language(text)
    # Rules sharing one message template give one message naming all their titles.
    groups: dict[tuple[str, str], list[EmergencyRule]] = {}
    for rule, _ in fired:
        groups.setdefault((rule.message_zh, rule.message_en), []).append(rule)
    lines: list[str] = []
    for (zh, en), members in groups.items():
        fmt = {"title": "、".join(r.title for r in members), "title_en": "; ".join(r.title_en for r in members)}
        lines.append(zh.format(**fmt))
        if language == "en" and en:
            lines.append(en.format(**fmt))
    first = fired[0][0]
    return EmergencyAlert(
        rule_id=first.id,
        title=first.title,
        message="\n".join(lines),
        rule_ids=tuple(r.id for r, _ in fired),
        matched=fired[0][1],
        language=language,
    )


def guard_question(question: str) -> str | None:
    """The emergency message to show before generation starts, or None."""
    alert = check_emergency(question)
    return alert.message if alert else None


def present_answer(question: str, answer: str, disclaimer: bool = True) -> str:
    """What every UI shows: emergency message (if any), then the answer, then the disclaimer.

    Safe to call on an answer that already carries the alert or the disclaimer: neither is
    repeated. ``disclaimer=False`` for an answer inside a block of answers that shows the disclaimer
    once for all of them (:func:`medgemma_lib.models.generation.show_answers`).
    """
    body = (answer or "").strip()
    parts: list[str] = []
    alert = check_emergency(question)
    if alert and alert.message not in body:
        parts.append(alert.message)
    if body:
        parts.append(body)
    if disclaimer and MEDICAL_DISCLAIMER not in body:
        parts.append(MEDICAL_DISCLAIMER)
    return "\n\n".join(parts)
