"""The layout rules of src/: the folder says which process a module runs in and what it may import.

api/ is the HTTP process, render/ the render worker, engine/ diffusers, contract/ what crosses
between the two processes; the modules at the top of the package are shared by both.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "sdxl_service"
SERVICE = PACKAGE.parents[1] / "service.py"
SHARED = {
    "sdxl_service",
    "sdxl_service.settings",
    "sdxl_service.choices",
    "sdxl_service.metrics",
    "sdxl_service.folder_catalog",
    "sdxl_service.sidecars",
    "sdxl_service.generation_params",
    "sdxl_service.lora_catalog",
    "sdxl_service.model_catalog",
    "sdxl_service.upscaler_catalog",
    "sdxl_service.controlnet_catalog",
    "sdxl_service.safety_layout",
    "sdxl_service.embedding_catalog",
}
# What each part may import, besides itself and the shared modules.
MAY_IMPORT = {
    "contract": set(),
    "api": {"contract"},
    "engine": {"contract"},
    "render": {"contract", "engine"},
}


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


def part_of(name: str) -> str:
    """`api`, `render`, `engine`, `contract`, or `shared`."""
    if name in SHARED:
        return "shared"
    return name.split(".")[1]


def test_every_module_belongs_to_a_part() -> None:
    assert {part_of(name) for name in modules()} == {"shared", *MAY_IMPORT}


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_each_part_imports_only_what_it_may(part: str) -> None:
    allowed = {part, "shared", *MAY_IMPORT[part]}
    wrong = {
        name: sorted(target for target in imports_of(name, path) if part_of(target) not in allowed)
        for name, path in modules().items()
        if part_of(name) == part
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_engine_reads_its_own_config_not_the_settings() -> None:
    """API keys, S3 and the limits are none of the engine's business (engine/config.py)."""
    readers = sorted(
        name
        for name, path in modules().items()
        if part_of(name) == "engine" and "sdxl_service.settings" in imports_of(name, path)
    )
    assert readers == []


def test_shared_modules_import_no_part() -> None:
    wrong = {
        name: sorted(t for t in imports_of(name, modules()[name]) if part_of(t) != "shared")
        for name in SHARED
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}


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


def test_the_http_process_never_imports_torch_or_diffusers() -> None:
    """Importing service.py and every api module, in a fresh interpreter, leaves torch unloaded.

    The HTTP process holds no model: torch and diffusers load in the render worker only (a few
    hundred MiB of host memory and seconds of start-up otherwise, per HTTP worker).
    """
    api_modules = sorted(name for name in modules() if part_of(name) == "api")
    script = "\n".join(
        [
            "import importlib, sys",
            f"sys.path.insert(0, {str(SERVICE.parent)!r})",
            "import service",
            *[f"importlib.import_module({name!r})" for name in api_modules],
            "heavy = ('torch', 'diffusers', 'transformers', 'accelerate')",
            "heavy = sorted(m for m in heavy if m in sys.modules)",
            "print(','.join(heavy))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SERVICE.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    # The check can fail: the engine does load torch in the same kind of interpreter.
    engine = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sdxl_service.engine.engine, sys; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert engine.stdout.strip() == "True", engine.stderr


def test_the_module_map_lists_every_module() -> None:
    """Each module, package and sub-package of src/ has a line of its own in the module map.

    The map is docs/DEVELOPMENT.md's (the README links it).
    """
    page = (PACKAGE.parents[1] / "docs" / "DEVELOPMENT.md").read_text()
    block = page[page.index("src/sdxl_service/\n") : page.index("\ntests/unit/")]
    listed = {line.split()[0] for line in block.splitlines()[1:] if line.strip()}
    expected = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue
        if len(parts) == 1:
            expected.add(parts[0])  # a shared module
            continue
        expected.add(f"{parts[0]}/")
        if len(parts) > 2:
            expected.add(f"{parts[1]}/")  # a sub-package (api/files/) is one line
        elif parts[1] != "__init__.py":
            expected.add(parts[1])
    assert sorted(expected - listed) == []
    assert sorted(listed - expected) == []
