"""Integration fixtures: real daemons on loopback (see lattice.testing.daemons)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattice.testing.daemons import DaemonProc


@pytest.fixture
def daemons(tmp_path):
    """Factory: daemons(n, *extra_args) -> started DaemonProcs; all stopped at teardown."""
    started: list[DaemonProc] = []
    counter = iter(range(1000))

    def make(*extra: str, start: bool = True, state_dir: Path | None = None, env=None) -> DaemonProc:
        d = DaemonProc(state_dir or tmp_path / f"d{next(counter)}", *extra, env=env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


