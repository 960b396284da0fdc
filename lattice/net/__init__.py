"""Adapters: the ONLY ring that imports libp2p.

Host assembly, NAT handling, DHT, streams, bulk tensor transfer and the protocol
drivers (CRDT sync, gossip rounds) live here. Protocol drivers talk to the network
through `lattice.net.streams.PeerNetwork`, so they run unchanged over the real host
(`lattice.net.host`) and over `lattice.testing.memnet`.
"""
