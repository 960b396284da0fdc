"""The sender's memory of side-channel offers it could not reach (`lattice.net.bulk`)."""

import trio

from lattice.net.bulk import UnreachableChannels

A = [("198.18.0.7", 4001)]
B = [("198.18.0.8", 4001)]


async def test_an_offer_is_skipped_until_it_may_be_retried(autojump_clock):
    memory = UnreachableChannels(retry_after=600.0)
    assert not memory.known(A)
    memory.remember(A)
    assert memory.known(A) and not memory.known(B)
    await trio.sleep(599)
    assert memory.known(A)
    await trio.sleep(2)
    assert not memory.known(A)  # tried again: the peer may have moved its NAT
    assert memory.statistics() == {"unreachable_offers": 0, "skipped": 2}


async def test_a_peer_offering_new_addresses_evicts_the_oldest_never_grows_us(autojump_clock):
    memory = UnreachableChannels(max_entries=4)
    for port in range(10):
        memory.remember([("198.18.0.9", port)])
    assert memory.statistics()["unreachable_offers"] == 4
    assert memory.known([("198.18.0.9", 9)]) and not memory.known([("198.18.0.9", 0)])
