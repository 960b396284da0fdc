"""lattice.learn stays pure: no trio, no libp2p, no sockets, no clock, no pickle."""

import ast
from pathlib import Path

import lattice.learn

FORBIDDEN = {"trio", "libp2p", "socket", "asyncio", "threading", "time", "datetime", "pickle", "latticed",
             "lattice.net", "lattice.api", "lattice.client", "lattice.cli"}
LEARN = Path(lattice.learn.__file__).parent


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_learn_modules_import_nothing_impure():
    files = sorted(LEARN.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        for name in _imports(path):
            hit = [f for f in FORBIDDEN if name == f or name.startswith(f + ".")]
            assert not hit, f"{path.name} imports {name}"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"


def test_public_names_are_exported():
    for name in lattice.learn.__all__:
        assert getattr(lattice.learn, name) is not None
