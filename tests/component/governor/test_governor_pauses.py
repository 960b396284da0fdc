"""Each pause reason stops a governed compute stream within one signal interval (plus
the step running then) and lets it go on where it stopped once the reason lifts; all in
virtual time, with the signals read from a fake /proc, /sys, /dev and logind."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattice.core.governor import VolunteerConfig
from latticed.governor import IDLE_SIGNAL_INTERVAL_S

INTERVAL = 0.5  # VolunteerConfig.signal_interval_s
IDLE_INTERVAL = IDLE_SIGNAL_INTERVAL_S  # how often they are read with no compute around
COST = 0.05     # one virtual compute step


async def wait_state(gov, predicate, timeout: float = 3600) -> None:
    """Wait (virtual time) for the governor's state to satisfy ``predicate``."""
    with trio.fail_after(timeout):
        while not predicate(gov.state):
            await gov.wait_change(gov.version)


def set_battery(m, g):
    m.power(ac=False, battery="Discharging")


def unset_battery(m, g):
    m.power(ac=True, battery="Charging")


def keyboard(m, g):
    m.logind = (False, 0.0)  # a session is active


def leave_keyboard(m, g):
    m.logind = (True, m.now().wall)  # every session idle from now


def busy(m, g):
    m.set_cpu(others_percent=60)


def calm(m, g):
    m.set_cpu(others_percent=5)


def user_pause(m, g):
    g.pause(reason="video call")


def user_resume(m, g):
    g.resume()


