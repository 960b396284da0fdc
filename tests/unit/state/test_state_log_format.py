"""The state log's record format: what a crash leaves behind is detected and cut off."""

import pytest

from lattice.core.state.log import LOG_MAGIC, LogFormatError, encode_record, scan

RECORDS = [("envelope", (b"one",)), ("proof", (b"a", b"b")), ("envelope", (b"\x00" * 1000,))]


def _log(records=RECORDS) -> bytes:
    return LOG_MAGIC + b"".join(encode_record(r) for r in records)


def test_records_round_trip():
    result = scan(_log())
    assert result.records == RECORDS
    assert (result.valid_length, result.dropped_bytes) == (len(_log()), 0)


def test_every_torn_tail_is_detected_and_only_whole_records_survive():
    data = _log()
    boundaries = [len(_log(RECORDS[:i])) for i in range(len(RECORDS) + 1)]
    for cut in range(len(LOG_MAGIC), len(data)):
        result = scan(data[:cut])
        whole = max(i for i, b in enumerate(boundaries) if b <= cut)
        assert result.records == RECORDS[:whole]
        assert result.valid_length == boundaries[whole]
        assert result.valid_length + result.dropped_bytes == cut


def test_a_corrupted_record_ends_the_log_there():
    data = bytearray(_log())
    data[len(_log(RECORDS[:1])) + 10] ^= 0x01  # inside the second record
    result = scan(bytes(data))
    assert result.records == RECORDS[:1]


def test_empty_and_half_written_headers_are_empty_logs():
    assert scan(b"").records == []
    assert scan(LOG_MAGIC[:5]).dropped_bytes == 5


def test_a_foreign_file_is_refused():
    with pytest.raises(LogFormatError):
        scan(b"something else entirely")
