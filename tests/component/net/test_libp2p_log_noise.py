"""py-libp2p logs routine network failures at ERROR; a volunteer's log must not read as
if the daemon were broken, while real errors still show."""

import importlib
import inspect
import logging

import pytest

from lattice.net.host import ROUTINE_LIBP2P_FAILURES, quiet_libp2p_logging


@pytest.fixture
def captured():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.NOTSET)  # as the daemon's: the logger levels decide
    root = logging.getLogger()
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


def test_routine_failures_are_demoted_and_counted_real_errors_still_show(captured):
    filters = quiet_libp2p_logging(logging.INFO)
    for name, prefix, detail in ROUTINE_LIBP2P_FAILURES:
        logging.getLogger(name).error(f"{prefix} 12D3KooWExample{detail}reset by remote peer")
    logging.getLogger("libp2p.network.swarm").error("Error in background prune: %s", "boom")
    yamux = logging.getLogger("libp2p.stream_muxer.yamux.yamux")
    yamux.error("Error in handle_incoming for peer 12D3KooWExample: KeyError: 7")
    # the detail is matched in the formatted message, as py-libp2p logs it (with args)
    tcp = logging.getLogger("libp2p.transport.tcp.tcp")
    tcp.error("Unexpected error opening TCP stream: %s", "Failed to connect 198.18.0.12:20008 "
              "from 198.18.0.12:20011: [Errno 111] Connection refused")
    tcp.error("Unexpected error opening TCP stream: %s", KeyError("family"))
    assert [(r.levelname, r.getMessage()) for r in captured] == [
        ("ERROR", "Error in background prune: boom"),
        ("ERROR", "Error in handle_incoming for peer 12D3KooWExample: KeyError: 7"),
        ("ERROR", "Unexpected error opening TCP stream: 'family'")]
    assert sum(f.demoted for f in filters) == len(ROUTINE_LIBP2P_FAILURES) + 1


def test_at_debug_level_routine_failures_show_as_debug(captured):
    quiet_libp2p_logging(logging.DEBUG)
    logging.getLogger("libp2p.network.swarm").error("fail to upgrade mux for peer %s", "X")
    assert [(r.levelname, r.getMessage()) for r in captured] == [
        ("DEBUG", "fail to upgrade mux for peer X")]
    quiet_libp2p_logging(logging.INFO)


@pytest.mark.parametrize("name,prefix,detail", ROUTINE_LIBP2P_FAILURES)
def test_each_demoted_message_is_still_what_the_installed_py_libp2p_logs(name, prefix, detail):
    # a py-libp2p upgrade that rewords a message would silently bring the noise back
    source = inspect.getsource(importlib.import_module(name))
    assert prefix in source, f"{name} no longer logs {prefix!r}"
