"""The layout's rules (issue 12), checked on the source with ``ast``.

1. The core (every module in ``l2crypt/core/`` and the gateway's pure
   modules) does no I/O: it imports no socket, asyncio, os, time, subprocess,
   fcntl, select, selectors or threading, and no project module outside the core.
2. No import cycles between the modules of ``l2crypt/``, ``keyserverd/`` and
   ``gateway/``, counting every import: those a module runs when it is loaded,
   those inside functions (a lazy import is still a dependency) and those
   under ``if TYPE_CHECKING:``.
3. No module imports another module's private name (``from x import _y``).
4. Modules stay small (600 lines at most).
5. Every class has a docstring.
6. Nothing calls ``asyncio.wait_for``: on Python 3.11 it can swallow a
   cancellation; ``l2crypt.io.aio_timeout.wait_for`` is the one to use.
Each rule lists every offender at once.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("l2crypt", "keyserverd", "gateway")
GATEWAY_CORE = ("core", "tunnel", "tunnel_wire", "group_policy", "multipath", "path_scheduler", "reorder_buffer",
                "fec_parity", "probe_wire")
CORE_FILES = sorted((ROOT / "l2crypt" / "core").glob("*.py")) + [ROOT / "gateway" / f"{m}.py" for m in GATEWAY_CORE]
CORE_MODULES = ("l2crypt.core",) + tuple(f"gateway.{m}" for m in GATEWAY_CORE)
NO_IO = {"socket", "asyncio", "os", "time", "subprocess", "fcntl", "select", "selectors", "threading"}


def module_of(path: Path) -> tuple[str, bool]:
    """('l2crypt.core.engine', False); a package's __init__.py gives (package, True)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return (".".join(parts[:-1]), True) if parts[-1] == "__init__" else (".".join(parts), False)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def project_files() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def imports(path: Path, load_time_only: bool = False) -> list[tuple[str, str | None, int]]:
    """(absolute module, imported name or None, line) for each import of ``path``."""
    inside = any(path.is_relative_to(ROOT / top) for top in PACKAGES)
    name, is_pkg = module_of(path) if inside else ("", False)
    tree = parse(path)
    nodes = load_time_nodes(tree.body) if load_time_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
            found += [(module, a.name, node.lineno) for a in node.names]
    return found


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def load_time_nodes(body: list[ast.stmt]):
    """The statements a module runs when imported: the top level and its if/try blocks, minus TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from load_time_nodes(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            yield node
            for block in ("body", "orelse", "finalbody"):
                yield from load_time_nodes(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from load_time_nodes(handler.body)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def no_io_offenders(path: Path) -> list[str]:
    bad = []
    for module, _name, line in imports(path):
        top = module.split(".")[0]
        outside_core = top in PACKAGES and not module.startswith(CORE_MODULES) and module not in PACKAGES
        if top in NO_IO or outside_core:
            bad.append(f"{rel(path)}:{line}: imports {module}")
    return bad


def import_graph(load_time_only: bool = False) -> dict[str, set[str]]:
    modules = {module_of(p)[0]: p for p in project_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for me, path in modules.items():
        for module, name, _line in imports(path, load_time_only=load_time_only):
            target = f"{module}.{name}" if f"{module}.{name}" in modules else module
            if target in modules and target != me:
                graph[me].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def private_imports(path: Path) -> list[str]:
    return [f"{rel(path)}:{line}: from {module} import {name}"
            for module, name, line in imports(path)
            if name and name.startswith("_") and not name.startswith("__")]


def test_core_does_no_io():
    assert len(CORE_FILES) >= 20 and all(p.exists() for p in CORE_FILES), CORE_FILES
    offenders = [line for path in CORE_FILES for line in no_io_offenders(path)]
    assert offenders == [], "\n".join(offenders)
    # The same check sees I/O where there is some: the wire port's socket, the TAP's os.
    assert any("imports socket" in o for o in no_io_offenders(ROOT / "l2crypt" / "io" / "linux_wire.py"))
    assert any("imports os" in o for o in no_io_offenders(ROOT / "l2crypt" / "io" / "linux_tap.py"))


def test_no_import_cycles():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 200  # the graph is the real one: every package's imports are in it
    assert "l2crypt.core.engine" in graph["l2crypt.agent.agent"]
    assert cycles(graph) == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles(graph))
    # Imports inside functions count: the agent's command imports the agent lazily.
    assert "l2crypt.agent.agent" in graph["l2crypt.agent.cli"]
    assert "l2crypt.agent.agent" not in import_graph(load_time_only=True)["l2crypt.agent.cli"]
    # The same search finds a cycle where there is one.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_of_another_module_is_imported(tmp_path):
    files = project_files() + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "netns_tests").glob("*.py"))
    assert len(files) > 150
    offenders = [line for path in files for line in private_imports(path)]
    assert offenders == [], "\n".join(offenders)
    # The same scan finds one where there is one, in a function too.
    sample = tmp_path / "sample.py"
    sample.write_text("from keyserverd.ca import CertificateAuthority\n\ndef f():\n    from keyserverd.ca import _now\n")
    assert private_imports(sample) == ["sample.py:4: from keyserverd.ca import _now"]


def test_modules_stay_small():
    sizes = {p: len(p.read_text().splitlines()) for top in ("l2crypt", "keyserverd")
             for p in sorted((ROOT / top).rglob("*.py"))}
    assert len(sizes) > 60
    assert {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 600} == {}


def classes_without_docstring(path: Path) -> list[str]:
    return [f"{rel(path)}:{node.lineno}: class {node.name}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and not ast.get_docstring(node)]


def test_every_class_says_what_it_is(tmp_path):
    offenders = [line for path in project_files() for line in classes_without_docstring(path)]
    assert offenders == [], "\n".join(offenders)
    # The same scan finds a class without a docstring where there is one.
    sample = tmp_path / "sample.py"
    sample.write_text('class Said:\n    """A class."""\n\n\nclass Silent:\n    x = 1\n')
    assert [line.split(": ", 1)[1] for line in classes_without_docstring(sample)] == ["class Silent"]


def wait_for_calls(path: Path) -> list[str]:
    """``asyncio.wait_for(...)`` calls in ``path``, as 'file:line'."""
    return [f"{rel(path)}:{node.lineno}" for node in ast.walk(parse(path))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "wait_for" and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "asyncio"]


def test_nothing_calls_asyncio_wait_for(tmp_path):
    offenders = [line for path in project_files() for line in wait_for_calls(path)]
    assert offenders == [], "use l2crypt.io.aio_timeout.wait_for: " + ", ".join(offenders)
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\n\nasync def f(r):\n    return await asyncio.wait_for(r.read(), 1)\n")
    assert wait_for_calls(sample) == ["sample.py:4"]
