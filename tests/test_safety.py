"""Emergency alerts: every rule in Traditional Chinese, Simplified Chinese and English; near-misses;
the information-question policy; present_answer ordering; rule-file validation and merging."""

from __future__ import annotations

import pandas as pd
import pytest

from medgemma_lib import MEDICAL_DISCLAIMER
from medgemma_lib.core.errors import ConfigError, MedgemmaError
from medgemma_lib.evaluation import safety
from medgemma_lib.evaluation.safety import check_emergency, emergency_rules, guard_question, present_answer

# rule id -> questions that must trigger it: (Traditional Chinese, Simplified Chinese, English) x2
MUST_TRIGGER = {
    "chest_pain": [
        "我現在胸口很痛，一直冒冷汗",
        "我爸胸悶，左手臂也很痛",
        "我胸口很闷，一直出冷汗",
        "妈妈胸痛，痛到下巴和背",
        "I have chest pain and I'm sweating a lot",
        "My husband has crushing chest pressure that spreads to his left arm",
    ],
    "stroke": [
        "我爸爸突然嘴歪、講話不清楚",
        "阿嬤右邊手腳突然無力",
        "我妈妈突然脸歪，说话不清楚",
        "爷爷左边身体没力，动不了",
        "My dad's face is drooping and his speech is slurred",
        "My wife suddenly has weakness on one side of her body",
    ],
    "severe_bleeding": [
        "小孩跌倒頭破了，血流不止",
        "他剛剛吐血，吐了好多",
        "切到手，血止不住怎么办",
        "我老公一直呕血",
        "My son cut his leg and it won't stop bleeding",
        "I'm vomiting blood",
    ],
    "breathing": [
        "我喘不過氣，好難受",
        "寶寶嘴唇發紫，好像呼吸困難",
        "我现在呼吸困难",
        "奶奶喘不过气来",
        "I can't breathe",
        "My child is struggling to breathe and his lips are turning blue",
    ],
    "unconscious": [
        "我爸在浴室昏倒了",
        "阿公叫不醒，怎麼拍都沒反應",
        "我妈晕倒了",
        "他突然失去意识",
        "My mom passed out and won't wake up",
        "My friend collapsed and is unresponsive",
    ],
    "seizure": [
        "我兒子突然全身抽搐、口吐白沫",
        "她癲癇發作已經五分鐘了",
        "孩子一直抽搐怎么办",
        "我老公癫痫发作了",
        "My daughter is having a seizure right now",
        "He is convulsing on the floor",
    ],
    "anaphylaxis": [
        "我吃了花生之後喉嚨腫起來，呼吸困難",
        "被蜜蜂叮了，現在嘴唇腫了",
        "我吃了虾以后喉咙肿起来",
        "打针后出现过敏性休克",
        "I ate peanuts and my throat is swelling",
        "My son got stung by a bee and his face is swollen",
    ],
    "poisoning": [
        "我兒子吃了一整瓶安眠藥",
        "小孩誤食漂白水",
        "我妈喝了农药",
        "孩子误吞了电池",
        "My toddler swallowed a battery",
        "I think my father took an overdose of his pills",
    ],
    "suicide_self_harm": [
        "我不想活了",
        "最近一直想自殺",
        "我想死，活不下去了",
        "我又割腕了",
        "I want to kill myself",
        "My sister has been cutting herself",
    ],
}

