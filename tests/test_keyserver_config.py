"""keyserverd.config: defaults, TOML, overrides, errors that name the key."""

from pathlib import Path

import pytest

from keyserverd.config import KeyServerConfig, load_config, parse_hostport
from l2crypt.core.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "keyserver.toml"
    p.write_text(text)
    return p


def test_defaults():
    c = load_config()
    assert c == KeyServerConfig()
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 7788)
    assert c.state_dir == Path("/var/lib/l2crypt/keyserver")
    assert c.cipher == "aes-256-gcm" and c.token_ttl_s == 86400 and c.cert_days == 365


def test_file_and_overrides(tmp_path):
    p = write(tmp_path, 'listen = "[::1]:9000"\ncipher = "chacha20-poly1305"\n'
                        'server_names = ["KS1.example.net", "192.0.2.1"]\nlog_level = "DEBUG"\n'
                        'unauth_idle_s = 3\n')
    c = load_config(p, {"state_dir": str(tmp_path), "cert_days": None})
    assert (c.listen_host, c.listen_port) == ("::1", 9000)
    assert c.server_names == ("ks1.example.net", "192.0.2.1")
    assert c.log_level == "debug" and c.unauth_idle_s == 3.0 and c.state_dir == tmp_path
    c = load_config(p, {"listen": "127.0.0.1:0", "cipher": "aes-256-gcm"})
    assert c.listen == "127.0.0.1:0" and c.cipher == "aes-256-gcm"


@pytest.mark.parametrize(
    "text, message",
    [
        ('listen = "abc"', "keyserver.toml: listen: not HOST:PORT: 'abc'"),
        ('listen = "1.2.3.4:70000"', "keyserver.toml: listen: port out of range"),
        ("listen = 7788", "keyserver.toml: listen: not HOST:PORT: 7788"),
        ('cipher = "rot13"', "keyserver.toml: cipher: must be one of"),
        ('cert_days = "365"', "keyserver.toml: cert_days: not a positive integer"),
        ("token_ttl_s = 0", "keyserver.toml: token_ttl_s: not a positive integer"),
        ("token_ttl_s = true", "keyserver.toml: token_ttl_s: not a positive integer"),
        ('server_names = "ks1"', "keyserver.toml: server_names: not a list"),
        ('server_names = ["bad name"]', "keyserver.toml: server_names: not a DNS name"),
        ('log_level = "loud"', "keyserver.toml: log_level: must be one of"),
        ('port = 1', "keyserver.toml: port: unknown key"),
        ("[keyserver]\nlisten = '1.2.3.4:5'", "keyserver.toml: keyserver: unknown key"),
        ("listen = ", "keyserver.toml: not valid TOML"),
    ],
)
def test_file_errors_name_the_key(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(tmp_path) + "/" + message)
    assert "\n" not in str(e.value)


def test_override_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"^--listen: not HOST:PORT: 'abc'$"):
        load_config(None, {"listen": "abc"})
    with pytest.raises(ConfigError, match=r"^--unauth-idle-s: "):
        load_config(None, {"unauth_idle_s": -1.0})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("text", ["host", ":80", "a:b", "[zz]:1", "1.2.3.4:"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        parse_hostport(text)
