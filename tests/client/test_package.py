"""csrproxy/client/ stands alone: it imports nothing of the server (an installation has
neither Twisted nor treq), no private name crosses a module, and no import is circular."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import csrproxy.client

PACKAGE = Path(csrproxy.client.__file__).parent
ALLOWED_ROOTS = {"cryptography", "csrproxy"}
SERVER_DEPENDENCIES = ("twisted", "treq", "klein", "josepy", "service_identity", "zope")


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in ``path``, the names empty for ``import x``."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            found.append((node.module or "", [alias.name for alias in node.names]))
    # The package itself is its __init__ module.
    return [("csrproxy.client.__init__" if m == "csrproxy.client" else m, n) for m, n in found]


def modules() -> dict[str, Path]:
    return {f"csrproxy.client.{p.stem}": p for p in sorted(PACKAGE.glob("*.py"))}


def test_only_stdlib_cryptography_and_the_client_itself() -> None:
    for name, path in modules().items():
        for module, _ in imports_of(path):
            root = module.split(".")[0]
            if root == "csrproxy":
                assert module.startswith("csrproxy.client."), f"{name} imports {module}"
            else:
                assert root in sys.stdlib_module_names or root in ALLOWED_ROOTS, (
                    f"{name} imports {module}"
                )


def test_no_private_name_across_modules_and_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        graph[name] = set()
        for module, names in imports_of(path):
            if module.startswith("csrproxy.client."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {module}"
                graph[name].add(module)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dependency in graph.get(module, ()):
            visit(dependency, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_imports_and_runs_without_the_server_dependencies() -> None:
    """In a fresh interpreter where Twisted, treq, klein... cannot be imported at all."""
    script = f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_DEPENDENCIES!r}:
            raise ImportError(f"{{name}} is a server dependency")
        return None

sys.meta_path.insert(0, Refuse())
import csrproxy.client
from csrproxy.client import main
for module in {sorted(modules())!r}:
    if not module.endswith("__main__"):
        __import__(module)
outside = sorted(
    m for m in sys.modules
    if m.startswith("csrproxy.") and not m.startswith("csrproxy.client")
)
assert not outside, outside
assert main(["issue", "--help"]) == 0
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--url" in done.stdout
