"""The layout follows the data (videos -> store -> dataset -> model -> trainer): no import cycles, even
inside functions, and the model and trainer reach into fvlm_data only through its public layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fvlm_data", "fvlm_model", "fvlm_train")
# What the model and the trainer may import from fvlm_data.
TRAINING_MAY_IMPORT = ("fvlm_data.dataset", "fvlm_data.store.reader", "fvlm_data.store.format",
                       "fvlm_data.precompute.encoders", "fvlm_data.errors", "fvlm_data.environment")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a cycle of the modules themselves.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_model_and_trainer_use_fvlm_data_through_its_public_layers():
    wrong = [(m, t) for m, ts in graph().items() if m.startswith(("fvlm_model", "fvlm_train"))
             for t in ts if t.startswith("fvlm_data") and t not in TRAINING_MAY_IMPORT]
    assert not wrong, wrong


def test_fvlm_data_top_level_is_small():
    top = sorted(p.name for p in (ROOT / "fvlm_data").glob("*.py"))
    assert len(top) <= 7, top  # __init__ and at most six modules beside the subpackages


@pytest.mark.slow  # a new interpreter
def test_decode_workers_start_without_torch():
    """A decode worker imports the workers module and the sources: no torch (0.66 s, not 5.7 s)."""
    code = ("import sys, fvlm_data.precompute.workers, fvlm_data.sources; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
