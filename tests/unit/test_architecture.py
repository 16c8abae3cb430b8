"""Module layering that code review alone does not keep: the tracking package imports one way
(its __init__ lists the order) with no CLI framework, no module imports another's private names,
and one module owns the adapter directory's file names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import llama_train.tracking as tracking

PKG = Path(tracking.__file__).parent
ORDER = ["params", "datasets", "store", "client", "sync", "figures", "uploader", "tracker", "registry"]


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
    documented = [
        m.group(1) for line in tracking.__doc__.splitlines()[1:] if (m := re.match(r"\s*(\w+)\s{2,}\S", line))
    ]
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


def test_no_module_imports_private_names_of_another():
    root = PKG.parent
    for path in root.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("llama_train"):
                assert not [n for n in names if n.startswith("_")], f"{path.relative_to(root)}: {names} of {module}"


def test_only_the_adapter_module_spells_the_adapter_file_names():
    """The adapter directory's file set is known in one place (llama_train.adapter)."""
    root = PKG.parent
    spelled = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "adapter.py"
        and ('"adapter_model.safetensors"' in p.read_text() or '"adapter_config.json"' in p.read_text())
    ]
    assert spelled == []


CLI_MODULES = {"cli.py", "k8s/cli.py", "serve/cli.py", "serve/__main__.py", "data/cli.py"}


def test_only_cli_modules_import_typer():
    root = PKG.parent
    for path in root.rglob("*.py"):
        rel = str(path.relative_to(root))
        if rel not in CLI_MODULES:
            assert "typer" not in [m.split(".")[0] for m, _ in _imports(path)], f"{rel} imports typer"


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_exit_code_is_in_the_table_and_the_readme_mirrors_it():
    import re

    from llama_train import errors

    used = {errors.GATE_FAILED} | {c.exit_code for c in _subclasses(errors.LlamaTrainError)}
    assert used <= set(errors.EXIT_CODES), f"exit codes without a table entry: {used - set(errors.EXIT_CODES)}"
    readme = (PKG.parents[1] / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (yes|no|-) \|$", section, flags=re.M)
    table = {int(code): (meaning, retried == "yes") for code, meaning, retried in rows}
    assert table == errors.EXIT_CODES


ROOT = PKG.parent  # llama_train/


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_import_graph_has_no_cycle():
    """Every import between the package's modules, those inside functions too: no cycle."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for module, names in _imports(path):
            if module.startswith("llama_train"):
                # `from llama_train.x import y` is an import of module x.y when that is a module
                deps |= {f"{module}.{n}" if f"{module}.{n}" in files else module for n in names or [""]}
        graph[name] = {d for d in deps if d in files and d != name}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path[path.index(dep) :], dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "llama_train.trainer" in graph and graph["llama_train.trainer"]  # the walk saw the package


MAX_MODULE_LINES = 470  # "no module over ~450 lines": one concern per module


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
