"""When the relay-reservation loop looks again (`lattice.net.nat.reservations`)."""

import random
from types import SimpleNamespace

from lattice.net.nat.reservations import Backoff, RelayDirectory, Reservation, ReservationKeeper
from lattice.net.nat_config import NatConfig

RELAYS = ["12D3KooWRelayA", "12D3KooWRelayB", "12D3KooWRelayC"]


def keeper(max_relays=2):
    directory = RelayDirectory("12D3KooWMe", [f"/ip4/198.18.0.{i}/tcp/4001/p2p/{pid}"
                                              for i, pid in enumerate(RELAYS, 1)], lambda: None)
    return ReservationKeeper(SimpleNamespace(peer_id="12D3KooWMe"), NatConfig(max_relays=max_relays),
                             directory, wanted=lambda: True, rng=random.Random(0),
                             on_reserved=lambda: None)


def test_with_every_slot_taken_an_ended_backoff_does_not_wake_the_loop():
    k, now, wall = keeper(), 1000.0, 1_700_000_000.0
    for pid in RELAYS[:2]:  # both slots held for an hour
        k.reservations[pid] = Reservation(pid, f"/p2p/{pid}", wall + 3600, wall)
    k.backoff[RELAYS[2]] = Backoff(until=now - 5.0, delay=1.0)  # failed once, long ago
    assert k.next_look(now, wall) == 30.0  # not 50 ms, over and over


def test_a_running_backoff_or_a_due_refresh_sets_the_next_look():
    k, now, wall = keeper(max_relays=3), 1000.0, 1_700_000_000.0
    k.backoff[RELAYS[2]] = Backoff(until=now + 7.0, delay=8.0)
    assert k.next_look(now, wall) == 7.0
    k.reservations[RELAYS[0]] = Reservation(RELAYS[0], "/p2p/x", wall + 35.0, wall - 85.0)
    assert k.next_look(now, wall) == 5.0  # a 120 s reservation is refreshed 30 s before it ends
