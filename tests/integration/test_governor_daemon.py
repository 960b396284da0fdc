"""The governor in a real daemon, driven as a volunteer would: `lattice pause` and
`lattice resume` from the shell, `lattice status` saying exactly why, a pause that
survives a restart, and the metrics endpoint on loopback."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lattice.testing.daemons import run_cli

pytestmark = pytest.mark.integration


def status_lines(sock) -> dict[str, str]:
    r = run_cli("status", socket=sock)
    assert r.returncode == 0, r.stderr
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in r.stdout.splitlines()
            if len(line.split(None, 1)) == 2}


def test_pause_and_resume_from_the_shell_and_the_pause_survives_a_restart(daemons, tmp_path):
    d = daemons()
    d.wait_running()
    assert status_lines(d.socket)["governor"] == "running"

    r = run_cli("pause", "--for", "2h", "--reason", "exam week", socket=d.socket)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"paused by user until (?:[a-z]{3} )?(\d\d):(\d\d): exam week", r.stdout.strip())
    assert m, r.stdout
    later = time.localtime(time.time() + 7200)
    off = abs(int(m[1]) * 60 + int(m[2]) - (later.tm_hour * 60 + later.tm_min))
    assert min(off, 1440 - off) <= 1  # two hours from now, to the minute
    assert status_lines(d.socket)["governor"] == r.stdout.strip()
    gov = json.loads(run_cli("status", "--json", socket=d.socket).stdout)["governor"]
    assert gov["state"] == "paused" and gov["reasons"][0]["kind"] == "user"
    assert gov["user_pause"]["reason"] == "exam week"

    assert d.stop() == 0
    d.start()
    d.wait_running()
    assert status_lines(d.socket)["governor"] == r.stdout.strip()

    r = run_cli("resume", socket=d.socket)
    assert r.returncode == 0 and r.stdout.strip() == "running"
    assert status_lines(d.socket)["governor"] == "running"


def test_pause_refuses_a_bad_duration(daemons):
    d = daemons()
    d.wait_running()
    r = run_cli("pause", "--for", "soon", socket=d.socket)
    assert r.returncode == 2 and "duration" in r.stderr
    with d.client() as c:
        from lattice.api.errors import InvalidArgumentError
        with pytest.raises(InvalidArgumentError):
            c.pause(for_s=-5.0)
        assert c.pause(reason="by hand")["summary"] == "paused by user: by hand"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_on_loopback(daemons):
    port = free_port()
    d = daemons(env={"LATTICE_METRICS_LISTEN": f"127.0.0.1:{port}"})
    st = d.wait_running()
    with d.client() as c:
        c.pause(reason="scrape me")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    info = fams["lattice_info"].samples[0]
    assert info.labels["peer_id"] == st["peer_id"] and info.value == 1
    assert fams["lattice_governor_compute_paused"].samples[0].value == 1
    reasons = {s.labels["reason"]: s.value for s in fams["lattice_governor_pause_reason"].samples}
    assert reasons["user"] == 1
    assert fams["lattice_rpc_requests"].samples[0].value >= 1
    with d.client() as c:
        assert c.status()["metrics"]["scrapes"] == 1
        stats = c.governor_stats()
    assert stats["pauses"] == {"user": 1} and stats["settings"]["cpu_percent"] == 100.0
