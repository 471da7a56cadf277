"""Agent config: every mistake names its key; CLI overrides win over the file."""

import pytest

from l2crypt.agent.config import AgentConfig, load_agent_config, parse_hostport
from l2crypt.core.errors import ConfigError

BASE = 'port = "eth0"\nservers = ["192.0.2.1:7788"]\n'


def write(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_good_file_and_override(tmp_path):
    path = write(tmp_path, BASE + 'tap = "l2c9"\nhold_frames = 4\n')
    cfg = load_agent_config(path, {"hold_frames": 8, "tap": None})
    assert isinstance(cfg, AgentConfig)
    assert cfg.tap == "l2c9" and cfg.hold_frames == 8 and cfg.servers == ("192.0.2.1:7788",)


@pytest.mark.parametrize("text, key", [
    ('servers = ["192.0.2.1:7788"]\n', "port"),                      # missing key
    (BASE + 'hold_frames = "many"\n', "hold_frames"),               # wrong type
    (BASE + 'colour = "blue"\n', "colour"),                         # unknown key
    ('port = "eth0"\nservers = ["192.0.2.1:99999"]\n', "servers"),   # bad address
    ('port = "eth0"\nservers = ["no port:1"]\n', "servers"),         # bad address
    (BASE + 'tap_mac = "ff:ff:ff:ff:ff:ff"\n', "tap_mac"),          # group MAC
    (BASE + 'ethertype = 12\n', "ethertype"),
    (BASE + 'log_level = "loud"\n', "log_level"),
    (BASE + 'hold_age_s = -1\n', "hold_age_s"),
    ('port = "an-interface-name-too-long"\nservers = ["192.0.2.1:1"]\n', "port"),
])
def test_mistakes_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_agent_config(write(tmp_path, text), {})
    message = str(info.value)
    assert f": {key}: " in message and "\n" not in message


def test_broken_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(write(tmp_path, "port = \n"), {})
    with pytest.raises(ConfigError, match="no such config file"):
        load_agent_config(str(tmp_path / "nope.toml"), {})


@pytest.mark.parametrize("text, want", [
    ("10.0.0.1:7788", ("10.0.0.1", 7788)),
    ("ks.example", ("ks.example", 7788)),
    ("[fd00::1]:99", ("fd00::1", 99)),
])
def test_hostport(text, want):
    assert parse_hostport(text) == want


@pytest.mark.parametrize("text", ["", ":1", "a:b", "fd00::1", "a:0", "a b:1"])
def test_bad_hostport(text):
    with pytest.raises(ValueError):
        parse_hostport(text)
