"""The package's layers: every module is listed in ``cgclora_lite.LAYERS`` and imports only modules
listed before it (so there can be no import cycle), even inside functions."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import cgclora_lite

PACKAGE = Path(cgclora_lite.__file__).parent
ORDER = [m for layer in cgclora_lite.LAYERS.values() for m in layer]


def package_imports(path: Path, package: str = "cgclora_lite") -> set[str]:
    """The package modules that the file at ``path`` imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import ...
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == package:  # from package.x import ...
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def upward_imports(folder: Path, order: list[str]) -> list[str]:
    """``"a imports b"`` for every module ``a`` of ``folder`` that imports a module ``b`` not listed
    before it in ``order`` (itself, a later one, or one missing from ``order``)."""
    problems = []
    for module in order:
        for imported in sorted(package_imports(folder / f"{module}.py", folder.name)):
            if imported not in order or order.index(imported) >= order.index(module):
                problems.append(f"{module} imports {imported}")
    return problems


def test_every_module_is_in_a_layer():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules
    assert len(set(ORDER)) == len(ORDER)


def test_imports_point_only_downward():
    assert upward_imports(PACKAGE, ORDER) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "low.py").write_text("def f():\n    from .high import g  # lazy, upward\n")
    (folder / "high.py").write_text("from .low import f\n")
    assert upward_imports(folder, ["low", "high"]) == ["low imports high"]  # the cycle's upward half
    (folder / "low.py").write_text("import pkg.high\n")
    assert upward_imports(folder, ["low", "high"]) == ["low imports high"]
    (folder / "low.py").write_text("from . import low\n")
    assert upward_imports(folder, ["low", "high"]) == ["low imports low"]


def test_importing_in_layer_order_never_loads_a_later_module():
    """In a fresh interpreter, import the modules one by one in layer order: importing one must
    not load any module of a later layer (beyond what the package's ``__init__`` loads)."""
    code = f"""
import importlib, json, sys
order = {ORDER!r}
import cgclora_lite
loaded = lambda: {{m.split(".")[1] for m in sys.modules if m.startswith("cgclora_lite.")}}
floor = max(order.index(m) for m in loaded() if m in order)  # what __init__ needs
problems = []
for i, module in enumerate(order):
    importlib.import_module("cgclora_lite." + module if module != "__main__" else "cgclora_lite.cli")
    later = sorted(m for m in loaded() if m in order and order.index(m) > max(i, floor))
    if later:
        problems.append([module, later])
print(json.dumps(problems))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_architecture_page_lists_exactly_the_layers():
    """docs/architecture.md's table: one row per module of LAYERS, in order, with its layer."""
    import re
    from pathlib import Path

    import cgclora_lite

    page = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
    rows = re.findall(r"^\| ([\w+-]+) \| `(\w+)` \|", page.read_text(encoding="utf-8"), flags=re.M)
    listed = [(layer, module) for layer, modules in cgclora_lite.LAYERS.items() for module in modules
              if not module.startswith("_")]
    assert rows == listed
