"""The package's import graph: layered, without circles, and no hidden function-local imports of our modules.

``docs/DEVELOPING.md`` draws the same layers. A module may import modules of its own layer or below, never above;
the only function-local imports of ``medgemma_lib`` modules are the CLI's handlers (each imports its step only when
it runs, so ``--help`` stays fast) and the few others whose line carries a comment saying why.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medgemma_lib"

# Lowest first. Keep in step with the picture in docs/DEVELOPING.md. Names are paths below medgemma_lib: a folder's
# ``__init__`` is its folder name, and the ``data`` folder is one unit (its modules import each other).
PACKAGES = {"core", "setup", "models", "training", "evaluation", "export", "checks"}
LAYERS: list[set[str]] = [
    {
        "medgemma_lib",
        "core.errors",
        "core.paths",
        "core.weightfiles",
        "core.profiles",
        "core.machine",
        *PACKAGES,
    },  # base
    {
        "core.atomic",
        "core.plots",
        "core.display",
        "core.stats",
        "models.attention",
        "models.lora_kernels",
        "models.norm_kernels",
        "evaluation.safety",
    },  # helpers
    {"core.config", "setup.memory", "setup.auth", "data"},  # configuration, estimates, Hub access, data preparation
    {"models.loading", "models.generation", "training.checkpoints", "training.monitor", "training.stopping"},
    {"training.runs", "setup.env", "checks.random_models", "evaluation.metrics"},  # run folder; environment; random
    # models; what evaluation measures
    {"training.trainer", "evaluation.report"},  # the trainer's parts; what a person reads of evaluation results
    {"training.train"},  # the training recipe
    {
        "evaluation.evaluate",
        "evaluation.chat",
        "export.merge",
        "export.gguf",
        "checks.bench",
        "checks.unsloth",
    },  # finished runs, bench
    {"demo", "evaluation.quality", "checks.reference", "checks.trainbench"},  # whole jobs
    {"checks.gradcheck"},  # the gradient reference check (uses the demo's config)
    {"cli", "__main__"},  # the command line, above everything
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("medgemma_lib", *parts))


def _component(module: str) -> str:
    """The layer entry of a module: its path below medgemma_lib (``training.train``); ``data.split`` -> ``data``."""
    parts = module.split(".")[1:]
    if not parts:
        return "medgemma_lib"
    if parts[0] == "data" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def _imports(path: Path):
    """(imported own module, line, is function-local, line text) for each import of ours in ``path``."""
    module = _module_name(path)
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If))
            targets = []
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                if base.startswith("medgemma_lib"):
                    # `from medgemma_lib import x`: x is a module when a file of that name exists
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                            PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                        ).is_file()
                        targets.append(sub if is_module else base)
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names if a.name.startswith("medgemma_lib")]
            for target in dict.fromkeys(targets):
                found.append((target, child.lineno, local, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return module, found


def _graph():
    edges = {}
    local = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, found = _imports(path)
        edges.setdefault(module, set())
        for target, line, is_local, text in found:
            if is_local:
                local.append((module, target, line, text))
            elif target != module:
                edges[module].add(target)
    return edges, local


def test_every_module_has_a_layer():
    edges, _ = _graph()
    missing = sorted({_component(m) for m in edges} - set(LAYER_OF))
    assert not missing, f"add these to LAYERS (and to docs/DEVELOPING.md): {missing}"


def test_no_import_runs_up_a_layer():
    """Top-level imports, and the function-local ones too (a ``__main__`` block below the CLI may not import it)."""
    edges, local = _graph()
    pairs = [(m, t) for m, targets in edges.items() for t in targets] + [(m, t) for m, t, _line, _text in local]
    upward = []
    for module, target in pairs:
        a, b = _component(module), _component(target)
        if a != b and LAYER_OF[b] > LAYER_OF[a]:
            upward.append(f"{module} -> {target} (layer {LAYER_OF[a]} imports layer {LAYER_OF[b]})")
    assert not upward, "\n".join(upward)


def test_the_command_line_is_the_only_entry_point():
    """``python -m medgemma_lib <command>``: no step module hands itself to the CLI from below."""
    runners = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "cli" in {t.split(".")[-1] for t, *_ in _imports(path)[1]} and path.name not in ("__main__.py", "cli.py")
    ]
    assert not runners, runners


def test_no_import_circle():
    edges, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:  # a package path such as "medgemma_lib.data" resolves to its __init__
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)


def test_function_local_imports_of_our_modules_say_why():
    _, local = _graph()
    unexplained = [
        f"{m}:{line}: {text.strip()}" for m, _t, line, text in local if m != "medgemma_lib.cli" and "#" not in text
    ]
    assert not unexplained, "move these to the top of the module, or say why on the line:\n" + "\n".join(unexplained)
    cli_local = [(line, text) for m, _t, line, text in local if m == "medgemma_lib.cli"]
    assert cli_local, "the CLI imports each step inside its handler (see medgemma_lib/cli.py)"


def test_the_error_module_imports_nothing_of_ours():
    _, found = _imports(PACKAGE / "core" / "errors.py")
    assert found == []


def test_help_imports_no_step_module_nor_torch():
    """``--help`` builds every sub-command without importing a step module, torch or transformers."""
    code = (
        "import sys; from medgemma_lib.cli import build_parser; build_parser(); "
        "mods = sorted(m for m in sys.modules if m.startswith(('medgemma_lib.', 'torch', 'transformers', 'trl')));"
        "print(','.join(mods))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    loaded = set(out.split(",")) if out else set()
    assert loaded <= {"medgemma_lib.cli", "medgemma_lib.core", "medgemma_lib.core.errors"}, loaded


def test_the_layer_table_in_the_developer_guide_matches():
    guide = (PACKAGE.parent / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    for i, names in enumerate(LAYERS):
        row = next((line for line in guide.splitlines() if line.startswith(f"| {i} |")), None)
        assert row is not None, f"docs/DEVELOPING.md has no row for layer {i}"
        listed = {w.strip("` ") for w in row.split("|")[2].split(",")}
        assert listed == names, f"layer {i}: guide lists {sorted(listed)}, code has {sorted(names)}"
