"""The enrollment token stays out of ``ps`` and shell history (issue 15, low items):
``--token-file FILE`` and ``--token -`` (stdin) for ``l2crypt enroll`` and
``l2crypt-gateway enroll``; ``--token VALUE`` still works, with a warning.

    keyserverd (a real process on 127.0.0.1) <-- l2crypt enroll / l2crypt-gateway enroll (real processes)
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2crypt.agent.enroll import TOKEN_ON_COMMAND_LINE, read_token
from l2crypt.core.errors import LocalError

REPO = Path(__file__).resolve().parent.parent
CLI = {"l2crypt": "from l2crypt.agent.cli import main; main()",
       "l2crypt-gateway": "from gateway.cli import main; main()"}


@pytest.fixture
def keyserver(tmp_path):
    """A running keyserverd on a free loopback port: (address, host_add(id, role) -> token dict)."""
    state = tmp_path / "ks"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from keyserverd.cli import main; main()", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--log-level", "warning", "--metrics-listen", ""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        address = re.search(r"listening on (\S+)", line).group(1)

        def host_add(host_id, role="host"):
            out = subprocess.run([sys.executable, "-c", "from keyserverd.cli import main; main()",
                                  "--state-dir", str(state), "host", "add", host_id, "--role", role, "--json"],
                                 capture_output=True, text=True, cwd=REPO, timeout=30)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        yield address, host_add
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def enroll(prog, address, token_dict, host_id, state_dir, token_args, stdin=None):
    argv = [sys.executable, "-c", CLI[prog], "enroll", "--server", address, "--id", host_id,
            "--ca-fingerprint", token_dict["ca_fingerprint"], "--state-dir", str(state_dir), *token_args]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    cmdline = ""  # what `ps` shows while it runs (read until the new program's arguments are there)
    for _ in range(500):
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "enroll" in cmdline or child.poll() is not None:
            break
        time.sleep(0.001)
    out, err = child.communicate(stdin, timeout=60)
    assert "enroll" in cmdline, cmdline
    return child.returncode, out, err, cmdline


@pytest.mark.parametrize("prog, role", [("l2crypt", "host"), ("l2crypt-gateway", "gateway")])
def test_enroll_with_a_token_file_or_stdin_keeps_the_token_out_of_ps(keyserver, tmp_path, prog, role):
    address, host_add = keyserver
    by_file = host_add(f"{role}-file", role)
    token_file = tmp_path / "token"
    token_file.write_text(by_file["token"] + "\n")
    token_file.chmod(0o600)
    code, out, err, cmdline = enroll(prog, address, by_file, f"{role}-file", tmp_path / "f",
                                     ["--token-file", str(token_file)])
    assert code == 0 and err == "" and f"enrolled as {role}-file" in out, err
    assert by_file["token"] not in cmdline and "--token-file" in cmdline
    assert (tmp_path / "f" / "host.crt").exists()

    by_stdin = host_add(f"{role}-stdin", role)
    code, out, err, cmdline = enroll(prog, address, by_stdin, f"{role}-stdin", tmp_path / "s", ["--token", "-"],
                                     stdin=by_stdin["token"] + "\n")
    assert code == 0 and err == "" and f"enrolled as {role}-stdin" in out, err
    assert by_stdin["token"] not in cmdline
    assert (tmp_path / "s" / "host.crt").exists()


def test_a_token_on_the_command_line_still_works_with_a_warning(keyserver, tmp_path):
    address, host_add = keyserver
    token = host_add("argv")
    code, out, err, cmdline = enroll("l2crypt", address, token, "argv", tmp_path / "a", ["--token", token["token"]])
    assert code == 0 and "enrolled as argv" in out
    assert err == f"l2crypt: warning: {TOKEN_ON_COMMAND_LINE}\n"
    assert token["token"] in cmdline  # what the warning is about


def test_bad_token_arguments_are_one_line(tmp_path):
    cases = [([], "give the token once"),
             (["--token", "x", "--token-file", str(tmp_path / "t")], "give the token once"),
             (["--token-file", str(tmp_path / "missing")], "No such file"),
             (["--token", "-"], "empty")]
    for args, text in cases:
        res = subprocess.run([sys.executable, "-c", CLI["l2crypt"], "enroll", "--server", "127.0.0.1:9",
                              "--id", "x", "--ca-fingerprint", "sha256:" + "0" * 64, "--state-dir",
                              str(tmp_path / "sd"), *args], input="", capture_output=True, text=True,
                             cwd=REPO, timeout=30)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("l2crypt: error: ") and text in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_read_token_warns_about_a_readable_file(tmp_path):
    path = tmp_path / "t"
    path.write_text("abcdef.0123456789abcdef\n")
    path.chmod(0o644)
    warnings = []
    assert read_token(None, str(path), warnings.append) == "abcdef.0123456789abcdef"
    assert warnings == [f"{path} can be read by other users; chmod 600 it"]
    with pytest.raises(LocalError):
        read_token(None, None)
