"""Module layering that code review alone does not keep: the tracking package imports one way
(its __init__ lists the order), with no private names across modules and no CLI framework."""

from __future__ import annotations

import ast
from pathlib import Path

import llama_train.tracking as tracking

PKG = Path(tracking.__file__).parent
ORDER = ["params", "datasets", "store", "client", "sync", "tracker", "registry"]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, including those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_order_is_the_documented_one_and_covers_every_module():
    documented = [line.split()[0] for line in tracking.__doc__.splitlines()[1:] if line.startswith("  ")]
    assert documented == ORDER
    assert sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__") == sorted(ORDER)


def test_tracking_modules_import_only_modules_above_them_and_no_private_names():
    for name in ORDER:
        for module, names in _imports(PKG / f"{name}.py"):
            if module.startswith("llama_train.tracking."):
                other = module.rsplit(".", 1)[1]
                assert ORDER.index(other) < ORDER.index(name), f"{name} imports {other} (below it)"
                assert not [n for n in names if n.startswith("_")], f"{name} imports private {names} of {other}"
            assert module.split(".")[0] != "typer", f"tracking.{name} imports typer (CLI code goes in llama_train.cli)"


def test_nothing_outside_the_package_imports_its_private_names():
    root = PKG.parent
    for path in root.rglob("*.py"):
        if PKG in path.parents:
            continue
        for module, names in _imports(path):
            if module.startswith("llama_train.tracking"):
                assert not [n for n in names if n.startswith("_")], f"{path.relative_to(root)}: {names} of {module}"
