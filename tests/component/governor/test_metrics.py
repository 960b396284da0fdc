"""The metrics endpoint: every family in the catalog, fed from the daemon's status and
the governor, parsed back with Prometheus' own parser; a broken feed costs only its
family; bad requests, a foreign Host header and slow clients get an answer and a close."""

from __future__ import annotations

import functools

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from lattice.core.governor import VolunteerConfig
from latticed.metrics import (
    FAMILIES,
    MetricsRegistry,
    feed_governor,
    feed_status,
    parse_listen,
    serve_metrics,
)

STATUS = {
    "peer_id": "12D3KooWTest", "version": "0.1.0", "uptime_s": 12.5,
    "reachability": {"relay_service": {"active": True, "reservations": 3, "circuits": 2,
                                       "circuits_total": 9, "bytes_relayed": 4096,
                                       "refused": {"circuit_limit": 1, "transfers_paused": 4}}},
    "dht": {"mode": "server", "routing_table_size": 17, "records_stored": 40,
            "providers_stored": 5, "own_records": 2},
    "state_sync": {"authors": 4, "members_alive": 4, "sessions": 3, "sessions_opened": 11,
                   "rejected": {"bad_signature": 2, "session_refused": 1}},
    "rpc": {"requests": 90, "refused_overloaded": 1,
            "errors": {"INVALID_PARAMS": 2, "NOT_FOUND": 3}},
    "transfers": {"bytes": {"/lattice/blob/1": {"in": 100, "out": 7},
                            "relay": {"in": 50, "out": 50}},
                  "refused": {"/lattice/gossip-avg/2": 6}},
    "jobs_here": {"paused": 1},
    "events": {"dropped": 7},
    "connections": [{"connection": "direct"}, {"connection": "direct"}, {"connection": "relayed"}],
    "jobs": [{"status": "running"}, {"status": "done"}, {"status": "done"}],
}


def parse(text: bytes) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        samples = out.setdefault(fam.name, {})
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def snapshot():
    return STATUS


async def test_every_family_is_exposed_and_status_fields_land_where_they_belong():
    reg = MetricsRegistry(snapshot)
    feed_status(reg)
    m = parse(await reg.render())
    assert {f.name.removesuffix("_total") for f in FAMILIES} <= set(m)
    assert m["lattice_peers"] == {("lattice_peers", (("connection", "direct"),)): 2,
                                  ("lattice_peers", (("connection", "relayed"),)): 1}
    assert m["lattice_jobs"][("lattice_jobs", (("status", "done"),))] == 2
    assert m["lattice_relay_circuits"] == {("lattice_relay_circuits", ()): 2}
    assert m["lattice_dht_records"][("lattice_dht_records", (("kind", "providers"),))] == 5
    errors = {dict(k[1])["code"]: v for k, v in m["lattice_rpc_errors"].items()}
    assert errors == {"INVALID_PARAMS": 2, "NOT_FOUND": 3, "OVERLOADED": 1}
    traffic = {tuple(sorted(dict(k[1]).items())): v for k, v in m["lattice_transfer_bytes"].items()}
    assert traffic[(("direction", "in"), ("protocol", "/lattice/blob/1"))] == 100
    assert traffic[(("direction", "out"), ("protocol", "relay"))] == 50
    assert m["lattice_transfers_refused"] == {
        ("lattice_transfers_refused_total", (("protocol", "/lattice/gossip-avg/2"),)): 6}
    assert m["lattice_relay_bytes"] == {("lattice_relay_bytes_total", ()): 4096}
    assert m["lattice_relay_circuits_refused"][
        ("lattice_relay_circuits_refused_total", (("reason", "transfers_paused"),))] == 4
    assert m["lattice_state_sync_sessions"] == {("lattice_state_sync_sessions_total", ()): 11}
    assert m["lattice_state_sync_sessions_open"] == {("lattice_state_sync_sessions_open", ()): 3}
    assert m["lattice_relay_circuits_opened"] == {("lattice_relay_circuits_opened_total", ()): 9}
    rejections = m["lattice_state_sync_rejections"]
    assert rejections[("lattice_state_sync_rejections_total", (("reason", "bad_signature"),))] == 2
    assert m["lattice_jobs_participations"] == {
        ("lattice_jobs_participations", (("state", "paused"),)): 1}
    assert m["lattice_events_dropped"] == {("lattice_events_dropped_total", ()): 7}
    info = m["lattice_info"]
    assert info == {("lattice_info", (("peer_id", "12D3KooWTest"), ("version", "0.1.0"))): 1}


