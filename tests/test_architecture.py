"""The package's shape: imports only run down the layer order, no cycle, no private name crosses
a module boundary, and the decisions written once stay written once.

Oracle: the layer order of docs/architecture.md, read from the source with :mod:`ast` (function-
local imports included, so an import hidden in a function body to dodge a cycle is still seen).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top; a module may import from its own layer or any layer below.
LAYERS = (
    "cost_models",
    "autopar.core",
    "autopar.cluster",
    "autopar.tracing",
    "autopar.models",
    "autopar.sharding",
    "autopar.estimator",
    "autopar.solve",
    "autopar.lower",
    "autopar.runtime",
    "autopar.report",
    "autopar.api",
    "autopar.cli",
)
# Modules that belong to a layer by role rather than by folder.
ROLE = {"autopar": "autopar.api", "autopar.__main__": "autopar.cli", "autopar.testing": "autopar.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


PACKAGE = _sources("autopar", "cost_models")


def layer_of(module: str) -> int:
    if module in ROLE:
        return LAYERS.index(ROLE[module])
    for i in range(len(LAYERS) - 1, -1, -1):
        if module == LAYERS[i] or module.startswith(LAYERS[i] + "."):
            return i
    if module.startswith("autopar.testing"):
        return LAYERS.index("autopar.cli")
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {__file__}")


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "", node.lineno) if sub in PACKAGE else (target, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t.split(".")[0] in ("autopar", "cost_models")]


def _owner(target: str) -> str:
    """The package module an import names (``autopar.core.plan.Plan`` -> ``autopar.core.plan``)."""
    while target and target not in PACKAGE:
        target = target.rpartition(".")[0]
    return target


def test_every_module_has_a_layer():
    for module in PACKAGE:
        layer_of(module)


def test_imports_run_down_the_layers():
    bad = []
    for module, path in PACKAGE.items():
        mine = layer_of(module)
        for target, _, line in imports(module, path):
            owner = _owner(target)
            assert owner, f"{path}:{line} imports {target}, which does not exist"
            if layer_of(owner) > mine:
                bad.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine]}) imports {owner} ({LAYERS[layer_of(owner)]})"
                )
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = nx.DiGraph()
    for module, path in PACKAGE.items():
        graph.add_node(module)
        for target, _, _ in imports(module, path):
            owner = _owner(target)
            # A package's __init__ re-exporting its own modules is its public API, not a cycle; a
            # module importing its own package's __init__ (or a sibling through it) is counted.
            if owner != module and not owner.startswith(module + "."):
                graph.add_edge(module, owner)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _private_attribute_uses(path: Path, tree: ast.AST, module: str) -> list[str]:
    """``alias._name`` where ``alias`` is another autopar/cost_models module bound by an import."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("autopar", "cost_models") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node) if module else (node.module or "")
            for a in node.names:
                if f"{target}.{a.name}" in PACKAGE:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return out


@pytest.mark.parametrize("folder", ["autopar", "cost_models", "tests", "benchmarks", "examples", "scripts"])
def test_no_private_name_crosses_a_module(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        module = _module_name(path) if folder in ("autopar", "cost_models") else ""
        tree = _tree(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(module, path, node) if module else (node.module or "")
            for a in node.names:
                ours = target.split(".")[0] in ("autopar", "cost_models")
                if ours and a.name.startswith("_") and not a.name.startswith("__") and target != module:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{a.name}")
        bad += _private_attribute_uses(path, tree, module)
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_tests_do_not_edit_sys_path():
    offenders = [
        p.name
        for p in sorted((ROOT / "tests").glob("*.py"))
        if p.name != Path(__file__).name and "sys.path" in p.read_text()
    ]
    assert not offenders, (
        f"tests import helpers from conftest.py or autopar.testing, not sys.path: {offenders}"
    )


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_RE = re.compile(r"(?<![\w/.-])((?:autopar|cost_models|tests|benchmarks|examples|scripts)/[\w/.-]*\w)")
DOTTED_RE = re.compile(r"(?<![\w/.-])(autopar(?:\.\w+)+)")


def _dotted_exists(name: str) -> bool:
    """``autopar.core.plan.Plan``: every package on the way exists, then a module or a name that
    the last package's ``__init__`` (or the module) defines or lists."""
    path = ROOT / "autopar"
    for i, part in enumerate(name.split(".")[1:]):
        if (path / part).is_dir():
            path = path / part
            continue
        if (path / f"{part}.py").exists():
            return True
        source = (path / "__init__.py").read_text()
        return i >= 0 and re.search(rf"\b{re.escape(part)}\b", source) is not None
    return True


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_docs_name_only_paths_that_exist(doc):
    text = doc.read_text()
    missing = [p for p in PATH_RE.findall(text) if "*" not in p and not (ROOT / p).exists()]
    missing += [d for d in DOTTED_RE.findall(text) if not _dotted_exists(d.rstrip("."))]
    assert not missing, f"{doc.name} names paths or modules that do not exist: {sorted(set(missing))}"
