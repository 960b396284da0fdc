"""Where a daemon's state and socket live by default (shared by the daemon and clients)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    if os.environ.get("LATTICE_STATE_DIR"):
        return Path(os.environ["LATTICE_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lattice"


def socket_in(state_dir: Path) -> Path:
    return state_dir / "latticed.sock"


def default_socket() -> Path:
    """`$LATTICE_SOCKET`, else `<state dir>/latticed.sock`."""
    if os.environ.get("LATTICE_SOCKET"):
        return Path(os.environ["LATTICE_SOCKET"]).expanduser()
    return socket_in(default_state_dir())


def child_env() -> dict[str, str]:
    """Our environment minus `LATTICE_*` settings: for a daemon or CLI we start with
    its configuration on its command line, which our own settings must not override."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
