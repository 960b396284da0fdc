"""The [volunteer] and [metrics] sections: defaults from the governor's dataclass, the
usual precedence, and bad values exiting with the key named."""

import pytest

from lattice.core.governor import VolunteerConfig
from latticed import config as cfgmod


def load(tmp_path, toml=None, env=None):
    f = None
    if toml is not None:
        f = tmp_path / "c.toml"
        f.write_text(toml)
    return cfgmod.load(config_file=f, flags={"node.state_dir": tmp_path / "s"}, environ=env or {})


def test_defaults_are_the_governors_and_precedence_holds(tmp_path):
    c = load(tmp_path)
    assert c.build(VolunteerConfig) == VolunteerConfig()
    assert c["metrics.listen"] == ""
    c = load(tmp_path, '[volunteer]\ncpu_percent = 30\nrun_when = "idle"\n'
                       'compute_schedule = "mon-fri 18:00-08:00; sat,sun"\n'
                       '[metrics]\nlisten = "127.0.0.1:9464"\n',
             env={"LATTICE_VOLUNTEER_CPU_PERCENT": "20", "LATTICE_VOLUNTEER_MAX_CORES": "1"})
    v = c.build(VolunteerConfig)
    assert (v.cpu_percent, v.max_cores, v.run_when) == (20.0, 1, "idle")
    assert c.sources["volunteer.cpu_percent"] == "environment LATTICE_VOLUNTEER_CPU_PERCENT"
    assert v.compute_windows.contains(5 * 86400 + 3600)  # Saturday 01:00
    assert c["metrics.listen"] == "127.0.0.1:9464"


@pytest.mark.parametrize("toml,env,key", [
    ('[volunteer]\ncpu_percent = 0\n', {}, "volunteer.cpu_percent"),
    ('[volunteer]\nrun_when = "never"\n', {}, "volunteer.run_when"),
    ('[volunteer]\ncompute_schedule = "weekdays 9-5"\n', {}, "volunteer.compute_schedule"),
    (None, {"LATTICE_VOLUNTEER_NETWORK_SCHEDULE": "mon 25:00-26:00"}, "volunteer.network_schedule"),
    ('[volunteer]\ndata_reset_day = 31\n', {}, "volunteer.data_reset_day"),
    ('[volunteer]\nmax_cores = "all"\n', {}, "volunteer.max_cores"),
    ('[volunteer]\ncpu_percentage = 50\n', {}, "volunteer.cpu_percentage"),
    ('[metrics]\nlisten = "0.0.0.0:9464"\n', {}, "metrics.listen"),
    (None, {"LATTICE_METRICS_LISTEN": "9464"}, "metrics.listen"),
])
def test_bad_values_name_the_key(tmp_path, toml, env, key):
    with pytest.raises(cfgmod.ConfigError) as e:
        load(tmp_path, toml, env)
    assert e.value.key == key and key in str(e.value)