# Information questions and everyday complaints: no alert.
MUST_NOT_TRIGGER = [
    "What are the symptoms of a stroke?",
    "What is (are) Stroke ?",
    "中風的症狀有哪些？",
    "中风有哪些症状？",
    "我想問中風有哪些警訊？",
    "胸痛的原因有哪些？",
    "胸痛合併冒冷汗的原因有哪些？",
    "我最近偶爾胸痛，要看哪一科？",  # chest pain without sweating or spreading pain
    "How is a heart attack diagnosed?",
    "What causes seizures in children?",
    "癲癇的治療方法有哪些？",
    "食物中毒的症狀有哪些？",
    "what can i do to prevent poisoning by marine toxins?",
    "What are the treatments for anaphylaxis?",
    "我的小腿晚上會抽筋，怎麼辦？",  # cramp, not a seizure
    "醫師說我有過敏性鼻炎，要吃什麼藥？",
    "高血壓要吃什麼藥？",
    "請問糖尿病怎麼控制？",
    "我生理期量比較多，正常嗎？",
    "中風還有其他症狀嗎？",
    "How do I lower my cholesterol?",
    # A past event or a chronic condition is not an emergency now.
    "我爸去年中風，現在復健要注意什麼？",
    "我爸中風了三年，復健要做什麼？",
    "My dad had a stroke last year, what diet is best?",
    "My son has had seizures since birth, what medications help?",
    # Words that look like a rule but mean something else.
    "我眼皮一直抽搐怎麼辦？",
    "我說不清楚哪裡痛",
    "我半邊臉很痛",
    "我胸口痛，是不是胃食道逆流？",
    "I have a poison ivy rash",
    "我好像食物中毒，一直拉肚子",  # policy: food poisoning alone is not a 119 rule
    # Medical history: a past event with no sign that it is happening now.
    "我兩年前癲癇發作過，現在要吃什麼藥？",
    "我妈以前昏倒过一次，医生说是低血糖，要注意什么？",
    "My dad was diagnosed with epilepsy years ago and had a seizure last year; which drugs are best?",
    "癲癇發作會不會變成精神病？",
    "",
]

# Acute wording around a bare disease name does alert.
ACUTE_TRIGGER = [
    ("我爸好像中風了", "stroke"),
    ("我爸中風了", "stroke"),
    ("What should I do if someone is having a stroke?", "stroke"),
    ("I think my dad is having a heart attack", "chest_pain"),
    ("我媽心肌梗塞怎麼辦", "chest_pain"),
    ("孩子發燒抽搐", "seizure"),
    ("小孩一氧化碳中毒", "poisoning"),
    ("我爸去年中風過，今天早上又突然嘴歪", "stroke"),  # history, but happening again today
    ("He had a seizure last year and he is having one right now", "seizure"),
]


@pytest.mark.parametrize("question,rule_id", ACUTE_TRIGGER)
def test_acute_wording_triggers(question, rule_id):
    alert = check_emergency(question)
    assert alert is not None and rule_id in alert.rule_ids, question


@pytest.mark.parametrize("rule_id,question", [(r, q) for r, qs in MUST_TRIGGER.items() for q in qs])
def test_each_rule_triggers_in_three_languages(rule_id, question):
    alert = check_emergency(question)
    assert alert is not None, question
    assert rule_id in alert.rule_ids, (question, alert.rule_ids)
    if rule_id == "suicide_self_harm":
        assert "1925" in alert.message and "1995" in alert.message and "1980" in alert.message
    else:
        assert "119" in alert.message


@pytest.mark.parametrize("question", MUST_NOT_TRIGGER)
def test_near_misses_do_not_trigger(question):
    alert = check_emergency(question)
    assert alert is None, (question, alert and alert.rule_ids, alert and alert.matched)


def test_every_bundled_rule_is_covered():
    assert {r.id for r in emergency_rules()} == set(MUST_TRIGGER)


def test_policy_information_question_vs_current_symptoms():
    # Same symptoms: a general question stays quiet, a description of someone now alerts.
    assert check_emergency("胸痛合併冒冷汗的原因有哪些？") is None
    assert check_emergency("我胸痛又冒冷汗，原因有哪些？").rule_id == "chest_pain"
    assert check_emergency("What are the symptoms of a stroke?") is None
    assert check_emergency("What should I do? My dad's face is drooping").rule_id == "stroke"
    # Suicide and self-harm always show the help lines, even for information questions.
    assert check_emergency("自殺的警訊有哪些？").rule_id == "suicide_self_harm"
    assert check_emergency("What is (are) Self-harm ?").rule_id == "suicide_self_harm"


