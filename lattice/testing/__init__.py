"""Fakes shipped with the package, so users (and we) can test against Lattice without
a real network: `memnet` is an in-memory `PeerNetwork`."""
