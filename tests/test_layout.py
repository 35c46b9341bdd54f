"""The package's structure, held to what builder/__init__.py and the README promise.

- No import cycle between olive-builder's own modules, counting every import: at module
  level, inside functions and under ``TYPE_CHECKING`` alike.
- A function-level import of one of our own modules only where it keeps a heavy dependency
  lazy, and it says so: a comment with the word "lazy" on the line or the line above.
- No module over MAX_LINES lines.
- The container boundary: what runs inside builder and runtime images loads where pydantic,
  click, docker, yaml, requests and cryptography cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "builder"
MAX_LINES = 850


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool
    lazy_comment: bool


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(mods: dict[str, Path]) -> Iterator[Import]:
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top = {id(node) for node in tree.body}
        # `if TYPE_CHECKING:` at module level is a module-level import for the reader (and a cycle all the same)
        for node in tree.body:
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                top.update(id(child) for child in node.body)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            near = " ".join(lines[max(0, node.lineno - 2): node.lineno]).lower()
            for target in targets:
                if target in mods and target != name:
                    yield Import(name, target, node.lineno, id(node) not in top, "lazy" in near)


def cycles(mods: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for imp in imports(mods):
        edges[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(modules()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "builder"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from builder.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from builder import a  # lazy\n    return a\n")
    mods = {name: tmp_path / path for name, path in [
        ("builder", "builder/__init__.py"), ("builder.sub", "builder/sub/__init__.py"),
        ("builder.a", "builder/a.py"), ("builder.sub.b", "builder/sub/b.py")]}
    assert cycles(mods) == [["builder.a", "builder.sub.b"]]


def test_function_level_imports_of_our_own_modules_say_why() -> None:
    unexplained = [f"{imp.importer}:{imp.line} imports {imp.imported}"
                   for imp in imports(modules()) if imp.in_function and not imp.lazy_comment]
    assert unexplained == [], "import at module level, or say on the line (or above) what it keeps lazy"


def test_no_module_is_too_long_to_read() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# What runs inside the builder images (the worker, the check, the evaluation's measuring
# side) and the runtime images (the server) may not need the driver's own stack.
BOUNDARY_MODULES = ["builder.build.worker", "builder.build.check", "builder.build.measure", "builder.serve.app"]
DRIVER_ONLY = ["pydantic", "click", "docker", "yaml", "requests", "cryptography"]

_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed in this image")
        return None
sys.meta_path.insert(0, Block())
import importlib
for module in {modules!r}:
    importlib.import_module(module)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("loaded")
"""


@pytest.mark.parametrize("module", BOUNDARY_MODULES)
def test_container_side_modules_load_without_the_driver_stack(module: str) -> None:
    code = _BLOCKER.format(blocked=DRIVER_ONLY, modules=[module])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "loaded"


def test_the_server_loads_from_the_files_the_runtime_images_carry(tmp_path: Path) -> None:
    from builder.build.images import RUNTIME_FILES

    for name in RUNTIME_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((PACKAGE.parent / name).read_bytes())
    code = _BLOCKER.format(blocked=DRIVER_ONLY, modules=["builder.serve.app", "builder.serve.__main__"])
    # Every olive-builder module loaded must come from those files (an editable install's finder
    # could otherwise fill in one the image lacks).
    code = code.replace('print("loaded")', "outside = [m for m, mod in sys.modules.items() if m.split('.')[0] == 'builder' "
                        f"and not (getattr(mod, '__file__', None) or '').startswith({str(tmp_path)!r})]\n"
                        "assert not outside, outside\nprint('loaded')")
    # -I: neither the checkout nor an installed olive-builder may fill in a missing file.
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + code],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "loaded"


def test_the_blocker_really_blocks() -> None:
    code = _BLOCKER.format(blocked=DRIVER_ONLY, modules=["builder.pipeline"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300, check=False)
    assert proc.returncode != 0
    assert "is not installed in this image" in proc.stderr
