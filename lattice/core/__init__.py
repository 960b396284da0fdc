"""Sans-I/O protocol logic: identities, codecs, records, state machines, CRDT views.

Must not import trio, libp2p, sockets, or read the clock: time is passed in.
"""
