"""Every module of wanrt imports without the optional packages, and no import cycle exists among wanrt's modules.

The import graph is read from the source with ``ast``, not from a run, so it sees every import statement: the
top-level ones, executed when a module is imported, and the ones inside functions, executed on first call (a
lazy import that closes a cycle only moves the failure to run time). Imports under ``if TYPE_CHECKING:`` never
run and are left out. An edge ``a -> b`` means that executing ``a``'s statement may execute module ``b``:

* ``import x.y.z`` and ``from x.y.z import name``: ``x.y.z``, or ``x.y.z.name`` when that is a module (then
  ``from x.y import z`` gives ``x.y.z`` too);
* and the packages above the target that are not packages above ``a`` (``a`` runs inside them already):
  importing ``wanrt.ops.backends`` from ``wanrt.engine`` runs ``wanrt/ops/__init__.py`` first.

Relative imports are resolved against the importing module's package (its own name for an ``__init__``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import wanrt

# The extras of pyproject.toml (and the libraries they bring): wanrt imports them inside the function that needs
# them, so every module must import with all of them missing.
OPTIONAL_PACKAGES = (
    "accelerate",
    "diffusers",
    "flash_attn",
    "flash_attn_interface",
    "onnx",
    "onnxruntime",
    "sageattention",
    "tensorrt",
    "xformers",
)


@dataclass(frozen=True)
class Edge:
    """``importer`` may import ``target``; ``lazy`` when the statement is inside a function."""

    importer: str
    target: str
    lazy: bool
    line: int


def wanrt_modules() -> dict[str, Path]:
    """``name -> source file`` of every module and package of wanrt, by :func:`pkgutil.walk_packages`."""
    root = Path(wanrt.__file__).parent
    modules = {"wanrt": root / "__init__.py"}
    errors = []
    for info in pkgutil.walk_packages(wanrt.__path__, "wanrt.", onerror=errors.append):
        rel = Path(*info.name.split(".")[1:])
        modules[info.name] = root / rel / "__init__.py" if info.ispkg else root / rel.with_suffix(".py")
    assert not errors, f"packages of wanrt that cannot be walked: {errors}"
    missing = [name for name, path in modules.items() if not path.is_file()]
    assert not missing, f"modules without a source file: {missing}"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.Module):
    """``(node, lazy)`` for every ``import`` / ``from ... import`` outside ``if TYPE_CHECKING:`` blocks."""
    def visit(nodes, lazy: bool):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, lazy
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.orelse, lazy)  # only the else branch runs
            else:
                inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                yield from visit(ast.iter_child_nodes(node), inner)

    yield from visit(tree.body, False)


def _with_packages(importer: str, target: str) -> list[str]:
    """``target`` and the packages above it that are not above ``importer`` (nor ``importer`` itself)."""
    parts = target.split(".")
    outer = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in outer]


def import_edges(modules: dict[str, Path], root: str = "wanrt") -> list[Edge]:
    """The edges of the import graph among ``modules`` of the package ``root`` (see the module docstring)."""
    edges = []
    for name, path in sorted(modules.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, lazy in _import_statements(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.module != "__future__":
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                assert target in modules, f"{path}:{node.lineno} imports {target}, which is not a {root} module"
                edges += [Edge(name, t, lazy, node.lineno) for t in _with_packages(name, target) if t != name]
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) through each strongly connected component of the graph that has one."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, []).append(e)
        graph.setdefault(e.target, [])
    # Tarjan's strongly connected components, iteratively.
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            e = next(it, None)
            if e is not None:
                w = e.target
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    cycles = []
    for comp in comps:  # a shortest cycle through the component's first module, by breadth-first search
        first = min(comp)
        came: dict[str, Edge] = {}
        frontier, seen, found = [first], {first}, None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for e in sorted(graph[v], key=lambda e: (e.target, e.line)):
                    if e.target not in comp:
                        continue
                    if e.target == first:
                        found = e
                        break
                    if e.target not in seen:
                        seen.add(e.target)
                        came[e.target] = e
                        nxt.append(e.target)
                if found is not None:
                    break
            frontier = nxt
        path, v = [found], found.importer
        while v != first:
            path.append(came[v])
            v = came[v].importer
        cycles.append(path[::-1])
    return cycles


def _describe(cycles: list[list[Edge]]) -> str:
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join([cycle[0].importer] + [e.target for e in cycle]))
        lines += [f"    {e.importer} line {e.line}: imports {e.target}{' (in a function)' if e.lazy else ''}"
                  for e in cycle]
    return "\n".join(lines)


_FAKE_PACKAGE = {
    "fake/__init__.py": "from .a import f\nfrom . import sub\n",
    "fake/a.py": (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from .sub import b\n"
        "if TYPE_CHECKING:\n"
        "    from . import c\n"
        "def f():\n"
        "    from fake.sub import c\n"
        "    import fake.sub.c\n"
    ),
    "fake/sub/__init__.py": "from .. import a\n",
    "fake/sub/b.py": "from ..a import f\nfrom . import c\n",
    "fake/sub/c.py": "from fake import sub\nclass C:\n    import json\n",
}


def test_the_graph_reads_relative_submodule_package_and_lazy_imports(tmp_path):
    """The reader on a small package: relative imports, ``from pkg import submodule``, the package that a
    submodule's import runs first, in-function imports marked lazy, ``TYPE_CHECKING`` imports left out; and
    the cycle finder names the cycle ``a -> sub -> a`` (importing ``fake.sub.b`` runs ``fake/sub/__init__.py``,
    which imports ``fake.a``)."""
    modules = {}
    for rel, text in _FAKE_PACKAGE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
        parts = Path(rel).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = tmp_path / rel
    edges = {(e.importer, e.target, e.lazy) for e in import_edges(modules, root="fake")}
    assert edges == {
        ("fake", "fake.a", False), ("fake", "fake.sub", False),
        ("fake.a", "fake.sub", False), ("fake.a", "fake.sub.b", False),
        ("fake.a", "fake.sub", True), ("fake.a", "fake.sub.c", True),
        ("fake.sub", "fake.a", False),
        ("fake.sub.b", "fake.a", False), ("fake.sub.b", "fake.sub.c", False),
    }
    cycles = find_cycles([e for e in import_edges(modules, root="fake") if not e.lazy])
    assert [[(e.importer, e.target) for e in c] for c in cycles] == [[("fake.a", "fake.sub"), ("fake.sub", "fake.a")]]
    assert "fake.a -> fake.sub -> fake.a" in _describe(cycles)


def test_top_level_imports_have_no_cycle():
    cycles = find_cycles([e for e in import_edges(wanrt_modules()) if not e.lazy])
    assert not cycles, "import cycles among wanrt's top-level imports:\n" + _describe(cycles)


def test_no_import_cycle_even_through_imports_inside_functions():
    cycles = find_cycles(import_edges(wanrt_modules()))
    assert not cycles, "import cycles among wanrt's modules (imports inside functions included):\n" + _describe(cycles)


_IMPORT_ALL = """
import importlib, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` raises ImportError, as when the package is not installed
failed = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{{type(e).__name__}}: {{e}}"
loaded = sorted({{m.partition(".")[0] for m in sys.modules if sys.modules[m] is not None}} & set({optional!r}))
print(json.dumps({{"failed": failed, "loaded": loaded}}))
"""


def _import_all(modules: list[str], blocked: tuple[str, ...]) -> dict:
    """Import ``modules`` one after the other in a fresh interpreter in which the ``blocked`` packages are
    missing; ``{"failed": {module: error}, "loaded": [optional packages imported]}``."""
    code = _IMPORT_ALL.format(blocked=blocked, modules=modules, optional=OPTIONAL_PACKAGES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(wanrt.__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _listing(failed: dict[str, str]) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in failed.items())


def test_every_module_imports_and_imports_no_optional_package():
    """Each module of wanrt (walked with pkgutil, none skipped) imports, and importing them all imports none
    of the optional packages that are installed (not even behind a ``try``)."""
    result = _import_all(sorted(wanrt_modules()), blocked=())
    assert not result["failed"], "wanrt modules that do not import:\n" + _listing(result["failed"])
    assert not result["loaded"], f"optional packages imported at module import time: {result['loaded']}"


def test_every_module_imports_without_the_optional_packages():
    """Each module imports in an interpreter where every optional package is missing, and so does each one
    but the Triton kernels (``wanrt.kernels.*`` but ``_common``) where Triton is missing too (it is a
    dependency on Linux only): a module that needs one of them at import time would fail here."""
    modules = sorted(wanrt_modules())
    result = _import_all(modules, blocked=OPTIONAL_PACKAGES)
    assert not result["failed"], "wanrt modules that need an optional package to import:\n" + _listing(result["failed"])
    kernels = {m for m in modules if m.startswith("wanrt.kernels.") and m != "wanrt.kernels._common"}
    failed = _import_all(modules, blocked=(*OPTIONAL_PACKAGES, "triton"))["failed"]
    outside = {k: v for k, v in failed.items() if k not in kernels or "triton" not in v}
    assert not outside, "wanrt modules (not Triton kernels) that need Triton to import:\n" + _listing(outside)
