"""Imports go one way: a lower layer of the package never imports a higher one (at module level
or inside a function), so that e.g. a new backend is a new file under ``backends/`` that
``nn/`` picks up, and ``backends/`` never reaches back into ``nn/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fqtorch"

# Lowest first; a module may import from its own layer or any layer before it.
LAYERS = [
    {"quantizers"},
    {"config"},
    {"backends"},
    {"nn"},
    {"convert"},
    {"models", "data"},
    {"stats"},
    {"train"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: Path) -> str:
    """``module``'s layer: the first component of its dotted name inside the package; command
    lines (``cli.py``, ``*_cli.py`` in any subpackage) sit at the top with ``fqtorch.cli``."""
    if module.stem == "cli" or module.stem.endswith("_cli"):
        return "cli"
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_tops(source: str, package: tuple[str, ...]) -> set[str]:
    """First components (inside fqtorch) of everything a module imports; ``package`` is the
    module's package inside fqtorch (``("backends",)`` for ``backends/int8.py``)."""
    tree = ast.parse(source)
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "fqtorch":
                    continue
                target = parts[1:]
            else:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            if not target:  # `from . import x` at the top: x is the layer
                target = [alias.name for alias in node.names]
                tops.update(t.split(".")[0] for t in target)
            else:
                tops.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fqtorch" and len(parts) > 1:
                    tops.add(parts[1])
    return tops


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_top(p) for p in MODULES} <= set(RANK)


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(module):
    here = _top(module)
    name = str(module.relative_to(PACKAGE))
    upward = {
        top
        for top in _imported_tops(module.read_text(), module.relative_to(PACKAGE).parent.parts)
        if top in RANK and RANK[top] > RANK[here]
    }
    assert not upward, f"{name} (layer {here!r}) imports higher layers {sorted(upward)}"


@pytest.mark.parametrize(
    "line",
    [
        "from ..nn.functional import check_finite",
        "from fqtorch.nn import functional",
        "import fqtorch.nn.functional",
        "from .. import nn",
    ],
)
def test_the_check_sees_an_upward_import(line):
    """Relative, absolute and function-level imports are all seen (``backends/int8.py``)."""
    source = f"def f():\n    {line}\n"
    assert "nn" in _imported_tops(source, ("backends",))
    assert _imported_tops("from .base import Unsupported\n", ("backends",)) == {"backends"}
