"""The decision from signals: each reason pauses compute (or transfers) on its own,
says exactly why in the words `lattice status` shows, and lifts when its signal does."""

import pytest

from lattice.core.governor import (
    BATTERY,
    BUSY,
    DATA_CAP,
    NETWORK_SCHEDULE,
    SCHEDULE,
    USER,
    USER_ACTIVE,
    Now,
    Signals,
    UserPause,
    VolunteerConfig,
    VolunteerConfigError,
    decide,
)
from lattice.core.governor.localtime import days_from_civil

WED_NOON = days_from_civil(2025, 6, 11) * 86400 + 12 * 3600  # a Wednesday
NOW = Now(WED_NOON, 0)


def test_defaults_run_whatever_the_signals_say_except_battery():
    cfg = VolunteerConfig()
    calm = decide(cfg, NOW, Signals(last_input=WED_NOON, busy_percent=99.0))
    assert calm.compute and calm.network and calm.summary == "running"
    assert decide(cfg, NOW, Signals(on_battery=True)).summary == "paused: on battery"
    assert decide(VolunteerConfig(pause_on_battery=False), NOW, Signals(on_battery=True)).compute


def test_user_pause_with_and_without_an_end_and_a_reason():
    cfg = VolunteerConfig()
    s = decide(cfg, NOW, Signals(user_pause=UserPause(WED_NOON, WED_NOON + 2 * 3600, "gaming")))
    assert s.summary == "paused by user until 14:00: gaming" and s.network
    assert decide(cfg, NOW, Signals(user_pause=UserPause(WED_NOON))).summary == "paused by user"
    tomorrow = decide(cfg, NOW, Signals(user_pause=UserPause(WED_NOON, WED_NOON + 86400)))
    assert tomorrow.summary == "paused by user until thu 12:00"
    expired = UserPause(WED_NOON - 60, WED_NOON, "short")
    assert decide(cfg, NOW, Signals(user_pause=expired)).compute


def test_idle_only_waits_for_idle_after_min_and_headless_counts_as_idle():
    cfg = VolunteerConfig(run_when="idle", idle_after_min=5)
    s = decide(cfg, NOW, Signals(last_input=WED_NOON - 40))
    assert s.summary == "paused: user active 40 s ago"
    assert s.compute_reasons[0].until == WED_NOON - 40 + 300
    assert decide(cfg, NOW, Signals(last_input=WED_NOON)).summary == "paused: user active now"
    assert decide(cfg, NOW, Signals(last_input=WED_NOON - 300)).compute
    assert decide(cfg, NOW, Signals(last_input=None)).compute  # no user session at all
    assert decide(VolunteerConfig(), NOW, Signals(last_input=WED_NOON)).compute  # run_when=always


def test_busy_machine_pauses_above_the_threshold_only():
    cfg = VolunteerConfig(pause_if_busy_percent=25)
    s = decide(cfg, NOW, Signals(busy_percent=63.4))
    assert s.summary == "paused: other programs use 63% of the CPU (limit 25%)"
    assert decide(cfg, NOW, Signals(busy_percent=25.0)).compute
    assert decide(cfg, NOW, Signals(busy_percent=None)).compute


def test_schedule_says_until_when():
    cfg = VolunteerConfig(compute_schedule="mon-fri 18:00-08:00")
    s = decide(cfg, NOW, Signals())
    assert s.summary == "paused: outside schedule until 18:00"
    evening = Now(WED_NOON + 7 * 3600, 0)
    assert decide(cfg, evening, Signals()).compute
    # local time: at UTC+2, 16:30 UTC is 18:30 local, inside the window
    assert decide(cfg, Now(WED_NOON + 4.5 * 3600, 7200), Signals()).compute
    fri = Now(WED_NOON + 2 * 86400 - 3 * 3600, 0)  # Friday 09:00: next is Friday 18:00
    assert decide(cfg, fri, Signals()).summary == "paused: outside schedule until 18:00"
    sat = Now(WED_NOON + 3 * 86400, 0)
    assert decide(cfg, sat, Signals()).summary == "paused: outside schedule until mon 18:00"


def test_every_reason_is_listed_in_order_and_the_first_is_shown():
    cfg = VolunteerConfig(run_when="idle", pause_if_busy_percent=10, compute_schedule="sat")
    s = decide(cfg, NOW, Signals(on_battery=True, last_input=WED_NOON - 5, busy_percent=50,
                                 user_pause=UserPause(WED_NOON)))
    assert [r.kind for r in s.compute_reasons] == [USER, BATTERY, SCHEDULE, USER_ACTIVE, BUSY]
    assert s.summary.startswith("paused by user")
    assert s.kinds() == ((USER, BATTERY, SCHEDULE, USER_ACTIVE, BUSY), ())


def test_transfers_have_their_own_schedule_and_the_data_cap():
    cfg = VolunteerConfig(network_schedule="22:00-06:00", monthly_data_gb=50)
    s = decide(cfg, NOW, Signals(data_used=50 * 10**9))
    assert s.compute  # transfers paused, compute goes on
    assert [r.kind for r in s.network_reasons] == [NETWORK_SCHEDULE, DATA_CAP]
    assert s.network_summary == "paused: outside transfer schedule until 22:00"
    assert s.network_reasons[1].text == ("monthly data cap reached (50.0 GB of 50.0 GB) "
                                         "until 2025-07-01 00:00")
    assert decide(cfg, Now(WED_NOON + 11 * 3600, 0), Signals(data_used=10)).network


@pytest.mark.parametrize("field,value", [
    ("run_when", "sometimes"), ("priority", "high"), ("cpu_percent", 0), ("cpu_percent", 101),
    ("pause_if_busy_percent", -1), ("data_reset_day", 29), ("max_cores", -1),
    ("upload_mbit_s", -5), ("signal_interval_s", 0), ("compute_schedule", "someday"),
])
def test_bad_settings_are_refused_naming_the_setting(field, value):
    with pytest.raises(VolunteerConfigError) as e:
        VolunteerConfig(**{field: value})
    assert e.value.key == f"volunteer.{field}" and str(value) in str(e.value)


def test_from_mapping_takes_daemon_keys_and_refuses_unknown_ones():
    cfg = VolunteerConfig.from_mapping({"volunteer.cpu_percent": 30, "volunteer.max_cores": 2})
    assert cfg.cpu_percent == 30 and cfg.max_cores == 2
    with pytest.raises(VolunteerConfigError) as e:
        VolunteerConfig.from_mapping({"volunteer.cpu_percentage": 30})
    assert e.value.key == "volunteer.cpu_percentage"
