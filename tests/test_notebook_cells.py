"""Notebook cells are lessons (issue 33): short, and they call the library.

Every code cell of every notebook has at most 8 lines, counting the non-empty ones (comment lines count, blank
lines do not), and holds no ``for`` or ``while`` statement, no comprehension or generator expression and no
``try``/``except``: tables, checks and loops that are not themselves the lesson live in ``medgemma_lib``, where
they are tested once. Lines that start with ``%`` or ``!`` (IPython magics and shell commands) count as lines but
are left out of the parse.

A loop that is the lesson may stay only through ``ALLOWED`` below, with the reason; keep that list short.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_LINES = 8
LOOPS = {
    ast.For: "for 迴圈",
    ast.AsyncFor: "for 迴圈",
    ast.While: "while 迴圈",
    ast.ListComp: "串列推導式",
    ast.SetComp: "集合推導式",
    ast.DictComp: "字典推導式",
    ast.GeneratorExp: "產生器運算式",
    ast.Try: "try/except",
    ast.TryStar: "try/except*",
}
# (notebook file name, the cell's first non-empty line) -> why this cell may break the rule. Empty on purpose.
ALLOWED: dict[tuple[str, str], str] = {}


def _lines(source: str) -> list[str]:
    return [line for line in source.splitlines() if line.strip()]


def cell_problems(source: str) -> list[str]:
    """What breaks the rule in one code cell's source (empty: a lesson cell)."""
    lines = _lines(source)
    problems = [f"{len(lines)} 行（上限 {MAX_LINES}）"] if len(lines) > MAX_LINES else []
    python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(python)
    except SyntaxError as err:
        return [*problems, f"無法解析：{err.msg}（第 {err.lineno} 行）"]
    found = sorted({LOOPS[type(node)] for node in ast.walk(tree) if type(node) in LOOPS})
    return problems + [f"含有{what}（請移到 medgemma_lib）" for what in found]


def test_the_checker_counts_lines_and_finds_loops():
    assert cell_problems("x = 1\n\n# note\n%time y = 2\n!ls") == []
    assert cell_problems("\n".join(f"a{i} = {i}" for i in range(9))) == ["9 行（上限 8）"]
    assert cell_problems("for x in y:\n    pass") == ["含有for 迴圈（請移到 medgemma_lib）"]
    assert cell_problems("{k: v for k, v in d.items()}") == ["含有字典推導式（請移到 medgemma_lib）"]
    assert cell_problems("try:\n    f()\nexcept E:\n    pass") == ["含有try/except（請移到 medgemma_lib）"]
    assert cell_problems("sum(1 for _ in x)") == ["含有產生器運算式（請移到 medgemma_lib）"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_code_cell_is_short_and_calls_the_library(path):
    nb = nbformat.read(path, as_version=4)
    bad = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not _lines(cell.source):
            continue
        first = _lines(cell.source)[0].strip()
        problems = cell_problems(cell.source)
        if problems and (path.name, first) not in ALLOWED:
            bad.append(f"cell {index}（{first[:60]}）：{'；'.join(problems)}")
    assert not bad, f"{path.name}:\n" + "\n".join(bad)


def test_the_allow_list_names_cells_that_exist():
    cells = set()
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and _lines(cell.source):
                cells.add((path.name, _lines(cell.source)[0].strip()))
    assert set(ALLOWED) <= cells, sorted(set(ALLOWED) - cells)
