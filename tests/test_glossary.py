"""Taiwan usage everywhere a learner reads: the glossary in docs/DEVELOPING.md, checked against the notebooks
(sources and stored outputs), the READMEs, docs/, configs and every string in medgemma_lib (the messages)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLOSSARY_HEADING = "## Taiwan usage: the glossary"


def glossary() -> dict[str, str]:
    """{mainland word: Taiwan word(s)} from the table under the glossary heading."""
    text = (REPO / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    section = text.split(GLOSSARY_HEADING, 1)[1].split("\n## ", 1)[0]
    words = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or set(cells[0]) <= {"-"} or cells[0].startswith("不用"):
            continue
        for bad in cells[0].split("、"):
            words[bad] = cells[1]
    return words


def _texts():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for index, cell in enumerate(nb["cells"]):
            yield f"{path.name} cell {index}", "".join(cell["source"])
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                for key in ("text/plain", "text/markdown", "text/html"):
                    if key in data:
                        yield f"{path.name} cell {index} output", "".join(data[key])
                if "text" in out:
                    yield f"{path.name} cell {index} output", "".join(out["text"])
    patterns = ["*.md", "docs/*.md", "docs/bench/*.md", "configs/**/*.yaml", "adapters/*/README.md", "data/*.md"]
    patterns += ["medgemma_lib/**/*.py", "medgemma_lib/resources/*.yaml", "medgemma_lib/resources/*.json"]
    for pattern in patterns:
        for path in sorted(REPO.glob(pattern)):
            text = path.read_text(encoding="utf-8")
            if path.name == "DEVELOPING.md":
                text = text.replace(text.split(GLOSSARY_HEADING, 1)[1].split("\n## ", 1)[0], "")
            yield str(path.relative_to(REPO)), text


def test_glossary_is_read():
    words = glossary()
    assert len(words) >= 30 and words["激活值"] == "啟動值、激勵函數"
    assert words["默認"] == "預設" and words["內存"] == "記憶體"


def test_no_mainland_terms_where_a_learner_reads():
    words = glossary()
    pattern = re.compile("|".join(sorted(map(re.escape, words), key=len, reverse=True)))
    found = []
    for where, text in _texts():
        for m in pattern.finditer(text):
            context = text[max(0, m.start() - 12) : m.end() + 8].replace("\n", " ")
            found.append(f"{where}: 「{m.group(0)}」→「{words[m.group(0)]}」（…{context}…）")
    assert not found, "\n".join(found[:30])


def test_the_check_would_see_a_mainland_term():
    words = glossary()
    pattern = re.compile("|".join(map(re.escape, words)))
    assert pattern.search("訓練時的記憶體：權重＋激活值") and pattern.search("默認設置")
    assert not pattern.search("訓練時的記憶體：權重＋啟動值；預設設定")
