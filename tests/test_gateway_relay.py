"""The tunnel relay (``gateway.relay``, ``l2crypt-gateway relay``): its arguments,
its decisions (no I/O) and a real relay process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.relay import RelayTable, parse_endpoint

A, B = ("10.73.1.1", 4789), ("10.73.2.1", 4789)
C, D = ("192.0.2.1", 1000), ("192.0.2.2", 1000)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, want", [
    ("10.73.1.1:4789", ("10.73.1.1", 4789)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_an_endpoint_is_an_ipv4_address_and_a_port(text, want):
    assert parse_endpoint(text) == want


@pytest.mark.parametrize("text, why", [
    ("10.73.1.1", "not HOST:PORT"),
    (":4789", "not HOST:PORT"),
    ("10.73.1:4789", "not an IPv4 address"),
    ("gw.example:4789", "not an IPv4 address"),
    ("10.73.1.1:0", "from 1 to 65535"),
    ("10.73.1.1:65536", "from 1 to 65535"),
    ("10.73.1.1:-1", "from 1 to 65535"),
    ("10.73.1.1:http", "from 1 to 65535"),
])
def test_a_bad_endpoint_is_one_clear_line(text, why):
    with pytest.raises(ValueError, match=why):
        parse_endpoint(text)


def test_a_datagram_from_one_endpoint_goes_to_the_other():
    table = RelayTable([(A, B), (C, D)])
    assert table.decide(A, 100) == B
    assert table.decide(B, 100) == A
    assert table.decide(C, 1) == D
    assert table.decide(D, table.max_datagram_bytes) == C


@pytest.mark.parametrize("source, length, reason", [
    (("10.73.1.1", 4790), 100, "unknown_sender"),  # right IP, wrong port
    (("10.73.1.2", 4789), 100, "unknown_sender"),  # right port, wrong IP
    (A, 0, "empty"),
    (A, 16385, "oversized"),
    (("198.51.100.9", 9), 0, "empty"),
])
def test_anything_else_is_dropped_with_its_reason(source, length, reason):
    assert RelayTable([(A, B)]).decide(source, length) == reason


def test_the_counters_per_direction_and_per_reason():
    table = RelayTable([(A, B)], max_datagram_bytes=1000)
    for source, length in ((A, 10), (A, 20), (B, 5), (C, 5), (A, 0), (B, 1001)):
        table.count(source, length, table.decide(source, length))
    table.count(A, 7, "send_error")
    assert table.counters.as_dict() == {
        "forwarded": {"10.73.1.1:4789->10.73.2.1:4789": {"datagrams": 2, "bytes": 30},
                      "10.73.2.1:4789->10.73.1.1:4789": {"datagrams": 1, "bytes": 5}},
        "drops": {"empty": 1, "oversized": 1, "unknown_sender": 1, "send_error": 1}}


@pytest.mark.parametrize("joins, why", [
    ([], "at least one --join"),
    ([(A, A)], "the same"),
    ([(A, B), (B, C)], "more than one join"),
])
def test_joins_that_cannot_be_are_refused(joins, why):
    with pytest.raises(ValueError, match=why):
        RelayTable(joins)


@pytest.mark.parametrize("args, why", [
    (["--listen", "10.73.3.1", "--join", "10.73.1.1:4789", "10.73.2.1:4789"], "not HOST:PORT"),
    (["--listen", "10.73.3.1:4789", "--join", "10.73.1.1:4789", "10.73.2:4789"], "not an IPv4 address"),
    (["--listen", "10.73.3.1:4789", "--join", "10.73.1.1:4789"], "requires 2 arguments"),
    (["--listen", "10.73.3.1:4789"], "Missing option '--join'"),
    (["--listen", "10.73.3.1:4789", "--join", "10.73.1.1:4789", "10.73.1.1:4789"], "the same"),
    (["--listen", "10.73.3.1:4789", "--join", "10.73.1.1:4789", "10.73.2.1:4789", "--stats-interval-s", "0"],
     "stats-interval-s"),
])
def test_the_command_refuses_bad_arguments_in_one_line(args, why):
    res = CliRunner().invoke(cli, ["relay", *args])
    assert res.exit_code == 2
    assert why in res.output
    assert "Traceback" not in res.output


def _relay(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", "from gateway.cli import main; main()", "relay", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def test_the_command_says_when_it_cannot_bind():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _relay(["--listen", f"127.0.0.1:{port}", "--join", "127.0.0.1:1", "127.0.0.1:2"])
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"l2crypt-gateway: error: cannot bind 127.0.0.1:{port}: Address already in use"]


def _udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(5)
    return s


def test_a_relay_on_loopback_forwards_drops_counts_and_reports_at_sigterm(tmp_path):
    a, b, stranger = _udp(), _udp(), _udp()
    probe = _udp()
    port = probe.getsockname()[1]
    probe.close()  # a free port for the relay
    ea, eb = a.getsockname(), b.getsockname()
    stats = tmp_path / "stats.json"
    proc = _relay(["--listen", f"127.0.0.1:{port}", "--join", f"{ea[0]}:{ea[1]}", f"{eb[0]}:{eb[1]}",
                   "--stats-interval-s", "0.2", "--stats-file", str(stats), "--max-datagram-bytes", "2000"])
    try:
        deadline = time.monotonic() + 15
        while not stats.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no stats"
            time.sleep(0.05)
        relay = ("127.0.0.1", port)
        a.sendto(b"sealed-1", relay)
        assert b.recvfrom(100) == (b"sealed-1", relay)
        b.sendto(b"sealed-22", relay)
        assert a.recvfrom(100) == (b"sealed-22", relay)
        stranger.sendto(b"x", relay)
        a.sendto(b"", relay)
        a.sendto(b"y" * 2001, relay)
        a.sendto(b"last", relay)  # after the drops: once it arrives, they were all read
        assert b.recvfrom(100) == (b"last", relay)
        b.settimeout(0.3)
        with pytest.raises(socket.timeout):
            b.recvfrom(100)  # none of the dropped ones came through
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    last = json.loads(err.strip().splitlines()[-1])
    assert last["event"] == "relay_stopped"
    assert last["forwarded"] == {f"127.0.0.1:{ea[1]}->127.0.0.1:{eb[1]}": {"datagrams": 2, "bytes": 12},
                                 f"127.0.0.1:{eb[1]}->127.0.0.1:{ea[1]}": {"datagrams": 1, "bytes": 9}}
    assert last["drops"] == {"empty": 1, "oversized": 1, "unknown_sender": 1, "send_error": 0}
    assert json.loads(stats.read_text()) == last
    for s in (a, b, stranger):
        s.close()
