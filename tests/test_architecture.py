"""The house rules of docs/architecture.md, checked on the source: no import circle between modules
or between packages (lazy imports inside functions count), the foundation modules import no
package, and the architecture page names every package."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "livr_ds")
# Usable from everywhere; they import nothing of livr_ds but one another.
FOUNDATION = {"atomic", "config", "distributed", "inference", "segments"}


def _modules() -> dict[str, str]:
    found = {}
    for base, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the livr_ds modules it imports, anywhere in its body."""
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    full = ".".join(base + ([node.module] if node.module else []))
                else:
                    full = node.module or ""
                names = [f"{full}.{a.name}" for a in node.names]
                names = [n if n in modules else full for n in names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else "livr_ds"


def test_the_checker_sees_a_cycle_and_lazy_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _imports(_modules())
    # relative imports resolve to modules, also inside functions (loop.py's lazy import)
    assert {"livr_ds.distributed", "livr_ds.inference", "livr_ds.evaluation.generate"} <= graph["livr_ds.evaluation.loop"]
    assert "livr_ds.data.images" in graph["livr_ds.builders.markers"]


def test_no_import_circle_between_modules():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, " -> ".join(cycle)


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for module, targets in _imports(_modules()).items():
        for target in targets:
            a, b = _package(module), _package(target)
            if a != b and a != "livr_ds":
                packages.setdefault(a, set()).add(b)
                why.setdefault((a, b), f"{module} imports {target}")
    cycle = _cycle(packages)
    assert cycle is None, "; ".join(why[(x, y)] for x, y in zip(cycle, cycle[1:]))


def test_foundation_modules_import_no_package():
    for module, targets in _imports(_modules()).items():
        if _package(module) in FOUNDATION:
            outside = {t for t in targets if _package(t) not in FOUNDATION}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_the_architecture_page_names_every_package():
    page = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    tops = {name.removesuffix(".py") for name in os.listdir(PACKAGE)
            if not name.startswith("_") and (name.endswith(".py") or os.path.isdir(os.path.join(PACKAGE, name, "")))
            and name != "__pycache__"}
    missing = sorted(t for t in tops if f"`{t}/`" not in page and f"`{t}.py`" not in page)
    assert not missing, f"docs/architecture.md does not name {missing}"


def _documented_layers() -> list[set[str]]:
    """The first column of docs/architecture.md's package table, row by row, as package names."""
    import re

    page = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    return [{n.removesuffix(".py").removesuffix("/") for n in re.findall(r"`([^`]+)`", row.split("|")[1])}
            for row in rows]


def test_each_documented_row_imports_only_rows_above_it():
    layers = _documented_layers()
    assert layers[0] == FOUNDATION and {"train", "evaluation", "export"} <= set().union(*layers)
    row_of = {name: i for i, names in enumerate(layers) for name in names}
    upward = []
    for module, targets in _imports(_modules()).items():
        a = _package(module)
        for target in targets:
            b = _package(target)
            if a != b and a in row_of and b in row_of and row_of[b] > row_of[a]:
                upward.append(f"{module} imports {target}")
    assert not upward, upward
