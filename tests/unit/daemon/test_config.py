"""Config precedence (defaults < file < env < flags), validation naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_default_config_file_documents_every_setting_and_loads(tmp_path):
    text = (ROOT / "daemon" / "latticed.toml").read_text()
    c = cfgmod.load(config_file=ROOT / "daemon" / "latticed.toml",
                    flags={"node.state_dir": tmp_path}, environ={})
    for s in cfgmod.SETTINGS:
        section, name = s.key.split(".", 1)
        assert f"{name} =" in text, f"daemon/latticed.toml does not document {s.key}"
        if s.default is not None:
            assert c[s.key] == s.default, f"daemon/latticed.toml disagrees with the default of {s.key}"


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
