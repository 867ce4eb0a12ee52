"""The layout rules of src/: one job per module, small modules, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "sdxl_service"
SERVICE = PACKAGE.parents[1] / "service.py"
# "About 350 lines": past this a module has grown a second job.
MAX_MODULE_LINES = 380


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def test_no_module_is_over_the_size_of_one_job() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_every_module_says_what_it_is_for() -> None:
    missing = [
        name
        for name, path in modules().items()
        if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    cycles = []
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node) :], node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            # A package imports its own submodules to re-export them.
            if not target.startswith(node + "."):
                visit(target, [*stack, node])
        done.add(node)

    for name in graph:
        visit(name, [])
    assert cycles == []


def test_the_http_side_never_imports_torch_or_diffusers() -> None:
    """What the HTTP process imports stays light: torch loads in the render process only."""
    heavy = {"torch", "diffusers", "transformers"}
    http_modules = ["sdxl_service.http_app", "sdxl_service.serving", "sdxl_service.resolution"]
    seen: set[str] = set()
    pending = list(http_modules)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(imports_of(name, modules()[name]))
    for name in sorted(seen):
        tree = ast.parse(modules()[name].read_text())
        top_level = {
            alias.name.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and not node.level
        }
        assert top_level.isdisjoint(heavy), name
