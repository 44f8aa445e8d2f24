"""The package's shape: imports point down the data flow, no cycles, small files, public names importable."""

from __future__ import annotations

import ast
from pathlib import Path

import sbmoe

PACKAGE = Path(sbmoe.__file__).parent
# Lower layers never import higher ones: cli -> commands -> training -> evaluation -> retrieval -> model
# -> heads/data -> files/paths/backbones/quiet. `sbmoe/__init__.py` only names things lazily and is left out.
LAYERS = [
    {"sbmoe.errors", "sbmoe.files", "sbmoe.paths", "sbmoe.backbones", "sbmoe.quiet"},
    {"sbmoe.heads", "sbmoe.data"},
    {"sbmoe.model", "sbmoe.model_folder"},
    {"sbmoe.retrieval"},
    {"sbmoe.quant"},
    {"sbmoe.evaluation"},
    {"sbmoe.training"},
    {"sbmoe.commands"},
    {"sbmoe.cli", "sbmoe.__main__"},
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sbmoe_imports(path: Path) -> set[str]:
    """The sbmoe modules ``path`` imports (at any depth of its code, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sbmoe"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sbmoe"))
    return found


def layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == name or module.startswith(f"{name}.") for name in names):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layout.py")


def graph() -> dict[str, set[str]]:
    return {
        module_name(path): sbmoe_imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py"
    }


def test_imports_never_point_up_the_layers() -> None:
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, module, target]))
            if target in edges and not state.get(target):
                visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(edges):
        if not state.get(module):
            visit(module, [])


def test_every_file_is_at_most_400_lines() -> None:
    long = {str(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_every_public_name_imports() -> None:
    for name in sbmoe.__all__:
        assert getattr(sbmoe, name) is not None, name
