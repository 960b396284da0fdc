"""What mDNS keeps of the daemons it heard: who to dial again, and when to forget."""

from lattice.net.mdns import LanPeers

ME, A, B = "12D3KooWme", "12D3KooWa", "12D3KooWb"


def test_a_heard_peer_we_are_not_connected_to_is_dialed_again():
    lan = LanPeers(ME, forget_after=600)
    assert lan.heard(A, ["/ip4/198.18.1.2/tcp/4001"], now=0)
    assert lan.heard(B, ["/ip4/198.18.1.3/tcp/4001"], now=0)
    assert lan.to_dial(30, connected=[A]) == [(B, ["/ip4/198.18.1.3/tcp/4001"])]
    assert lan.to_dial(60, connected=[]) == [(A, ["/ip4/198.18.1.2/tcp/4001"]),
                                             (B, ["/ip4/198.18.1.3/tcp/4001"])]


def test_ourselves_and_peers_without_a_dialable_address_are_ignored():
    lan = LanPeers(ME, forget_after=600)
    assert not lan.heard(ME, ["/ip4/198.18.1.1/tcp/4001"], now=0)
    assert not lan.heard(A, [], now=0)
    assert lan.to_dial(1, connected=[]) == []


def test_a_peer_unheard_and_unconnected_for_long_is_forgotten_but_a_connected_one_is_kept():
    lan = LanPeers(ME, forget_after=600)
    lan.heard(A, ["/ip4/198.18.1.2/tcp/4001"], now=0)
    lan.heard(B, ["/ip4/198.18.1.3/tcp/4001"], now=0)
    # B stays connected until t=500 (zeroconf does not repeat its announcement)
    assert lan.to_dial(500, connected=[B]) == [(A, ["/ip4/198.18.1.2/tcp/4001"])]
    # at t=700 A was last heard 700 s ago: gone; B dropped at 500: redialed until 1100
    assert lan.to_dial(700, connected=[]) == [(B, ["/ip4/198.18.1.3/tcp/4001"])]
    assert lan.to_dial(1101, connected=[]) == []
    # a new announcement brings a forgotten peer back, with its new addresses
    lan.heard(A, ["/ip4/198.18.1.9/tcp/4001"], now=1200)
    assert lan.to_dial(1201, connected=[]) == [(A, ["/ip4/198.18.1.9/tcp/4001"])]


def test_the_table_is_bounded_and_drops_the_peer_heard_longest_ago():
    lan = LanPeers(ME, forget_after=600, max_peers=3)
    for i in range(5):
        lan.heard(f"12D3KooWp{i}", [f"/ip4/198.18.1.{i + 10}/tcp/4001"], now=i)
    lan.heard("12D3KooWp2", ["/ip4/198.18.1.12/tcp/4001"], now=9)  # heard again: freshest
    assert [p for p, _ in lan.to_dial(10, connected=[])] == [
        "12D3KooWp3", "12D3KooWp4", "12D3KooWp2"]
