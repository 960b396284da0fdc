"""The import rings of DESIGN.md, enforced: core/learn <- net/api <- jobs, client <- cli,
`latticed` on top, and libp2p only inside lattice/net (and the shipped test fakes)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# ring -> lattice subpackages it may import (besides itself)
ALLOWED = {
    "core": {"core"},
    "learn": {"core", "learn"},
    "api": {"core", "api"},
    "net": {"core", "learn", "api", "net"},
    "jobs": {"core", "learn", "api", "net", "jobs"},
    "client": {"core", "api", "client"},
    "demo": {"core", "learn", "api", "client", "demo"},
    "cli": {"core", "learn", "api", "client", "demo", "cli"},
    "testing": {"core", "learn", "api", "net", "jobs", "client", "testing"},
    "attach": {"core", "learn", "api", "client", "demo", "attach"},
    "torch": {"core", "api", "client", "attach", "torch"},
}
# what pure rings must not touch: the event loop, the network, the clock, processes
PURE_FORBIDDEN = {"trio", "libp2p", "multiaddr", "socket", "time", "datetime", "asyncio",
                  "anyio", "threading", "subprocess", "selectors", "pickle"}
NOWHERE = {"pickle", "cloudpickle", "dill", "marshal"}


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def ring_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "lattice")
    if rel.parts[0] in ("cli.py", "demo.py", "torch.py"):
        return rel.parts[0][:-3]
    return rel.parts[0] if len(rel.parts) > 1 else "root"


def lattice_files():
    return sorted((ROOT / "lattice").rglob("*.py"))


def test_rings_point_inward():
    problems = []
    for f in lattice_files():
        ring = ring_of(f)
        if ring == "root":
            continue  # lattice/__init__.py re-exports the public face
        for mod in imports(f):
            top = mod.split(".")[0]
            if top == "latticed":
                problems.append(f"{f.relative_to(ROOT)} imports the daemon ({mod})")
            if top == "lattice" and "." in mod:
                target = mod.split(".")[1]
                if target not in ALLOWED[ring]:
                    problems.append(f"{f.relative_to(ROOT)} ({ring}) imports {mod}")
    assert not problems, "\n".join(problems)


def test_pure_rings_do_no_io_and_read_no_clock():
    problems = []
    for f in lattice_files():
        if ring_of(f) not in ("core", "learn", "api"):
            continue
        for mod in imports(f):
            if mod.split(".")[0] in PURE_FORBIDDEN:
                problems.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not problems, "\n".join(problems)


def test_libp2p_only_behind_the_adapter_ring():
    problems = []
    for f in list(lattice_files()) + sorted((ROOT / "daemon").rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[:2] in (("lattice", "net"), ("lattice", "testing")):
            continue
        for mod in imports(f):
            if mod.split(".")[0] == "libp2p":
                problems.append(f"{rel} imports {mod}")
    assert not problems, "\n".join(problems)


def test_nothing_unpickles():
    problems = []
    for f in list(lattice_files()) + sorted((ROOT / "daemon").rglob("*.py")):
        for mod in imports(f):
            if mod.split(".")[0] in NOWHERE:
                problems.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not problems, "\n".join(problems)


def test_public_face_exports_what_it_lists():
    import lattice
    for name in lattice.__all__:
        assert hasattr(lattice, name), name
    assert callable(lattice.connect) and callable(lattice.open_client)
