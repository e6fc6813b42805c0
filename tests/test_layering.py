"""The package's layers: ``layers <- models <- convert <- engine/detection <- cli``, with no cycle.

Models must load without the converters (they sit above the models: ``dsnet convert`` maps foreign checkpoints onto
the models), the converters without the training code, and nothing below the command line may import it. The
rules are read off the source (every ``import``, also inside functions), and each layer is imported on its own in a
fresh interpreter, bottom-up, to show that no import cycle is hidden behind lazy imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dsnet"

#: Subpackage → dsnet subpackages its modules must never import.
FORBIDDEN: dict[str, set[str]] = {
    "layers": {"models", "convert", "data", "engine", "detection", "export", "deploy", "viz", "cli", "bench"},
    "models": {"convert", "data", "engine", "detection", "export", "deploy", "viz", "cli", "bench"},
    "convert": {"engine", "detection", "export", "deploy", "viz", "cli", "bench"},
    "data": {"engine", "detection", "cli"},
    "engine": {"detection", "cli"},
    "detection": {"cli"},
    "export": {"cli"},
    "viz": {"cli"},
}

#: Bottom-up: each entry is imported in a fresh interpreter with everything listed before it.
LAYER_ORDER = ("errors", "_io", "layers", "models", "convert", "data", "engine", "detection", "export", "viz", "cli")


def _dsnet_imports(path: Path) -> set[str]:
    """The ``dsnet.<subpackage>`` names ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "dsnet"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dsnet" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(package):
    offences = {
        str(path.relative_to(SRC)): sorted(_dsnet_imports(path) & FORBIDDEN[package])
        for path in sorted((SRC / package).rglob("*.py"))
    }
    assert {k: v for k, v in offences.items() if v} == {}


def test_the_rule_catches_a_function_level_import(tmp_path):
    """The scanner sees imports hidden inside functions (the way models used to reach the converters)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dsnet.convert.checkpoint import state_dict_of\n    import dsnet.engine\n")
    assert _dsnet_imports(module) == {"convert", "engine"}


def _modules(layer: str) -> list[str]:
    if (SRC / f"{layer}.py").is_file():
        return [f"dsnet.{layer}"]
    names = []
    for path in sorted((SRC / layer).rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("upto", range(len(LAYER_ORDER)), ids=LAYER_ORDER)
def test_each_layer_imports_bottom_up_in_a_fresh_interpreter(upto):
    modules = [m for layer in LAYER_ORDER[: upto + 1] for m in _modules(layer)]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
