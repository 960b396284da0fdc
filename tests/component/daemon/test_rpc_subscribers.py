"""Slow subscribers are bounded: events beyond the queue are dropped and counted, never
buffered without limit, and the subscriber learns how many it missed."""

import trio

import lattice
from lattice.api.methods import METHODS
from latticed.events import EventBus
from latticed.rpc_server import RpcServer


def make_server(path, bus):
    async def unused(client, **kw):
        raise AssertionError("not called")

    async def subscribe(client, topics):
        sub = bus.subscribe(topics)
        client.start_subscription(sub)
        return {"subscription": sub.id, "topics": topics}

    handlers = {name: unused for name in METHODS}
    handlers["subscribe"] = subscribe
    return RpcServer(path, handlers, bus, max_frame=1 << 20, max_clients=4)


async def test_a_subscriber_that_does_not_read_costs_bounded_memory(tmp_path):
    bus = EventBus(queue_size=8)
    server = make_server(tmp_path / "s.sock", bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with lattice.open_client(tmp_path / "s.sock") as client:
            async with client.subscribe(["peers"]) as events:
                # publish far more than fits while the client is not reading
                for i in range(5000):
                    bus.publish("peers", {"event": "connected", "n": i})
                    if i % 100 == 0:
                        await trio.sleep(0)  # let the pump and the socket fill up
                (sub,) = bus._subs.values()
                assert sub.send.statistics().current_buffer_used <= 8
                assert bus.dropped > 4000
                got = []
                async for ev in events:
                    got.append(ev)
                    if ev["topic"] == "lagged":
                        break
                assert got[-1]["dropped"] > 0
                bus.publish("peers", {"event": "connected", "n": "after"})
                async for ev in events:
                    if ev.get("n") == "after":
                        break
        nursery.cancel_scope.cancel()


async def test_server_refuses_to_start_with_a_method_missing(tmp_path):
    import pytest
    with pytest.raises(RuntimeError, match="no handler"):
        RpcServer(tmp_path / "s.sock", {}, EventBus(4), max_frame=1024, max_clients=1)
