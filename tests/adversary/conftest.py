"""Adversary fixtures: real daemons on loopback (`lattice.testing.daemons`) attacked
with the hostile-peer kit (`lattice.testing.hostile`). Real time: every wait is on a
condition with a deadline."""

from __future__ import annotations

import pytest
import trio

import lattice
from lattice.testing.daemons import DaemonFactory, DaemonProc


@pytest.fixture
def daemons(tmp_path):
    """Factory: daemons(*extra_args, env=...) -> a started DaemonProc; all killed at
    teardown."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def daemon(daemons):
    """One fresh running daemon for a test that may leave it penalizing its attacker."""
    d = daemons()
    d.wait_running()
    return d


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """One running daemon shared by a module's attacks (each attack uses a fresh attacker
    identity, so penalties from one do not hide the next)."""
    factory = DaemonFactory(tmp_path_factory.mktemp("victim"))
    d = factory("--log-level", "info")
    d.wait_running()
    yield d
    factory.close()


async def running(d: DaemonProc) -> dict:
    """Wait (in a thread: it blocks) until ``d`` runs; returns its status."""
    return await trio.to_thread.run_sync(d.wait_running)


async def call(d: DaemonProc, method: str, **params):
    async with lattice.open_client(d.socket) as client:
        return await client.call(method, **params)


async def status(d: DaemonProc) -> dict:
    return await call(d, "status")


async def eventually(check, what: str, timeout: float = 30.0, interval: float = 0.05):
    """Poll an async condition we cannot subscribe to (a daemon's counters, another
    daemon's view); returns its first truthy value."""
    with trio.move_on_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_alive(d: DaemonProc) -> None:
    assert d.proc is not None and d.proc.poll() is None, \
        f"latticed exited {d.proc.returncode}:\n{d.log_text()}"