def test_messages_by_language():
    zh = check_emergency("我爸爸突然嘴歪")
    assert zh.language == "zh" and "119" in zh.message and "911" not in zh.message
    assert "疑似中風" in zh.message
    en = check_emergency("My dad's face suddenly droops")
    assert en.language == "en"
    assert "119" in en.message and "local emergency number" in en.message and "911" in en.message
    assert en.message.splitlines()[0] == zh.message  # the Chinese line first, then the English line
    en_suicide = check_emergency("I want to kill myself")
    assert "1925" in en_suicide.message and "crisis line" in en_suicide.message


def test_several_rules_give_one_message_per_kind():
    alert = check_emergency("My wife took a whole bottle of pills and says she wants to die")
    assert alert.rule_ids == ("poisoning", "suicide_self_harm")
    assert "119" in alert.message and "1925" in alert.message
    both = check_emergency("我被蜜蜂叮了，現在嘴唇腫起來，呼吸困難")
    assert set(both.rule_ids) == {"breathing", "anaphylaxis"}
    assert both.message.count("請立即撥打 119") == 1
    assert "呼吸困難" in both.message and "嚴重過敏反應" in both.message


def test_present_answer_order_and_disclaimer():
    shown = present_answer("我爸爸突然嘴歪、講話不清楚", "中風可能的原因包括……")
    alert = check_emergency("我爸爸突然嘴歪、講話不清楚").message
    assert shown.index(alert) < shown.index("中風可能的原因") < shown.index(MEDICAL_DISCLAIMER)
    assert shown.startswith(alert) and shown.endswith(MEDICAL_DISCLAIMER)
    calm = present_answer("高血壓要吃什麼藥？", "  請遵照醫師指示。 ")
    assert calm == "請遵照醫師指示。\n\n" + MEDICAL_DISCLAIMER
    # Calling it twice (or on text that already has the alert) repeats neither part.
    again = present_answer("我爸爸突然嘴歪、講話不清楚", shown)
    assert again == shown
    assert present_answer("高血壓要吃什麼藥？", "") == MEDICAL_DISCLAIMER


def test_guard_question():
    assert "119" in guard_question("我喘不過氣")
    assert guard_question("糖尿病是什麼？") is None


# ---------------------------------------------------------------------------------------------
# Rule files: validation with file and line, merging from env var or argument
# ---------------------------------------------------------------------------------------------


