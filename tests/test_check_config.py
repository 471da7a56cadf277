"""``l2crypt check-config`` and ``keyserverd check-config``: every problem, each with its key.

One test per kind of mistake (missing key, wrong type, unknown key, bad
address) for both daemons, one that finds several problems in one file, and
the daemons refuse to start on the same file naming the same keys.
"""

import pytest

from keyserverd.cli import main as ks_main
from l2crypt.agent.cli import main as l2_main

AGENT_OK = 'port = "eth0"\nservers = ["192.0.2.1:7788"]\n'
KS_OK = 'listen = "0.0.0.0:7788"\nstate_dir = "/var/lib/l2crypt/keyserver"\n'

AGENT_MISTAKES = {
    "missing key": ('servers = ["192.0.2.1:7788"]\n', "port", "missing"),
    "missing (empty) key": ('port = ""\nservers = ["192.0.2.1:7788"]\n', "port", "missing"),
    "wrong type": (AGENT_OK + 'hold_frames = "many"\n', "hold_frames", "want an integer"),
    "unknown key": (AGENT_OK + 'colour = "blue"\n', "colour", "unknown key"),
    "bad address": ('port = "eth0"\nservers = ["192.0.2.1:99999"]\n', "servers", "bad port"),
    "bad metrics address": (AGENT_OK + 'metrics_listen = "nowhere:80"\n', "metrics_listen", "not an IP"),
}
KS_MISTAKES = {
    "missing (empty) key": ('listen = ""\n', "listen", "missing"),
    "wrong type": ('cert_days = "365"\n', "cert_days", "not a positive integer"),
    "unknown key": ('colour = "blue"\n', "colour", "unknown key"),
    "bad address": ('listen = "abc"\n', "listen", "not HOST:PORT"),
    "bad metrics address": ('metrics_listen = "127.0.0.1"\n', "metrics_listen", "not HOST:PORT"),
}


def run(main, capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind", AGENT_MISTAKES)
def test_agent_mistake_names_its_key(tmp_path, capsys, kind):
    text, key, words = AGENT_MISTAKES[kind]
    path = write(tmp_path, text)
    code, out, err = run(l2_main, capsys, "check-config", path)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"l2crypt: {path}: {key}: ") and words in lines[0], lines[0]
    # The agent refuses to start on it with the same message, exit 2, one line.
    code, out, err = run(l2_main, capsys, "agent", "--config", path)
    assert code == 2 and f": {key}: " in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("kind", KS_MISTAKES)
def test_keyserverd_mistake_names_its_key(tmp_path, capsys, kind):
    text, key, words = KS_MISTAKES[kind]
    path = write(tmp_path, text)
    code, out, err = run(ks_main, capsys, "check-config", path)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"keyserverd: {path}: {key}: ") and words in lines[0], lines[0]
    code, out, err = run(ks_main, capsys, "serve", "--config", path, "--state-dir", str(tmp_path / "s"))
    assert code == 2 and f": {key}: " in err and err.count("\n") == 1 and "Traceback" not in err


def test_agent_every_problem_is_named(tmp_path, capsys):
    path = write(tmp_path, 'tap = 7\nhold_age_s = "soon"\ncolour = 1\nservers = ["a:b"]\n')
    code, out, err = run(l2_main, capsys, "check-config", path)
    assert code == 2
    keys = sorted(line.split(": ")[2] for line in err.splitlines())
    assert keys == ["colour", "hold_age_s", "port", "servers", "tap"], err


def test_keyserverd_every_problem_is_named(tmp_path, capsys):
    path = write(tmp_path, 'listen = 1\ncipher = "rot13"\nport = 1\nlog_format = "xml"\n')
    code, out, err = run(ks_main, capsys, "check-config", path)
    assert code == 2
    keys = sorted(line.split(": ")[2] for line in err.splitlines())
    assert keys == ["cipher", "listen", "log_format", "port"], err


def test_valid_files_pass(tmp_path, capsys):
    path = write(tmp_path, AGENT_OK + 'metrics_listen = ""\nlog_format = "json"\n')
    assert run(l2_main, capsys, "check-config", path)[0] == 0
    path = write(tmp_path, KS_OK + 'metrics_listen = "[::1]:9479"\nlog_format = "json"\n', "k.toml")
    code, out, _ = run(ks_main, capsys, "check-config", path)
    assert code == 0 and out.strip().endswith(": ok")


def test_broken_and_missing_files(tmp_path, capsys):
    code, _, err = run(l2_main, capsys, "check-config", write(tmp_path, "port = \n"))
    assert code == 2 and "not valid TOML" in err
    code, _, err = run(ks_main, capsys, "check-config", str(tmp_path / "nope.toml"))
    assert code == 2 and "cannot read" in err
