"""On real py-libp2p hosts (loopback, real time: ~11 s, hence `integration`): a consumer
that pauses 10 s kills a bare Yamux stream write after 5 s, but neither the side channel
nor the credit-limited fallback over the same kind of stream."""

import numpy as np
import pytest
import trio

from lattice.core.identity import Identity
from lattice.net.bulk import receive_array, send_array, serve_bulk_listener
from lattice.net.host import open_libp2p_node, quiet_libp2p_logging
from lattice.net.streams import StreamClosedError

pytestmark = pytest.mark.integration

PAUSE = 10.0
ARRAY = np.arange(8 << 20, dtype=np.float32)  # 32 MiB: > socket buffers, > 8 MiB credit


async def test_a_10_s_pause_kills_a_yamux_write_but_not_a_bulk_transfer(nursery):
    quiet_libp2p_logging(40)
    async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as a, \
            open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as b:
        listener = await nursery.start(serve_bulk_listener)
        outcome = {}

        async def pausing(name):
            async def on_progress(done, total):
                if name not in outcome:
                    outcome[name] = "paused"
                    await trio.sleep(PAUSE)
            return on_progress

        async def bare(stream):  # reads one byte, then pauses like a busy consumer
            await stream.read(1)
            await trio.sleep(PAUSE)

        async def bulk_direct(stream):
            await receive_array(stream, listener=listener,
                                on_progress=await pausing("side channel"))

        async def bulk_stream(stream):
            await receive_array(stream, on_progress=await pausing("fallback"))

        for proto, handler in [("/t/bare", bare), ("/t/direct", bulk_direct),
                               ("/t/stream", bulk_stream)]:
            b.set_stream_handler(proto, handler)
        await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")

        async def send_bare():
            stream = await a.open_stream(b.peer_id, "/t/bare")
            try:
                for _ in range(64):
                    await stream.write(bytes(1 << 20))
                outcome["bare"] = "survived"
            except StreamClosedError:
                outcome["bare"] = trio.current_time() - start  # when Yamux gave up

        async def send_bulk(proto, name):
            stream = await a.open_stream(b.peer_id, proto)
            await send_array(stream, ARRAY)
            outcome[name] = "delivered"

        start = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(send_bare)
            n.start_soon(send_bulk, "/t/direct", "side channel")
            n.start_soon(send_bulk, "/t/stream", "fallback")
        assert trio.current_time() - start >= PAUSE
        assert 5.0 <= outcome["bare"] < PAUSE  # Yamux's hard-coded 5 s window timeout
        assert outcome["side channel"] == outcome["fallback"] == "delivered"
