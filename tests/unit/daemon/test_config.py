"""Config precedence (defaults < file < env < flags), validation naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from lattice.jobs import JobsConfig
from lattice.net.dht import DHTConfig
from latticed import config as cfgmod
from latticed.main import build_parser, flags_from_args

ROOT = Path(__file__).resolve().parents[3]


def load(tmp_path, toml=None, env=None, argv=()):
    f = None
    if toml is not None:
        f = tmp_path / "c.toml"
        f.write_text(toml)
    args = build_parser().parse_args(["--state-dir", str(tmp_path / "s"), *argv])
    return cfgmod.load(config_file=f, flags=flags_from_args(args), environ=env or {})


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    toml = '[node]\nname = "from-file"\nmdns = false\n[log]\nlevel = "debug"\n[rpc]\nmax_clients = 5\n'
    env = {"LATTICE_NAME": "from-env", "LATTICE_LOG_LEVEL": "warning"}
    c = load(tmp_path, toml, env, ["--name", "from-flag"])
    assert c["node.name"] == "from-flag" and c.sources["node.name"] == "command line"
    assert c["log.level"] == "warning" and c.sources["log.level"].startswith("environment")
    assert c["rpc.max_clients"] == 5 and c.sources["rpc.max_clients"].startswith("file")
    assert c["node.mdns"] is False
    assert c["rpc.max_frame_bytes"] == 4 << 20 and c.sources["rpc.max_frame_bytes"] == "default"


def test_env_lists_and_bools(tmp_path):
    c = load(tmp_path, env={"LATTICE_LISTEN": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
                            "LATTICE_MDNS": "off", "LATTICE_RPC_MAX_CLIENTS": "7"})
    assert c["node.listen"] == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    assert c["node.mdns"] is False and c["rpc.max_clients"] == 7


def test_socket_defaults_into_state_dir(tmp_path):
    c = load(tmp_path)
    assert c.socket == tmp_path / "s" / "latticed.sock"


@pytest.mark.parametrize("toml,env,argv,key", [
    ("[node]\nlisten = 5\n", {}, [], "node.listen"),
    ("[node]\nlisten = ['nonsense']\n", {}, [], "node.listen"),
    ("[node]\nbootstrap = ['/ip4/127.0.0.1/tcp/1']\n", {}, [], "node.bootstrap"),
    ("[node]\nlisten_addr = []\n", {}, [], "node.listen_addr"),
    ("[rpc]\nmax_clients = 0\n", {}, [], "rpc.max_clients"),
    (None, {"LATTICE_RPC_MAX_CLIENTS": "many"}, [], "rpc.max_clients"),
    (None, {}, ["--log-level", "loud"], "log.level"),
    ("not toml [", {}, [], "config"),
])
def test_bad_config_names_the_key(tmp_path, toml, env, argv, key):
    with pytest.raises(cfgmod.ConfigError) as e:
        load(tmp_path, toml, env, argv)
    assert e.value.key == key and key in str(e.value)


def test_annotated_config_file_agrees_with_the_dataclasses(tmp_path):
    """daemon/latticed.toml documents every setting, in its section, with the default
    its owner dataclass declares (an unset optional path as a commented example)."""
    import tomllib
    text = (ROOT / "daemon" / "latticed.toml").read_text()
    parsed = tomllib.loads(text)
    sections = {}
    for block in ("\n" + text).split("\n[")[1:]:
        name, _, body = block.partition("]")
        sections[name] = body
    for s in cfgmod.SETTINGS:
        section, name = s.key.split(".", 1)
        assert section in sections, f"daemon/latticed.toml has no [{section}]"
        if s.default is None:
            assert f"# {name} =" in sections[section], f"latticed.toml: no example of {s.key}"
            continue
        assert name in parsed[section], f"daemon/latticed.toml does not document {s.key}"
        assert parsed[section][name] == s.default, (
            f"daemon/latticed.toml says {s.key} = {parsed[section][name]!r}; "
            f"{s.owner.__qualname__}.{s.field} says {s.default!r}")
    c = cfgmod.load(config_file=ROOT / "daemon" / "latticed.toml",
                    flags={"node.state_dir": tmp_path}, environ={})
    assert all(src.startswith("file") for key, src in c.sources.items()
               if cfgmod.BY_KEY[key].default is not None)


def test_every_setting_has_its_owners_doc_and_builds_its_owner(tmp_path):
    c = load(tmp_path, "[dht]\nreplication = 7\nrequest_timeout_s = 2.5\n")
    dht = c.build(DHTConfig)
    assert (dht.replication, dht.request_timeout) == (7, 2.5)
    assert dht.k == DHTConfig().k  # not a setting: the dataclass's own default
    assert all(s.doc for s in cfgmod.SETTINGS)
    jobs = c.build(JobsConfig)
    assert isinstance(jobs.accept_tasks, tuple)  # config lists become the field's tuples


def test_a_services_own_check_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(cfgmod.ConfigError) as e:
        load(tmp_path, "[state]\nmax_authors = 100000\n")
    assert e.value.key == "state.max_authors" and "file" in str(e.value)


def run_latticed(*args, env=None):
    return subprocess.run([sys.executable, "-m", "latticed", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_cli_bad_config_exits_2_naming_the_key(tmp_path):
    r = run_latticed("--state-dir", str(tmp_path), "--listen", "garbage", "--print-config")
    assert r.returncode == 2
    assert "node.listen" in r.stderr and "garbage" in r.stderr


def test_print_config_shows_effective_values_and_sources(tmp_path):
    r = run_latticed("--state-dir", str(tmp_path), "--listen", "/ip4/127.0.0.1/tcp/9", "--print-config")
    assert r.returncode == 0, r.stderr
    import tomllib
    parsed = tomllib.loads(r.stdout)
    assert parsed["node"]["listen"] == ["/ip4/127.0.0.1/tcp/9"]
    assert parsed["node"]["state_dir"] == str(tmp_path)
    assert "# command line" in r.stdout
