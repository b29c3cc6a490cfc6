"""Safety of loading: weights and adapters only from safetensors, no trust_remote_code, torch.load only with
weights_only=True. Checked in the source (so a later change cannot slip one in) and by behaviour (a
booby-trapped pickle next to a model or adapter is refused and never unpickled)."""

from __future__ import annotations

import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "medgemma_lib").rglob("*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells():
    for nb in NOTEBOOKS:
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "code":
                yield nb.name, "".join(cell["source"])


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def _kw(call, name):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_model_loads_in_the_library_ask_for_safetensors():
    unsafe = []
    for path in SOURCES:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            fn_source = ast.get_source_segment(source, fn) or ""
            for call in _calls(fn):
                name = _name(call.func)
                if not name.endswith(".from_pretrained"):
                    continue
                receiver = name.rsplit(".", 1)[0]
                if (
                    receiver.endswith("Tokenizer") or receiver == "PeftModel"
                ):  # PeftModel: adapter checked by verify_adapter first
                    continue
                if _kw(call, "gguf_file") is not None:  # GGUF is a plain tensor container, no pickle
                    continue
                if _is_true(_kw(call, "use_safetensors")):
                    continue
                if any(kw.arg is None for kw in call.keywords) and '"use_safetensors": True' in fn_source:
                    continue
                unsafe.append(f"{path.name}:{call.lineno} {name}")
    assert not unsafe, f"from_pretrained without use_safetensors=True: {unsafe}"


def test_no_remote_code_no_pickle_anywhere():
    problems = []
    units = [(p.name, p.read_text(encoding="utf-8")) for p in SOURCES] + list(_code_cells())
    for where, source in units:
        try:
            tree = ast.parse(source)
        except SyntaxError:  # notebook cells with shell escapes
            continue
        for call in _calls(tree):
            name = _name(call.func)
            if _is_true(_kw(call, "trust_remote_code")):
                problems.append(f"{where}:{call.lineno} trust_remote_code=True")
            if name.endswith("torch.load") and not _is_true(_kw(call, "weights_only")):
                problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") and name.endswith(("load", "loads")):
                problems.append(f"{where}:{call.lineno} {name}")
    assert not problems, problems


def test_installed_trainer_resumes_with_weights_only():
    """Resuming reads optimizer.pt / scheduler.pt / rng_state.pth with torch.load:
    the pinned transformers must use weights_only=True."""
    import transformers.trainer as trainer_module

    tree = ast.parse(inspect.getsource(trainer_module))
    loads = [c for c in _calls(tree) if _name(c.func) == "torch.load"]
    assert loads, "transformers.Trainer no longer calls torch.load: re-check how checkpoints are read"
    assert all(_is_true(_kw(c, "weights_only")) for c in loads), [
        c.lineno for c in loads if not _is_true(_kw(c, "weights_only"))
    ]


class _Trap:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _write_trap(path: Path, sentinel: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"weight": _Trap(sentinel)}))


def test_model_folder_with_only_pickle_weights_is_refused_unopened(tiny_model_dir, tmp_path):
    from medgemma_lib.core.errors import ModelError
    from medgemma_lib.models.loading import load_model

    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.json.index"))
    for index in folder.glob("*.safetensors.index.json"):
        index.unlink()
    sentinel = tmp_path / "EXECUTED"
    _write_trap(folder / "pytorch_model.bin", sentinel)
    with pytest.raises(ModelError, match="只載入 safetensors"):
        load_model(str(folder), "none", "cpu")
    assert not sentinel.exists(), "a pickle was unpickled while loading a model"


def test_adapter_with_only_pickle_weights_is_refused_unopened(tmp_path):
    from medgemma_lib.core.errors import ModelError
    from medgemma_lib.training.runs import open_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA"}')
    sentinel = tmp_path / "EXECUTED"
    _write_trap(run / "adapter" / "adapter_model.bin", sentinel)
    with pytest.raises(ModelError, match="只載入 safetensors"):
        open_run(run)
    assert not sentinel.exists()
