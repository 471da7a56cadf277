"""keyserverd CLI: host add/list/revoke output, one-line errors with exit 2."""

import json
import re
import subprocess
import sys

import pytest

from keyserverd.cli import main
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import TOKEN_RE, hash_token


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_host_add_plain(capsys, tmp_path):
    code, out, err = run(capsys, "--state-dir", str(tmp_path), "host", "add", "web-1",
                         "--server", "10.0.0.1:7788", "--ttl", "600")
    assert code == 0 and err == ""
    token = re.search(r"^token: +(\S+)$", out, re.M).group(1)
    fp = re.search(r"^ca fingerprint: +(sha256:[0-9a-f]{64})$", out, re.M).group(1)
    assert TOKEN_RE.match(token)
    assert (f"  l2crypt enroll --server 10.0.0.1:7788 --id web-1 --token - "
            f"--ca-fingerprint {fp}\n") in out
    assert token not in out.split("join with")[1]  # the printed command never carries the token
    store = SqliteStore.open(tmp_path / "keyserver.db", 0)
    host = store.get_host("web-1")
    store.consume_token("web-1", hash_token(token), host.created_at + 1)  # the printed token works
    store.close()


def test_host_add_json_list_revoke(capsys, tmp_path):
    code, out, _ = run(capsys, "host", "add", "gw-1", "--state-dir", str(tmp_path), "--role", "gateway",
                       "--mac", "02:00:00:00:00:09", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"id", "token", "ca_fingerprint", "expires"}
    assert data["id"] == "gw-1" and TOKEN_RE.match(data["token"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["expires"])

    code, out, _ = run(capsys, "host", "--state-dir", str(tmp_path), "list", "--json")
    assert json.loads(out) == [{"id": "gw-1", "mac": "02:00:00:00:00:09", "role": "gateway",
                                "enrolled": False, "revoked": False}]
    code, out, _ = run(capsys, "host", "revoke", "gw-1", "--state-dir", str(tmp_path))
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "host", "list", "--state-dir", str(tmp_path))
    assert out.splitlines()[0].split() == ["ID", "MAC", "ROLE", "ENROLLED", "REVOKED"]
    assert out.splitlines()[1].split() == ["gw-1", "02:00:00:00:00:09", "gateway", "no", "yes"]


def test_config_file_on_subcommand(capsys, tmp_path):
    cfg = tmp_path / "ks.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "s"}"\nlisten = "192.0.2.5:7000"\n')
    code, out, _ = run(capsys, "host", "add", "h1", "--config", str(cfg))
    assert code == 0 and "--server 192.0.2.5:7000 " in out
    assert (tmp_path / "s" / "ca.key").exists()


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--listen", "abc"], 2, "--listen: not HOST:PORT: 'abc'"),
        (["--cipher", "rot13"], 2, "rot13"),
        (["--bogus"], 2, "--bogus"),
        (["host", "add", "bad id"], 2, "ID"),
        (["host", "add", ".x"], 2, "ID"),
        (["host", "add", "x", "--mac", "zz"], 2, "not a MAC address"),
        (["host", "add", "x", "--mac", "ff:ff:ff:ff:ff:ff"], 2, "multicast"),
        (["host", "revoke", "nobody"], 1, "no key server database"),
        (["host", "list"], 1, "no key server database"),
    ],
)
def test_errors_are_one_line(capsys, tmp_path, args, code, fragment):
    got, out, err = run(capsys, "--state-dir", str(tmp_path), *args)
    assert got == code
    assert err.count("\n") == 1 and err.startswith("keyserverd: error: ") and fragment in err
    assert "Traceback" not in err


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "keyserver.toml"
    cfg.write_text('listen = "abc"\n')
    got, _, err = run(capsys, "--config", str(cfg), "host", "list")
    assert got == 2 and err == f"keyserverd: error: {cfg}: listen: not HOST:PORT: 'abc'\n"


def test_duplicate_host(capsys, tmp_path):
    assert run(capsys, "--state-dir", str(tmp_path), "host", "add", "a")[0] == 0
    got, _, err = run(capsys, "--state-dir", str(tmp_path), "host", "add", "a")
    assert got == 1 and err == "keyserverd: error: host 'a' already exists\n"


def test_serve_prints_one_line_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", "from keyserverd.cli import main; main()",
         "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--log-level", "warning",
         "--metrics-listen", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert re.fullmatch(
            r"keyserverd: listening on 127\.0\.0\.1:\d+ ca-fingerprint sha256:[0-9a-f]{64} cipher aes-256-gcm\n",
            line), line
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_revoke_unknown_host(capsys, tmp_path):
    assert run(capsys, "--state-dir", str(tmp_path), "host", "add", "a")[0] == 0
    got, _, err = run(capsys, "--state-dir", str(tmp_path), "host", "revoke", "nobody")
    assert got == 1 and err == "keyserverd: error: no host 'nobody'\n"


def test_group_without_subcommand_shows_help(capsys):
    code, out, _ = run(capsys, "host")
    assert code == 0 and "add" in out and "revoke" in out


def test_peers_name_their_host_ids_and_host_add_keeps_out_of_them(capsys, tmp_path):
    fp1, fp2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    config = tmp_path / "keyserver.toml"
    config.write_text(f'peer_listen = "127.0.0.1:7790"\npeers = ["b-*={fp1}@192.0.2.2:7790"]\n')
    code, _, err = run(capsys, "--state-dir", str(tmp_path), "--config", str(config), "host", "add", "b-web1")
    assert code == 2 and "b-web1" in err and "192.0.2.2:7790" in err and len(err.splitlines()) == 1
    assert run(capsys, "--state-dir", str(tmp_path), "--config", str(config), "host", "add", "a-web1")[0] == 0
    # A peer without its IDs, or two peers whose IDs overlap: one line each, exit 2.
    config.write_text(f'peers = ["{fp1}@192.0.2.2:7790", "b-*={fp1}@192.0.2.3:7790", '
                      f'"b-x*={fp2}@192.0.2.4:7790"]\n')
    code, _, err = run(capsys, "check-config", str(config))
    assert code == 2 and "which host IDs" in err and "Traceback" not in err
    config.write_text(f'peers = ["b-*={fp1}@192.0.2.3:7790", "b-x*={fp2}@192.0.2.4:7790"]\n')
    code, _, err = run(capsys, "check-config", str(config))
    assert code == 2 and "overlap" in err