async def test_governor_families(start_governor, machine, nursery, autojump_clock):
    gov, _ = await start_governor(nursery, VolunteerConfig(monthly_data_gb=1, upload_mbit_s=100))
    reg = MetricsRegistry()
    feed_governor(reg, gov)
    await gov.compute(lambda: None)
    await gov.upload.acquire(1234)
    machine.power(ac=False, battery="Discharging")
    gov.pause(reason="x")
    await trio.sleep(1)
    m = parse(await reg.render())
    assert m["lattice_governor_compute_paused"] == {("lattice_governor_compute_paused", ()): 1}
    reasons = {dict(k[1])["reason"]: v for k, v in m["lattice_governor_pause_reason"].items()}
    assert reasons == {"user": 1, "battery": 1, "schedule": 0, "user_active": 0, "busy": 0}
    assert m["lattice_governor_data_used_bytes"] == {("lattice_governor_data_used_bytes", ()): 1234}
    assert m["lattice_compute_seconds"] == {("lattice_compute_seconds_total", ()): 0.05}


async def test_a_broken_feed_costs_only_its_family(caplog):
    reg = MetricsRegistry(snapshot)
    feed_status(reg)
    reg.feed("lattice_jobs", lambda s: 1 / 0)
    m = parse(await reg.render())
    assert m["lattice_peers"]  # the rest still answers
    assert m["lattice_metrics_feed_errors"] == {
        ("lattice_metrics_feed_errors_total", (("family", "lattice_jobs"),)): 1}
    assert "lattice_jobs" in caplog.text and "ZeroDivisionError" in caplog.text
    with pytest.raises(ValueError):
        reg.feed("lattice_no_such_family", lambda s: [])


async def http(port: int, request: bytes, *, close_write: bool = False) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        if close_write:
            await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_endpoint_serves_metrics_and_refuses_everything_else(nursery):
    reg = MetricsRegistry(snapshot)
    feed_status(reg)
    ep = await nursery.start(functools.partial(serve_metrics, "127.0.0.1:0", reg))
    ok = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % ep.port
    status, body = await http(ep.port, ok)
    assert status == 200 and parse(body)["lattice_uptime_seconds"]
    assert (await http(ep.port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 200
    assert (await http(ep.port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 404
    assert (await http(ep.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
    rebinding = b"GET /metrics HTTP/1.1\r\nHost: attacker.example:9464\r\n\r\n"
    assert (await http(ep.port, rebinding))[0] == 403
    assert (await http(ep.port, b"\x00\xff garbage\r\n\r\n"))[0] == 400
    assert (await http(ep.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, close_write=True))[0] == 400
    assert (await http(ep.port, b"GET /metr", close_write=True))[0] == 400
    st = ep.statistics()
    assert st["scrapes"] == 2 and st["refused_host"] == 1 and st["not_found"] == 1
    assert st["bad_requests"] == 4


async def test_a_client_that_never_finishes_its_request_is_cut_off(nursery, autojump_clock):
    ep = await nursery.start(functools.partial(serve_metrics, "127.0.0.1:0", MetricsRegistry()))
    start = trio.current_time()
    status, _ = await http(ep.port, b"GET /metrics HTTP/1.1\r\n")
    assert status == 400 and trio.current_time() - start == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize("text,ok", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)),
    ("localhost:0", ("localhost", 0)), ("0.0.0.0:9464", None), ("192.168.1.2:9464", None),
    ("127.0.0.1", None), ("127.0.0.1:http", None), ("example.com:9464", None),
])
def test_listen_must_be_loopback(text, ok):
    if ok is None:
        with pytest.raises(ValueError):
            parse_listen(text)
    else:
        assert parse_listen(text) == ok
