"""The transfer seam (`lattice.net.shaping.GovernedNetwork`) on the in-memory network, in
virtual time: job protocols' bytes wait for the budget's rate and are refused while it
says so (outbound open raises, inbound is reset); other protocols are metered only."""

from __future__ import annotations

import pytest
import trio

from lattice.core.governor import TokenBucket
from lattice.net.shaping import GovernedNetwork, TransfersPausedError
from lattice.net.streams import PeerError, read_exactly
from lattice.testing.memnet import MemoryNetwork

BLOB = "/lattice/blob/1"
SYNC = "/lattice/crdt-sync/1"


class Budget:
    """A byte budget: ``rate`` bytes a second each way, refusing while ``paused``."""

    def __init__(self, rate: float) -> None:
        self.up = TokenBucket(rate, 0)
        self.down = TokenBucket(rate, 0)
        self.paused: str | None = None

    def refusal(self) -> str | None:
        return self.paused

    async def send(self, nbytes: int) -> None:
        await trio.sleep(self.up.reserve(nbytes, trio.current_time()))

    async def receive(self, nbytes: int) -> None:
        await trio.sleep(self.down.reserve(nbytes, trio.current_time()))


@pytest.fixture
async def pair(nursery):
    net = MemoryNetwork()
    a, b = net.add_peer(), net.add_peer()
    for p in (a, b):
        await nursery.start(p.serve)
    budget = Budget(rate=100_000)
    governed = GovernedNetwork(a, budget)
    received: dict[str, bytes] = {}

    async def sink(stream) -> None:
        received[stream.protocol] = await read_exactly(stream, 400_000)

    for protocol in (BLOB, SYNC):
        b.set_stream_handler(protocol, sink)
    return governed, budget, b, received


async def test_job_protocol_bytes_go_at_the_budget_rate_and_others_are_only_metered(
        pair, autojump_clock):
    governed, _, b, received = pair
    for protocol, seconds in ((BLOB, 4.0), (SYNC, 0.0)):
        start = trio.current_time()
        stream = await governed.open_stream(b.peer_id, protocol)
        for _ in range(4):
            await stream.write(b"x" * 100_000)
        await stream.close()
        assert trio.current_time() - start == pytest.approx(seconds, abs=0.01)
    await trio.testing.wait_all_tasks_blocked()
    assert received[BLOB] == received[SYNC] == b"x" * 400_000
    assert governed.statistics()["bytes"] == {BLOB: {"in": 0, "out": 400_000},
                                              SYNC: {"in": 0, "out": 400_000}}


async def test_while_the_budget_refuses_job_streams_are_refused_both_ways(pair, autojump_clock):
    governed, budget, b, _ = pair
    budget.paused = "outside transfer schedule until 18:00"
    with pytest.raises(TransfersPausedError, match="outside transfer schedule"):
        await governed.open_stream(b.peer_id, BLOB)
    served = []

    async def handler(stream) -> None:
        served.append(stream.protocol)

    governed.set_stream_handler(BLOB, handler)
    governed.set_stream_handler(SYNC, handler)
    inbound = await b.open_stream(governed.peer_id, BLOB)
    with pytest.raises(PeerError):
        await inbound.write(b"have?")
        await read_exactly(inbound, 1)
    state = await b.open_stream(governed.peer_id, SYNC)  # state sync keeps going
    await state.write(b"sv")
    await trio.testing.wait_all_tasks_blocked()
    assert served == [SYNC]
    assert governed.statistics()["refused"] == {BLOB: 2}
    budget.paused = None
    await governed.open_stream(b.peer_id, BLOB)  # transfers start again


async def test_bytes_outside_streams_share_the_budget_under_their_label(pair, autojump_clock):
    governed, _, _, _ = pair
    relay = governed.budget_for("relay")
    start = trio.current_time()
    await relay.receive(50_000)
    await relay.send(50_000)
    await relay.receive(100_000)
    assert trio.current_time() - start == pytest.approx(2.0)  # one after another
    assert governed.statistics()["bytes"] == {"relay": {"in": 150_000, "out": 50_000}}
