"""Envelopes: only the author's key makes one that verifies, and its bytes are kept."""

import pytest

from lattice.core.codec import pack, unpack
from lattice.core.identity import Identity
from lattice.core.state.envelope import EnvelopeError, open_envelope, seal
from lattice.core.state.limits import MAX_ENVELOPE_BYTES


def _reason(raw) -> str:
    with pytest.raises(EnvelopeError) as info:
        open_envelope(raw)
    return info.value.reason


def test_sealed_envelope_opens_to_the_same_fields_and_bytes():
    me = Identity.generate()
    env = seal(me, 7, "delta", b"\x00\x00", b"\x07" * 32)
    opened = open_envelope(env.raw)
    assert (opened.author, opened.seq, opened.kind, opened.prev, opened.update) == (
        me.peer_id, 7, "delta", b"\x07" * 32, b"\x00\x00")
    assert opened.raw == env.raw and opened.digest == env.digest


def test_reencoded_envelope_is_the_same_statement():
    env = seal(Identity.generate(), 1, "delta", b"\x00\x00")
    fields = unpack(env.raw)
    reordered = pack(dict(reversed(list(fields.items()))))
    assert reordered != env.raw
    assert open_envelope(reordered).digest == env.digest


def test_tampered_update_fails_the_signature():
    env = seal(Identity.generate(), 1, "delta", b"\x00\x00")
    fields = unpack(env.raw)
    fields["update"] = b"\x00\x01"
    assert _reason(pack(fields)) == "bad_signature"


def test_forged_author_fails_the_signature():
    victim, forger = Identity.generate(), Identity.generate()
    env = seal(forger, 1, "delta", b"\x00\x00")
    fields = unpack(env.raw)
    fields["author"] = victim.peer_id
    assert _reason(pack(fields)) == "bad_signature"


def test_signature_does_not_carry_over_to_another_seq_or_history():
    env = seal(Identity.generate(), 2, "delta", b"\x00\x00", b"\x01" * 32)
    fields = unpack(env.raw)
    fields["seq"] = 3
    assert _reason(pack(fields)) == "bad_signature"
    fields = unpack(env.raw)
    fields["prev"] = b"\x02" * 32
    assert _reason(pack(fields)) == "bad_signature"


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: f.update(author="not-a-peer-id"), "bad_author"),
    (lambda f: f.update(seq=0), "malformed"),
    (lambda f: f.update(seq=True), "malformed"),
    (lambda f: f.update(kind="merge"), "malformed"),
    (lambda f: f.update(v=2), "malformed"),
    (lambda f: f.pop("sig"), "malformed"),
    (lambda f: f.update(extra=1), "malformed"),
    (lambda f: f.update(prev=b"\x00" * 32), "malformed"),  # seq 1 builds on nothing
])
def test_malformed_envelopes_are_rejected_with_a_reason(mutate, reason):
    fields = unpack(seal(Identity.generate(), 1, "delta", b"\x00\x00").raw)
    mutate(fields)
    assert _reason(pack(fields)) == reason


def test_garbage_and_oversized_bytes_are_rejected_before_decoding():
    assert _reason(b"\xc1") == "malformed"
    assert _reason(pack([1, 2])) == "malformed"
    assert _reason(b"\x00" * (MAX_ENVELOPE_BYTES + 1)) == "oversized"
    assert _reason("text") == "malformed"
