"""The package's import graph has no circles: every module of src/meestral imports only modules
that do not import it back, directly or through others. Every import counts: inside functions (a
lazy import is still a dependency) and under `if __name__ == "__main__":` (`python -m` runs it)."""

import ast
from pathlib import Path

import meestral

ROOT = Path(meestral.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (`from a.b import c` names a.b.c when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def visit(node):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in modules:
                    out.add(full)
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def circles(graph) -> list[list[str]]:
    found, state = [], {}

    def walk(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    return found


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 30 and graph["meestral.decoding.decoder"]  # the graph really was read
    assert circles(graph) == []


def test_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    src = ROOT / "cli" / "main.py"
    assert "meestral.cli.common" in imports_of(src, {m for m in import_graph()})
