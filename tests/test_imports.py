"""The package's import graph, read from the source (every import, also those inside functions; not the
annotation-only ones under `if TYPE_CHECKING:`): no cycle; `data`, `eval` and `recipe` never import the Lightning
glue (`lit`); no library module imports the command line."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cascade"
CLI_MODULES = {"cascade.cli", "cascade.demo"}  # command-line code: may import anything


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports (a `from package import submodule` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    tree = ast.parse(path.read_text(), str(path))
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")]:
        block.body = []  # annotation-only imports are not run
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_graph_is_read():
    graph = _graph()
    assert "cascade.recipe.build" in graph["cascade.lit.train"]  # an import inside a function counts
    assert "cascade.diffusion.noise" in graph["cascade.diffusion.augment"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_data_eval_and_recipe_do_not_import_the_lightning_glue():
    bad = [(m, t) for m, targets in _graph().items() if m.split(".")[1:2] in (["data"], ["eval"], ["recipe"])
           for t in targets if t == "cascade.lit" or t.startswith("cascade.lit.")]
    assert bad == []


def test_no_library_module_imports_the_command_line():
    bad = [(m, t) for m, targets in _graph().items() if m not in CLI_MODULES for t in targets if t in CLI_MODULES]
    assert bad == []
