"""The package's shape, as README's "Reading the code" states it: no import cycles, no folder imports one above it,
no stage imports another, only the stages and the package's front door import extensions/, and imports inside
functions are few and say why."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "elo"
STAGES = {"elo.pretrain", "elo.align", "elo.sft"}
LOW = ("elo.hf", "elo.tools", "elo.data")  # what everything stands on
HIGH = ("elo.train", "elo.evaluation", "elo.pipeline")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module -> elo modules it imports, and the imports written inside a function (module, line, source line)."""
    edges, inner = {}, []
    for name, path in mods.items():
        source = path.read_text()
        deps = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elo"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            targets = [t for t in targets if t in mods and t != name]
            deps |= set(targets)
            if targets and node.col_offset > 0:
                inner.append((name, node.lineno, source.splitlines()[node.lineno - 1].strip()))
        edges[name] = deps
    return edges, inner


@pytest.fixture(scope="module")
def graph():
    return _imports(_modules())


def test_no_import_cycles(graph):
    edges, _ = graph
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in edges[module] - {"elo"}:  # the package's front door re-exports; nothing inside imports it back
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in edges:
        if module not in state and module != "elo":
            visit(module, [module])
    assert cycles == []


def test_folders_import_only_downwards(graph):
    edges, _ = graph
    bad = []
    for module, deps in edges.items():
        for dep in deps:
            if module.startswith(LOW) and (dep.startswith(HIGH) or dep in STAGES):
                bad.append((module, dep))
            if module in STAGES and dep in STAGES:
                bad.append((module, dep))
            if dep.startswith("elo.extensions") and not (module in STAGES or module == "elo"
                                                          or module.startswith("elo.extensions")):
                bad.append((module, dep))
    assert bad == []


def test_few_function_level_imports_each_with_a_reason(graph):
    _, inner = graph
    assert len(inner) <= 5, inner
    for module, line, text in inner:
        assert "#" in text, f"{module}:{line} imports inside a function without saying why: {text}"
