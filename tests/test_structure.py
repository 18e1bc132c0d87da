"""The package's structure: no import circle between its modules (counting imports inside functions and under
``TYPE_CHECKING``, which hide a circle rather than remove it), and no module over the size the code keeps to."""

import ast
from pathlib import Path

import kvcondense

PACKAGE = Path(kvcondense.__file__).parent
MAX_LINES = 320  # "no file over ~300 lines": a little room, a hard stop


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its text (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, from_init = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from .pkg import mod`` imports the module ``pkg.mod``; ``from .mod import name`` the module ``mod``
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            from_init |= {t for t in targets if t == base}  # a name taken from ``base`` itself (a package's __init__)
        else:
            continue
        found |= {t for t in targets if t in modules}
    # a module's own packages run before it anyway (Python imports a package's __init__ before its modules), so
    # only a name taken from one of them is an edge to it: that name may not be defined yet when the module runs
    return {t for t in found if t != name and (not name.startswith(t + ".") or t in from_init)}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, name, modules) for name, path in paths.items()}
    # importing a module of another package runs that package's __init__ first: an edge to it as well
    for name, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            above = {".".join(parts[:i]) for i in range(1, len(parts))}
            deps |= {p for p in above if not (name == p or name.startswith(p + "."))}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reads_the_imports_it_should():
    graph = _graph()
    assert "kvcondense.cache" in graph["kvcondense.forward"]
    assert "kvcondense.export" in graph["kvcondense.loader"]  # a module-level relative import
    assert "kvcondense.methods" in graph["kvcondense.session"]  # the package of a module it imports (.methods.ccm)
    assert "kvcondense.methods" not in graph["kvcondense.methods.sentinel"]  # its own package
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    pkg = Path(__file__).parent / "data" / "circle_pkg"  # pkg/__init__ imports m; m takes a name from pkg
    modules = {"pkg", "pkg.m"}
    assert _imports(pkg / "__init__.py", "pkg", modules) == {"pkg.m"}
    assert _imports(pkg / "m.py", "pkg.m", modules) == {"pkg"}
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_the_package_modules():
    graph = _graph()
    assert _circle(graph) is None, f"import circle: {' -> '.join(_circle(graph))}"


def test_no_module_over_the_size_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
