"""The house reads one way: lower layers never import higher ones, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Low to high; a module may import from its own layer's package and from lower layers only.
LAYERS = [
    {"safevlm.taxonomy", "safevlm.errors", "safevlm.compat", "safevlm.devices", "safevlm.paths", "safevlm.backbones"},
    {"safevlm.config"},
    {"safevlm.modules", "safevlm.data", "safevlm.policy", "safevlm.tiny"},
    {"safevlm.bases"},
    {"safevlm.model"},
    {"safevlm.loading", "safevlm.accounting"},
    {"safevlm.guarded"},
    {"safevlm.train", "safevlm.serve", "safevlm.eval", "safevlm.scan", "safevlm.demo"},
    {"safevlm.annotate"},
    {"safevlm.commands", "safevlm.cli"},
]


def _unit(module: str) -> str:
    """The layer unit of a module: ``safevlm.<top>`` (a package or a module)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports() -> dict[str, set[str]]:
    """{unit: units it imports (at module level or inside functions)}."""
    graph: dict[str, set[str]] = {}
    for path in (SRC / "safevlm").rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(module)
        deps = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("safevlm.") and _unit(name) != unit:
                    deps.add(_unit(name))
    graph.pop("safevlm", None)
    for deps in graph.values():
        deps.intersection_update(graph)  # real modules only (``from safevlm import __version__`` is not one)
    return graph


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit} is in no layer: add it to LAYERS in tests/test_layering.py")


def test_every_module_has_a_layer():
    for unit in _imports():
        _layer(unit)


@pytest.mark.parametrize("unit", sorted(_imports()))
def test_imports_go_down_only(unit):
    upward = sorted(d for d in _imports()[unit] if _layer(d) > _layer(unit))
    assert not upward, f"{unit} (layer {_layer(unit)}) imports higher layers: {upward}"


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(unit, path):
        state[unit] = 1
        for dep in sorted(graph.get(unit, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [unit, dep]))
            if dep not in state:
                visit(dep, path + [unit])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])