CASES = {
    "battery": (VolunteerConfig(), set_battery, unset_battery, "paused: on battery", 0),
    "user at the keyboard (logind)": (VolunteerConfig(run_when="idle", idle_after_min=1),
                                      keyboard, leave_keyboard, "paused: user active now", 60),
    "other programs busy": (VolunteerConfig(pause_if_busy_percent=25, busy_window_s=2),
                            busy, calm, "paused: other programs use 60% of the CPU (limit 25%)", 2),
    "paused by the user": (VolunteerConfig(), user_pause, user_resume,
                           "paused by user: video call", 0),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_reason_pauses_within_an_interval_and_work_resumes_where_it_stopped(
        case, machine, start_governor, stream_of, nursery, autojump_clock):
    config, cause, lift, summary, settle = CASES[case]
    machine.logind = (True, 0.0)  # logind: nobody has ever been active
    gov, workers = await start_governor(nursery, config)
    stream = stream_of(gov.compute)
    nursery.start_soon(stream.run)
    await trio.sleep(10)
    assert gov.state.summary == "running" and len(stream.done) > 100

    t_signal = trio.current_time()
    cause(machine, gov)
    # the signal is read within one interval (a busy average needs its window to pass
    # the threshold); the step running then finishes; nothing starts after that
    await wait_state(gov, lambda st: not st.compute, timeout=INTERVAL + settle + 0.01)
    t_paused = trio.current_time()
    assert t_paused - t_signal <= INTERVAL + settle
    await trio.sleep(COST)
    steps_at_pause = len(stream.done)
    await trio.sleep(120)
    assert gov.state.summary == summary
    assert len(stream.done) == steps_at_pause
    assert workers.started_between(t_paused, trio.current_time()) == 0

    lift(machine, gov)
    await wait_state(gov, lambda st: st.compute, timeout=INTERVAL + settle + 0.01)
    await trio.sleep(5)
    assert len(stream.done) > steps_at_pause + 50
    assert stream.done == list(range(len(stream.done)))  # nothing lost, nothing twice
    assert sum(gov.pauses.values()) == 1


async def test_terminal_input_pauses_until_idle_after_min_of_quiet(machine, start_governor, stream_of, nursery, autojump_clock):
    gov, workers = await start_governor(nursery,
                                        VolunteerConfig(run_when="idle", idle_after_min=2))
    assert gov.state.compute  # no logind, no terminal: a headless machine is idle
    stream = stream_of(gov.compute)
    nursery.start_soon(stream.run)
    await trio.sleep(5)
    machine.terminal_input(machine.now().wall)
    await wait_state(gov, lambda st: not st.compute, timeout=INTERVAL + 0.01)
    await trio.sleep(40.25)  # between two reads: the last one was 40 s after the input
    assert gov.state.summary == "paused: user active 40 s ago"
    assert gov.status()["signals"]["input_source"] == "tty"
    frozen = len(stream.done)
    t_input = gov.signals.last_input - machine.BASE
    await wait_state(gov, lambda st: st.compute)
    assert trio.current_time() - t_input == pytest.approx(120, abs=INTERVAL + 0.01)
    assert workers.started_between(t_input + INTERVAL + COST, t_input + 120) == 0
    await trio.sleep(1)
    assert len(stream.done) > frozen and stream.done == list(range(len(stream.done)))


async def test_schedule_pauses_at_the_window_edge_and_says_until_when(machine, start_governor, stream_of, nursery, autojump_clock):
    # virtual time 0 is Wednesday 12:00
    config = VolunteerConfig(compute_schedule="wed 12:00-12:01; wed 12:03-13:00")
    gov, workers = await start_governor(nursery, config)
    stream = stream_of(gov.compute)
    nursery.start_soon(stream.run)
    await trio.sleep(61)
    assert gov.state.summary == "paused: outside schedule until 12:03"
    assert workers.started_between(60 + INTERVAL + 0.01, 180) == 0
    await wait_state(gov, lambda st: st.compute)
    assert 180 <= trio.current_time() <= 180 + INTERVAL + 0.01
    await trio.sleep(1)
    assert stream.done == list(range(len(stream.done))) and workers.started_between(180, 182) > 10


async def test_a_timed_user_pause_ends_on_its_own_and_survives_a_restart(machine, start_governor, stream_of, tmp_path, autojump_clock):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    async with trio.open_nursery() as nursery:
        gov, _ = await start_governor(nursery, VolunteerConfig(), state_dir=state_dir)
        status = gov.pause(for_s=7200, reason="exam week")
        assert status["summary"] == "paused by user until 14:00: exam week"
        assert status["state"] == "paused" and status["reasons"][0]["kind"] == "user"
        nursery.cancel_scope.cancel()
    await trio.sleep(600)
    async with trio.open_nursery() as nursery:  # the daemon restarted
        gov, workers = await start_governor(nursery, VolunteerConfig(), state_dir=state_dir)
        assert gov.state.summary == "paused by user until 14:00: exam week"
        stream = stream_of(gov.compute)
        nursery.start_soon(stream.run)
        await trio.sleep(7200 - 600 - 1)
        assert stream.done == []
        await trio.sleep(1 + INTERVAL + COST)
        assert gov.state.compute and gov.user_pause is None and stream.done
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # and the ended pause stays ended
        gov, _ = await start_governor(nursery, VolunteerConfig(), state_dir=state_dir)
        assert gov.state.compute
        nursery.cancel_scope.cancel()


async def test_resume_lifts_only_the_users_pause(machine, start_governor, stream_of, nursery, autojump_clock):
    gov, _ = await start_governor(nursery, VolunteerConfig())
    machine.power(ac=False, battery="Discharging")
    gov.pause(reason="x")
    # nothing computes: the battery is read within IDLE_INTERVAL
    await wait_state(gov, lambda st: len(st.compute_reasons) == 2,
                     timeout=IDLE_INTERVAL + INTERVAL)
    assert [r.kind for r in gov.state.compute_reasons] == ["user", "battery"]
    assert gov.resume()["summary"] == "paused: on battery"


async def test_subscribers_see_each_change_of_kind_once(machine, start_governor, stream_of, nursery, autojump_clock):
    gov, _ = await start_governor(nursery, VolunteerConfig(run_when="idle", idle_after_min=1))
    seen = []

    async def watch():
        version = gov.version
        while True:
            state = await gov.wait_change(version)
            version = gov.version
            seen.append([r.kind for r in state.compute_reasons])

    nursery.start_soon(watch)
    machine.terminal_input(machine.now().wall)
    await trio.sleep(30)   # "user active N s ago" ticks, but is one change
    machine.power(ac=False, battery="Discharging")
    await trio.sleep(40)   # battery and input; input lifts at 60 s
    machine.power(ac=True)
    await wait_state(gov, lambda st: st.compute, timeout=IDLE_INTERVAL + INTERVAL)
    await trio.testing.wait_all_tasks_blocked()  # the watcher has taken the last change
    assert seen == [["user_active"], ["battery", "user_active"], ["battery"], []]


async def test_with_nothing_computing_a_step_reads_the_signals_before_it_starts(
        machine, start_governor, stream_of, nursery, autojump_clock):
    # Idle, the signals are read every IDLE_INTERVAL; a step must not start on an
    # older reading than one signal interval, and the service must go back to reading
    # every INTERVAL while compute is wanted.
    gov, workers = await start_governor(nursery, VolunteerConfig())
    await trio.sleep(3 * IDLE_INTERVAL + 1)  # between two idle reads
    machine.power(ac=False, battery="Discharging")
    stream = stream_of(gov.compute)
    t_wanted = trio.current_time()
    nursery.start_soon(stream.run)
    await wait_state(gov, lambda st: not st.compute, timeout=INTERVAL)
    assert gov.state.summary == "paused: on battery"
    assert stream.done == [] and workers.started_between(t_wanted, trio.current_time()) == 0
    machine.power(ac=True, battery="Charging")
    await wait_state(gov, lambda st: st.compute, timeout=INTERVAL + 0.01)
    await trio.sleep(1)
    assert len(stream.done) > 10
    machine.power(ac=False, battery="Discharging")
    t_signal = trio.current_time()
    await wait_state(gov, lambda st: not st.compute, timeout=INTERVAL + 0.01)
    assert trio.current_time() - t_signal <= INTERVAL
