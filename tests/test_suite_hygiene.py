"""The test suite's own rules (issue 10): helpers live in `tests/support/`, no test module imports
another test module or `tests/conftest.py`, and `tests/` holds nothing but test modules, the
conftest (fixtures only) and the support package. Also the order xdist gets the modules in, and
the ports test servers are given (`proxy.testing.servers.free_port`)."""

from __future__ import annotations

import ast
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.testing.servers import free_port
from tests.support.scheduling import E2E_SECONDS, order_heaviest_first

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (`import a.b` -> "a.b"; `from a.b import c` -> "a.b" and
    "a.b.c", since `c` may itself be a module)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_nothing_imports_a_test_module_or_the_conftest() -> None:
    offenders = {}
    for path in sorted([*TESTS.glob("*.py"), *TESTS.glob("support/*.py")]):
        wrong = sorted(
            name
            for name in imported_modules(path)
            if name.startswith(("tests.test_", "tests.conftest"))
            or (name.startswith("tests.") and name.count(".") == 1 and name != "tests.support")
        )
        if wrong:
            offenders[path.relative_to(TESTS).as_posix()] = wrong
    assert offenders == {}, "import from tests.support instead"


def test_the_tests_folder_holds_only_test_modules_the_conftest_and_support() -> None:
    strays = sorted(
        path.name
        for path in TESTS.glob("*.py")
        if not path.name.startswith("test_") and path.name not in {"conftest.py", "__init__.py"}
    )
    assert strays == [], "helpers belong in tests/support/"


def test_the_conftest_holds_fixtures_and_hooks_only() -> None:
    """The conftest re-exports nothing: no `__all__`, and every function it defines is a fixture
    or a pytest hook."""
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    names = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert "__all__" not in names
    plain = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("pytest_")
        and not any("fixture" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert plain == []


@dataclass
class FakeItem:
    """What `order_heaviest_first` reads of a pytest item: its node id and its e2e marker."""

    nodeid: str
    e2e: bool = False

    def get_closest_marker(self, name: str) -> Any:
        return object() if name == "e2e" and self.e2e else None


def test_modules_go_heaviest_first_and_keep_their_tests_together_in_order() -> None:
    items: list[Any] = [
        FakeItem("tests/test_a.py::test_1"),
        FakeItem("tests/test_b.py::test_1[x]", e2e=True),
        FakeItem("tests/test_a.py::test_2"),
        FakeItem("tests/test_b.py::test_1[y]", e2e=True),  # one function: counted once
        FakeItem("tests/test_c.py::test_1", e2e=True),
        FakeItem("tests/test_c.py::test_2", e2e=True),
        FakeItem("tests/test_b.py::test_2"),
    ]
    estimated = list(items)
    order_heaviest_first(estimated, {})
    assert [i.nodeid for i in estimated] == [
        "tests/test_c.py::test_1",  # two e2e functions
        "tests/test_c.py::test_2",
        "tests/test_b.py::test_1[x]",  # one e2e function
        "tests/test_b.py::test_1[y]",
        "tests/test_b.py::test_2",
        "tests/test_a.py::test_1",
        "tests/test_a.py::test_2",
    ]
    measured = list(items)
    order_heaviest_first(measured, {"tests/test_a.py": 3 * E2E_SECONDS, "tests/test_c.py": 0.5})
    assert [module.split("::")[0] for module in [i.nodeid for i in measured]] == [
        "tests/test_a.py",
        "tests/test_a.py",
        "tests/test_b.py",
        "tests/test_b.py",
        "tests/test_b.py",
        "tests/test_c.py",
        "tests/test_c.py",
    ]


def test_free_ports_are_drawn_below_the_ephemeral_range_and_are_bindable() -> None:
    # Outgoing connections get ephemeral ports: a server port drawn from that range could be taken
    # by one between the draw and the server's bind.
    ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[-1] + 1))  # the next in turn, now in use: skipped
        taken.listen()
        following = free_port()
    assert following not in ports and following != ports[-1] + 1
    for port in [*ports, following]:
        assert 1024 < port < ephemeral_from
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
