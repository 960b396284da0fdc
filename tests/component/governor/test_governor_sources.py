"""Where the signals come from, read from fake /sys, /proc and /dev trees and a fake
logind answer: what each reading means, and that unreadable input is unknown (pauses
nothing) and counted, never a crash."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
from jeepney import HeaderFields


def test_battery_on_mains_on_battery_and_no_supply(machine):
    src = machine.sources()
    assert src.on_battery() is None  # a desktop or server: nothing to ask
    machine.power(battery="Discharging")
    assert src.on_battery() is True
    machine.power(battery="Charging")
    assert src.on_battery() is False
    machine.power(ac=True, battery="Discharging")  # an adapter says it: it wins
    assert src.on_battery() is False
    machine.power(ac=False, battery="Full")
    assert src.on_battery() is True


def test_a_mouse_battery_is_not_the_machines(machine):
    mouse = machine.sys / "class" / "power_supply" / "hidpp_battery_0"
    mouse.mkdir()
    (mouse / "type").write_text("Battery\n")
    (mouse / "scope").write_text("Device\n")
    (mouse / "status").write_text("Discharging\n")
    assert machine.sources().on_battery() is None


def test_cpu_sample_parses_proc_stat_and_our_own_ticks(machine):
    (machine.proc / "stat").write_text("cpu  100 20 30 400 50 6 7 8 90 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    (machine.proc / "4242" / "stat").write_text(
        "4242 (lattice d) ) R 1 1 1 0 -1 0 0 0 0 0 17 4 0 0 20 0 3 0 1 1 1\n")
    s = machine.sources().cpu_sample()
    # guest time (90) is already inside user: the total is the first eight fields
    assert (s.total, s.busy, s.own) == (621, 621 - 450, 21)


@pytest.mark.parametrize("garbage", ["", "intr 5\n", "cpu  x y z\n", "cpu  1 2\n"])
def test_garbled_proc_stat_is_unknown_and_counted(machine, garbage):
    (machine.proc / "stat").write_text(garbage)
    src = machine.sources()
    assert src.cpu_sample() is None and src.errors["cpu"] == 1


def test_missing_proc_files_are_unknown(machine, tmp_path):
    from latticed.governor import Sources
    src = Sources(proc=tmp_path / "nothing", sys=tmp_path / "nothing", dev=tmp_path / "nothing",
                  pid=1, idle_hint=None)
    assert src.cpu_sample() is None and src.rss_bytes() is None and src.on_battery() is None
    assert src.errors == {"cpu": 1, "memory": 1}


async def test_user_input_from_logind_then_terminals_then_nobody(machine):
    src = machine.sources()
    machine.logind = (False, 1000.0)  # a session is active: input is now
    assert await src.last_input(now=5000.0) == 5000.0 and src.input_source == "logind"
    machine.logind = (True, 4000.0)   # every session idle since 4000
    assert await src.last_input(now=5000.0) == 4000.0
    machine.logind = (True, 0.0)      # logind, but no session ever: headless
    assert await src.last_input(now=5000.0) is None
    machine.logind = None             # no system bus: terminal access times
    assert await src.last_input(now=5000.0) is None and src.input_source == "none"
    machine.terminal_input(3000.0, "0")
    machine.terminal_input(3500.0, "3")
    (machine.dev / "pts" / "ptmx").touch()  # the multiplexer is not a terminal
    assert await src.last_input(now=5000.0) == 3500.0 and src.input_source == "tty"


class FakeBus:
    """Stands in for jeepney's trio connection: answers logind's Properties.Get."""

    def __init__(self, props):
        self.props = props
        self.asked = []

    @asynccontextmanager
    async def router(self):
        yield self

    async def send_and_get_reply(self, msg):
        from jeepney import new_error, new_method_return
        name = msg.body[1]
        self.asked.append((msg.header.fields[HeaderFields.destination], msg.body))
        if name not in self.props:
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty")
        return new_method_return(msg, "v", (self.props[name],))

    async def aclose(self):
        pass


async def test_logind_answer_over_dbus_is_read_from_the_manager(monkeypatch, autojump_clock):
    import latticed.governor as gmod
    bus = FakeBus({"IdleHint": ("b", True), "IdleSinceHint": ("t", 1_700_000_000_500_000)})

    async def connect(bus_name):
        assert bus_name == "SYSTEM"
        return bus
    monkeypatch.setattr(gmod, "open_dbus_connection", lambda bus: connect(bus))
    hint = gmod.LogindIdleHint()
    assert await hint() == (True, 1_700_000_000.5) and hint.available
    assert bus.asked[0] == ("org.freedesktop.login1",
                            ("org.freedesktop.login1.Manager", "IdleHint"))
    bus.props["IdleHint"] = ("b", False)
    assert (await hint())[0] is False
    del bus.props["IdleSinceHint"]  # an error reply: unknown, and the connection is dropped
    assert await hint() is None and not hint.available


async def test_logind_without_a_system_bus_is_retried_once_a_minute(monkeypatch, autojump_clock):
    import latticed.governor as gmod
    attempts = []

    async def no_bus(bus):
        attempts.append(trio.current_time())
        raise FileNotFoundError("no /run/dbus/system_bus_socket")
    monkeypatch.setattr(gmod, "open_dbus_connection", no_bus)
    hint = gmod.LogindIdleHint()
    assert await hint() is None
    await trio.sleep(30)
    assert await hint() is None and len(attempts) == 1
    await trio.sleep(31)
    assert await hint() is None and len(attempts) == 2


async def test_a_real_missing_bus_socket_is_unknown(monkeypatch, tmp_path):
    from latticed.governor import LogindIdleHint
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'no-bus'}")
    hint = LogindIdleHint()
    assert await hint() is None and not hint.available
    await hint.aclose()
