"""The layers of router/ as its imports show them: no cycle anywhere, and nobody but the
command line imports the daemon (the module that composes everything else)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import router

ROOT = Path(router.__file__).resolve().parent
DAEMON = "router.daemon"  # the module that holds Daemon
# Modules that still name the Daemon for their type hints only (under TYPE_CHECKING): none;
# the server and the collector read it through narrow Protocols. The set only shrinks.
DAEMON_TYPE_HINTS: set[str] = set()


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def imports(path: Path, *, type_hints: bool) -> set[str]:
    """The router modules `path` imports, at run time (and, with `type_hints`, under
    TYPE_CHECKING too); `from package import module` counts as importing the module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in (child.body if type_hints else [], child.orelse):
                    for statement in branch:
                        visit_statement(statement)
                continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        else:
            visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                connect(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1 or module in graph[module]:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return found


def test_no_module_of_the_router_imports_in_a_cycle() -> None:
    graph = {name: imports(path, type_hints=False) - {name} for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_command_line_imports_the_daemon() -> None:
    importers = {
        name for name, path in MODULES.items() if DAEMON in imports(path, type_hints=False)
    }
    assert importers == {"router.cli.serve"}
    hinted = {name for name, path in MODULES.items() if DAEMON in imports(path, type_hints=True)}
    assert hinted - {"router.cli.serve"} == DAEMON_TYPE_HINTS


def test_the_server_layer_never_names_the_daemon() -> None:
    # The routes are assembled in server/app.py from what the daemon hands them; they read the
    # running daemon through small Protocols (server/status.py's Health), not its module, even
    # for type hints.
    server = {name for name in MODULES if name.startswith("router.server.")}
    assert "router.server.app" in server
    naming = {name for name in server if DAEMON in imports(MODULES[name], type_hints=True)}
    assert naming <= DAEMON_TYPE_HINTS


def test_the_acceptor_knows_no_http() -> None:
    # Any way in (HTTP, another process, a NATS subject) hands items to the acceptor.
    path = MODULES["router.intake.accept"]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "aiohttp" not in top
    http_side = {
        "router.intake.http",
        "router.server.auth",
        "router.server.tail",
        "router.server.listener",
    }
    assert not imports(path, type_hints=False) & http_side


def test_nothing_sqlite_leaks_past_the_journals_sqlite_backend() -> None:
    # Intake and delivery see the Journal protocol; only the daemon picks the backend.
    for name, path in MODULES.items():
        if name.startswith("router.journal") or name == DAEMON:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        modules |= {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }
        assert "sqlite3" not in modules, name
        assert "router.journal.sqlite" not in modules, name


def test_the_routers_own_events_are_built_in_selfevent_only() -> None:
    # One place names the router's actions (event-router.*): the catalog, the builders and the
    # tests that look for them read the same constants.
    naming = set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and text.startswith("event-router.") and text.count(".") > 1:
                naming.add(name)
    assert naming == {"router.selfevent"}


def test_the_daemon_and_a_worker_import_no_target_client_until_a_target_needs_it() -> None:
    # Each client costs megabytes in every process that imports it (about 10 MB botocore's,
    # 8 MB cryptography's, 3 MB aiokafka's): the first target of its type imports it. NATS's
    # (storage.backend jetstream) and ruamel.yaml (an API change written back) are each about
    # one megabyte more, imported where they are used.
    code = (
        "import sys, router.cli, router.daemon, router.server.worker, router.config;"
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(done.stdout.split())
    assert "router.targets.event_streams" in loaded and "router.targets.cos" in loaded
    heavy = {"aiokafka", "aiobotocore", "botocore", "cryptography", "nats", "ruamel"}
    assert sorted(m for m in loaded if m.split(".")[0] in heavy) == []
