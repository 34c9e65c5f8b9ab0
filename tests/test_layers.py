"""The layers of docs/design.md §9 hold in the code: the import graph of ``pnfs/`` and
``kernels/`` (``kernels/`` is installed as ``pnfs.kernels``), drawn from the source with
``ast`` (no module is imported), has no import the table does not allow, no cycle between
modules, and no module the table leaves out; ``launch/`` and ``bench/`` import data only
through ``pnfs.data``, ``data_prep/`` through ``pnfs.data`` and ``pnfs.data.shards``."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "design.md"
SECTION = "## 9. Layers"
ROW = re.compile(r"^\|\s*([^|`]+?)\s*\|(.*)\|(.*)\|\s*$")


@dataclass(frozen=True)
class Layer:
    """One row of the table: its name, the modules it holds (``a.b.*``: package ``a.b`` and
    every module under it; ``a.b``: that module alone), the layers it may import."""

    name: str
    modules: tuple[str, ...]
    may_import: tuple[str, ...]


def read_layers(text: str) -> list[Layer]:
    """The table's rows, lowest layer first, from the text of docs/design.md."""
    if SECTION not in text:
        raise AssertionError(f"{DOC}: no section {SECTION!r}")
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in body.splitlines():
        m = ROW.match(line)
        if not m or m.group(1) == "Layer" or m.group(1).startswith("---"):
            continue
        modules = tuple(re.findall(r"`([a-z_.]+(?:\.\*)?)`", m.group(2)))
        may = tuple(n.strip() for n in m.group(3).split(",") if n.strip())
        layers.append(Layer(m.group(1), modules, may))
    if not layers:
        raise AssertionError(f"{DOC} {SECTION!r}: no table rows found")
    return layers


def module_name(path: Path) -> str:
    """``pnfs/data/plan.py`` -> ``pnfs.data.plan``; ``kernels/aot.py`` -> ``pnfs.kernels.aot``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":
        parts[:1] = ["pnfs", "kernels"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files() -> dict[str, Path]:
    files = sorted((REPO / "pnfs").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    return {module_name(p): p for p in files}


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """(dotted name, line) of every import in ``path``, functions included; a relative import
    is resolved against ``module``; ``from a import b`` gives ``a.b`` (a submodule or a name)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            out += [(f"{source}.{a.name}", node.lineno) for a in node.names]
    return out


def resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.name`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported library module: first line of that import}."""
    files = library_files()
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        for name, line in imported_names(path, module):
            target = resolve(name, set(files))
            if target and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def holds(name: str, module: str) -> bool:
    """Whether table name ``name`` (``a.b.*`` or ``a.b``) holds ``module``."""
    if name.endswith(".*"):
        package = name[:-2]
        return module == package or module.startswith(package + ".")
    return module == name


def layer_of(module: str, layers: list[Layer]) -> Layer | None:
    """The layer that holds ``module`` (None when no row does)."""
    return next((layer for layer in layers if any(holds(n, module) for n in layer.modules)), None)


def forbidden_imports(
    graph: dict[str, dict[str, int]], layers: list[Layer], files: dict[str, Path] | None = None
) -> list[str]:
    """One line per import the table does not allow, with file and line when ``files`` is given."""
    wrong = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module, layers)
        for target, line in sorted(edges.items()):
            other = layer_of(target, layers)
            if own is None or other is None or other.name == own.name or other.name in own.may_import:
                continue
            where = f"{files[module].relative_to(REPO)}:{line}: " if files else ""
            wrong.append(
                f"{where}{module} ({own.name}) imports {target} ({other.name}), "
                f"which docs/design.md §9 does not let {own.name} import"
            )
    return wrong


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def entry_point_data_imports(folder: str, allowed: tuple[str, ...]) -> list[str]:
    """Imports of ``pnfs.data.*`` by the scripts under ``folder`` other than ``allowed``
    (each allowed name also covers the modules under it, except ``pnfs.data`` itself)."""
    wrong = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name, line in imported_names(path, f"{folder}.{path.stem}"):
            if not name.startswith("pnfs.data."):
                continue
            # "from pnfs.data import X" gives pnfs.data.X: a public name, fine when X is not a module
            source = name.rpartition(".")[0]
            if source == "pnfs.data" and name not in library_files():
                continue
            if any(source == a or (a != "pnfs.data" and source.startswith(a + ".")) for a in allowed):
                continue
            wrong.append(f"{path.relative_to(REPO)}:{line}: imports {name}; use {' or '.join(allowed)}")
    return wrong


# ---- the tests


def test_the_table_names_each_layer_once_and_only_layers_above_it():
    layers = read_layers(DOC.read_text())
    names = [layer.name for layer in layers]
    assert len(set(names)) == len(names), f"{DOC} §9: a layer named twice: {names}"
    for i, layer in enumerate(layers):
        above = set(names[:i])
        later = [n for n in layer.may_import if n not in above]
        assert not later, (
            f"{DOC} §9: layer {layer.name!r} may import {later}, which are not above it in the "
            "table (an upward import, or a cycle between layers)"
        )


def test_every_library_module_sits_in_a_layer():
    layers = read_layers(DOC.read_text())
    loose = [m for m in library_files() if layer_of(m, layers) is None]
    assert not loose, f"modules that no row of {DOC} §9 names: {loose}"


def test_no_import_runs_up_or_across_the_layers():
    wrong = forbidden_imports(import_graph(), read_layers(DOC.read_text()), library_files())
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back():
    loops = cycles(import_graph())
    assert not loops, f"import cycles between modules: {loops}"


def test_launch_and_bench_import_data_only_through_its_public_api():
    wrong = entry_point_data_imports("launch", ("pnfs.data",)) + entry_point_data_imports(
        "bench", ("pnfs.data",)
    )
    assert not wrong, "\n".join(wrong)


def test_data_prep_imports_data_through_its_api_and_the_shards_package():
    wrong = entry_point_data_imports("data_prep", ("pnfs.data", "pnfs.data.shards"))
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_a_bad_import():
    """The checks on a made-up graph: evaluation importing the engine (the upward import that
    issue 28 removed) is named, and so is the two-module cycle it makes; evaluation importing
    the model, a layer it may import, is not."""
    layers = read_layers(DOC.read_text())
    graph = {
        "pnfs.evaluate.runner": {"pnfs.engine.trainer": 3, "pnfs.model.pnfs": 4},
        "pnfs.engine.trainer": {"pnfs.evaluate.runner": 5},
    }
    assert forbidden_imports(graph, layers) == [
        "pnfs.evaluate.runner (evaluate) imports pnfs.engine.trainer (engine), "
        "which docs/design.md §9 does not let evaluate import"
    ]
    assert cycles(graph) == [["pnfs.engine.trainer", "pnfs.evaluate.runner"]]