def _write(tmp_path, text, name="rules.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD_FILES = {
    "yaml_tab": ("rules:\n  - id: x\n\ttitle: X\n", 3, "YAML"),
    "yaml_colon": ("rules:\n  - id: x\n    title: 胸痛: 冒冷汗: 喘\n    message: emergency\n", 3, "YAML"),
    "bad_regex": (
        'rules:\n  - id: x\n    title: X\n    message: emergency\n    match:\n      - "嘴歪("\n',
        6,
        "正規表示式",
    ),
    "missing_match": ("rules:\n  - id: x\n    title: X\n    message: emergency\n", 2, "match"),
    "unknown_key": ('rules:\n  - id: x\n    title: X\n    message: emergency\n    matches: ["a"]\n', 5, "match"),
    "unknown_message": ('rules:\n  - id: x\n    title: X\n    message: urgent\n    match: ["a"]\n', 4, "urgent"),
    "duplicate_id": (
        'rules:\n  - id: x\n    title: X\n    message: emergency\n    match: ["a"]\n'
        '  - id: x\n    title: Y\n    message: emergency\n    match: ["b"]\n',
        6,
        "重複",
    ),
    "bad_info_mode": (
        'rules:\n  - id: x\n    title: X\n    message: emergency\n    info_questions: maybe\n    match: ["a"]\n',
        5,
        "info_questions",
    ),
    "all_of_empty": (
        "rules:\n  - id: x\n    title: X\n    message: emergency\n    match:\n      - all_of: []\n",
        6,
        "all_of",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_rule_file_names_file_and_line(tmp_path, case):
    text, line, word = BAD_FILES[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        emergency_rules(extra=path)
    message = str(info.value)
    assert isinstance(info.value, MedgemmaError)
    assert str(path) in message and f"第 {line} 行" in message and word in message, message
    assert info.value.hint


def test_missing_rule_file_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(safety.RULES_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="找不到緊急規則檔"):
        emergency_rules()


def test_teacher_rules_merge_from_env(monkeypatch, tmp_path):
    extra = _write(
        tmp_path,
        "rules:\n"
        "  - id: heatstroke\n"
        "    title: 疑似熱中暑\n"
        "    message: emergency\n"
        "    match:\n"
        '      - all_of: ["體溫|体温|temperature", "(4[0-2]|10[4-9]) ?(度|°)", "意識|意识|confus"]\n'
        "  - id: severe_bleeding\n"
        "    title: 大量出血（校內版）\n"
        '    message: {zh: "請立刻撥 119，並通知學校護理師。"}\n'
        '    match: ["流很多血"]\n',
    )
    monkeypatch.setenv(safety.RULES_ENV, str(extra))
    rules = emergency_rules()
    ids = [r.id for r in rules]
    assert ids.count("severe_bleeding") == 1 and ids[-1] == "heatstroke" and len(ids) == len(MUST_TRIGGER) + 1
    alert = check_emergency("爸爸在工地體溫 41 度，意識不清")
    assert "heatstroke" in alert.rule_ids and "疑似熱中暑" in alert.message
    replaced = check_emergency("同學跌倒流很多血")
    assert replaced.rule_id == "severe_bleeding" and replaced.message == "請立刻撥 119，並通知學校護理師。"
    assert check_emergency("血流不止") is None  # the replaced rule's old patterns are gone
    monkeypatch.delenv(safety.RULES_ENV)
    assert "heatstroke" not in [r.id for r in emergency_rules()]


def test_bundled_rules_cover_required_topics():
    rules = emergency_rules()
    assert len(rules) >= 9
    for rule in rules:
        assert rule.title and rule.message_zh
        assert "119" in rule.message_zh


# ---------------------------------------------------------------------------------------------
# MedQuAD questions are information questions: only suicide / self-harm topics alert
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_medquad_questions_rarely_alert(shared_data):
    frame = pd.read_csv(shared_data / "medquad" / "medquad.csv")
    questions = frame["question"].dropna().unique()
    alerts = {q: check_emergency(q) for q in questions}
    fired = {q: a.rule_ids for q, a in alerts.items() if a}
    for q, ids in sorted(fired.items()):
        print(ids, q)
    print(f"{len(fired)} of {len(questions)} distinct MedQuAD questions alert")
    # Measured 2026-11-29: 2 of 14,995 ("What is (are) Self-harm ?", "What is (are) Suicide ?").
    assert set(fired) == {"What is (are) Self-harm ?", "What is (are) Suicide ?"}


@pytest.mark.shared
def test_real_chinese_patient_questions_alert_rate(shared_data):
    """Real (Simplified Chinese) patient questions: alerts stay rare and are looked at."""
    frame = pd.read_csv(shared_data / "zh_medical_dialogue_toyhom" / "toyhom_im_sample2000.csv")
    fired = [(check_emergency(q), q) for q in frame["question"].dropna()]
    fired = [(a.rule_ids, q) for a, q in fired if a]
    for ids, q in fired:
        print(ids, q.replace("\n", " ")[:120])
    print(f"{len(fired)} of {len(frame)} questions alert")
    # Measured 2026-11-29: 26 of 2,000, most of them seizures or fainting told as a story with no
    # past cue; several are real emergencies (今天侄女突然手脚抽搐，口吐白沫). Without the past-event
    # policy it was 76.
    assert len(fired) <= 30
    assert any("今天侄女突然手脚抽搐" in q for _, q in fired)
