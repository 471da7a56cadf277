"""l2crypt-gateway: config errors name the key; CLI errors are one line, exit 2."""

import pytest

from gateway.cli import main
from gateway.config import load_gateway_config
from l2crypt.core.errors import ConfigError


def test_minimal_config_and_overrides(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('encrypted_port = "eth0"\nservers = ["10.0.0.1:7788"]\nplain_port = "eth1"\n')
    cfg = load_gateway_config(str(path), {"group_crossing": "all", "tunnel_peers": None})
    assert (cfg.encrypted_port, cfg.plain_port, cfg.group_crossing) == ("eth0", "eth1", "all")
    assert cfg.tunnel_peers == () and cfg.socket_path.name == "gateway.sock"
    assert (cfg.wire_ring, cfg.datapath) == ("off", "simple")  # the agent's defaults
    cfg = load_gateway_config(str(path), {"wire_ring": "v2", "datapath": "batched"})
    assert (cfg.wire_ring, cfg.datapath) == ("v2", "batched")


@pytest.mark.parametrize("values, key", [
    ({"servers": ["a:1"]}, "encrypted_port"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "group_crossing": "some"}, "group_crossing"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "tunnel_peers": ["b"]}, "tunnel_peers"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "tunnel_peers": ["b=1.2.3.4:5"]}, "tunnel_listen"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "plain_port": "eth0"}, "plain_port"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "bogus": 1}, "bogus"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "wire_ring": "v4"}, "wire_ring"),
    ({"encrypted_port": "eth0", "servers": ["a:1"], "datapath": "fast"}, "datapath"),
])
def test_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=f": {key}: "):
        load_gateway_config(None, values)


def test_cli_bad_value_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--encrypted-port", "eth0", "--server", "a:1", "--group-crossing", "most"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "group_crossing" in err


def test_status_without_a_gateway(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "no gateway is running" in err


BASE = {"encrypted_port": "eth0", "servers": ["a:1"]}
P1 = "gB path=1 local=10.71.1.1:4789 remote=10.71.2.1:4789"
P2 = "gB path=2 local=10.72.1.1:4789 remote=10.72.2.1:4789 weight=2.5"


def test_paths_add_to_the_one_path_config_which_stays_valid():
    cfg = load_gateway_config(None, {**BASE, "tunnel_listen": "10.69.1.1:4789", "tunnel_peers": ["gB=10.69.2.1:4789"],
                                     "tunnel_paths": [P1, P2], "tunnel_mode": "redundant"})
    specs = cfg.path_specs()
    assert [(s.peer, s.path, s.local, s.remote, s.weight) for s in specs] == [
        ("gB", 0, ("10.69.1.1", 4789), ("10.69.2.1", 4789), 1.0),
        ("gB", 1, ("10.71.1.1", 4789), ("10.71.2.1", 4789), 1.0),
        ("gB", 2, ("10.72.1.1", 4789), ("10.72.2.1", 4789), 2.5)]
    assert cfg.tunnel_path_ids() == {"gB": (0, 1, 2)} and cfg.tunnel_peer_names() == ("gB",)
    only_paths = load_gateway_config(None, {**BASE, "tunnel_paths": [P1, P2]})
    assert only_paths.tunnel_path_ids() == {"gB": (1, 2)} and only_paths.tunnel_mode == "split"
    old = load_gateway_config(None, {**BASE, "tunnel_listen": "10.69.1.1:4789", "tunnel_peers": ["gB=10.69.2.1:4789"]})
    assert old.tunnel_path_ids() == {"gB": (0,)}


@pytest.mark.parametrize("paths, words", [
    (["gB path=16 local=1.1.1.1:1 remote=2.2.2.2:1"], "path: want 0-15"),
    (["gB path=1 local=1.1.1.1 remote=2.2.2.2:1"], "local: needs a port"),
    (["gB path=1 remote=2.2.2.2:1"], "missing local"),
    (["gB path=1 local=1.1.1.1:1 remote=2.2.2.2:1 speed=9"], "'speed=9'"),
    (["gB path=1 local=1.1.1.1:1 remote=2.2.2.2:1 weight=0"], "weight: want 0.01-100"),
    ([P1, P1.replace("remote=10.71.2.1", "remote=10.71.9.1")], "path 1 of 'gB' given twice"),
    ([P1, P1.replace("path=1", "path=3")], "same local address and remote host"),
    (["g/B path=1 local=1.1.1.1:1 remote=2.2.2.2:1"], "enrolled ID"),
    ([""], "enrolled ID"),
])
def test_bad_paths_are_named(paths, words):
    with pytest.raises(ConfigError, match=": tunnel_paths: ") as exc:
        load_gateway_config(None, {**BASE, "tunnel_paths": paths})
    assert words in str(exc.value)


def test_path_0_belongs_to_the_tunnel_peers_address():
    with pytest.raises(ConfigError, match="path 0 of 'gB' is its tunnel_peers address"):
        load_gateway_config(None, {**BASE, "tunnel_listen": "10.69.1.1:4789", "tunnel_peers": ["gB=10.69.2.1:4789"],
                                   "tunnel_paths": [P1.replace("path=1", "path=0")]})


@pytest.mark.parametrize("key, value", [("tunnel_mode", "mirror"), ("tunnel_fec_k", 1),
                                        ("tunnel_probe_interval_s", 0.0), ("tunnel_spray", "yes")])
def test_bad_multipath_keys_are_named(key, value):
    with pytest.raises(ConfigError, match=f": {key}: "):
        load_gateway_config(None, {**BASE, key: value})
