"""Integration fixtures: real daemons on loopback (see lattice.testing.daemons)."""

from __future__ import annotations

import pytest

from lattice.testing.daemons import DaemonFactory


@pytest.fixture
def daemons(tmp_path):
    """Factory: daemons(*extra_args, env=...) -> a started DaemonProc; all stopped at
    teardown."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


