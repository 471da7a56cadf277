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
