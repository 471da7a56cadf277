# The agent's two datapaths on real kernels (issue 13, steps 1, 3, 4, 7).
#
#            l2c-ks-<s>: keyserverd on mbr0 (management veths)
#      +------------------+                +------------------+
#      | h1  l2c0 TAP .11 |                | h2  l2c0 TAP .12 |
#      |     agent        |                |     agent        |
#      | eth0 (MTU 1500)  |                | eth0 (MTU 1500)  |
#      +-------|----------+                +-------|----------+
#              p1-<s> ---- br0 in l2c-sw-<s> ---- p2-<s>   (tcpdump on br0)
#
# One lab for the module, the agents started with --datapath batched; the
# tests run in file order: both batched, then h2 restarted simple (mixed),
# then h1 restarted simple too (both simple), then both batched with
# --datapath-process (step 5: the frame path in a process of its own),
# and h1's datapath process killed.

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from helpers import l2c_frames, listening, ping, wait_for

from l2crypt.lab import segment as L

MARKER = b"datapath-marker!"  # 16 bytes: what ping -p repeats, and the TCP stream's content
WIRE_FRAME_MAX = 1500 + 14
STREAM_BYTES = 2_000_000
PORT = 5301

SINK = ("import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)\n"
        "c, _ = s.accept(); c.settimeout(30); got = bytearray()\n"
        "while True:\n"
        "    d = c.recv(1 << 20)\n"
        "    if not d: break\n"
        "    got += d\n"
        "print(len(got), got == sys.argv[3].encode() * (len(got) // len(sys.argv[3])))\n")
SOURCE = ("import socket, sys\n"
          "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n"
          "c.sendall(sys.argv[3].encode() * int(sys.argv[4])); c.close()\n")


@pytest.fixture(scope="module")
def dlab(tmp_path_factory):
    from helpers import skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    lab = L.Lab(state_dir=tmp_path_factory.mktemp("dlab"), hosts=("h1", "h2"),
                agent_args=("--datapath", "batched"))
    try:
        lab.up(timeout_s=90)
        yield lab
    finally:
        lab.down()


def stream(lab: L.Lab, src: str, dst: str) -> None:
    """STREAM_BYTES of MARKER over one TCP connection src -> dst, checked byte for byte."""
    sink = lab.popen(dst, [sys.executable, "-c", SINK, L.tap_ipv4(dst), str(PORT), MARKER.decode()],
                     name=f"sink-{dst}-{len(lab.procs)}")
    try:
        wait_for("the TCP sink", lambda: listening(sink.pid, PORT), timeout_s=10)
        res = lab.exec(src, [sys.executable, "-c", SOURCE, L.tap_ipv4(dst), str(PORT), MARKER.decode(),
                             str(STREAM_BYTES // len(MARKER))], timeout=40)
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for("the sink to finish", lambda: not sink.alive(), timeout_s=30)
        assert lab.log_text(sink.name).split()[-2:] == [str(STREAM_BYTES), "True"], lab.log_text(sink.name)
    finally:
        lab.stop(sink)


def iperf3(lab: L.Lab, src: str, dst: str, udp: bool) -> dict:
    srv = lab.popen(dst, ["iperf3", "-s", "-1", "-B", L.tap_ipv4(dst), "-p", str(PORT + 1)],
                    name=f"iperf3-{dst}-{len(lab.procs)}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, PORT + 1), timeout_s=10)
        extra = ["-u", "-b", "50M", "-l", "1400"] if udp else []
        res = lab.exec(src, ["iperf3", "-c", L.tap_ipv4(dst), "-p", str(PORT + 1), "-t", "2", "-J", *extra],
                       timeout=40)
        assert res.returncode == 0, res.stdout[-1500:] + res.stderr
        return json.loads(res.stdout)["end"]
    finally:
        lab.stop(srv)


def csum_errors(lab: L.Lab, host: str) -> tuple[int, int]:
    """(TcpInCsumErrors, TcpInSegs) of the host's namespace, absolute."""
    out = lab.exec(host, ["nstat", "-saz", "TcpInCsumErrors", "TcpInSegs"], check=True).stdout
    values = dict(re.findall(r"^(\w+)\s+(\d+)", out, flags=re.M))
    return int(values["TcpInCsumErrors"]), int(values["TcpInSegs"])


def check_path(lab: L.Lab, datapath: str) -> None:
    """Ping, iperf3 TCP and UDP, and a marker stream h1 -> h2; on the switch
    only sealed frames within the wire MTU, without the marker."""
    for host in lab.hosts:
        assert lab.status(host)["datapath"] == datapath
    switch = lab.capture("br0", name=f"tcpdump-br0-{datapath}")
    try:
        res = ping(lab, "h1", L.tap_ipv4("h2"), count=3, extra=["-s", "1200", "-p", MARKER.hex()])
        assert res.returncode == 0, res.stdout + res.stderr
        stream(lab, "h1", "h2")
        assert iperf3(lab, "h1", "h2", udp=False)["sum_received"]["bits_per_second"] > 5e6
        udp = iperf3(lab, "h1", "h2", udp=True)["sum"]
        assert udp["packets"] > 1000 and udp["lost_percent"] < 50
    finally:
        switch.stop()
    frames = switch.frames()
    sealed = l2c_frames(frames)
    assert len(sealed) > STREAM_BYTES // 1500, len(sealed)  # the stream crossed the switch, sealed
    assert len(sealed) == len(frames), {hex(int.from_bytes(f[12:14], "big")) for f in frames}
    assert max(len(f) for f in frames) <= WIRE_FRAME_MAX
    assert max(len(f) for f in frames) > 1400  # full-size segments, not only small frames
    assert not any(MARKER in f for f in frames)


def test_batched_path(dlab):
    check_path(dlab, "batched")
    h1, h2 = dlab.status("h1"), dlab.status("h2")
    assert h1["datapath_reason"] == ""
    # The host stack handed h1 super-frames and h2 wrote super-frames to its TAP.
    sent, got = h1["datapath_counters"], h2["datapath_counters"]
    assert sent["super_frames_read"] > 0 and sent["segments_cut"] > sent["super_frames_read"], sent
    assert got["super_frames_written"] > 0 and got["segments_joined"] > got["super_frames_written"], got
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9478/metrics', timeout=5).read().decode())"
    metrics = dlab.exec("h1", [sys.executable, "-c", fetch], timeout=20).stdout
    assert 'l2crypt_agent_datapath_info{datapath="batched",reason=""} 1.0' in metrics, metrics[:500]


def test_mixed_simple_and_batched_with_correct_checksums(dlab):
    dlab.restart_agent("h2", extra_args=("--datapath", "simple"))
    assert dlab.status("h2")["datapath"] == "simple" and dlab.status("h1")["datapath"] == "batched"
    before = {h: csum_errors(dlab, h) for h in dlab.hosts}
    stream(dlab, "h1", "h2")  # batched -> simple: h2's agent completes the checksums
    stream(dlab, "h2", "h1")  # simple -> batched: h1's agent joins the segments
    for src, dst in (("h1", "h2"), ("h2", "h1")):
        assert iperf3(dlab, src, dst, udp=False)["sum_received"]["bits_per_second"] > 5e6
    after = {h: csum_errors(dlab, h) for h in dlab.hosts}
    for host in dlab.hosts:
        assert after[host][1] - before[host][1] > 1000  # the host received TCP segments
        assert after[host][0] == before[host][0], (host, before[host], after[host])
    assert dlab.status("h1")["datapath_counters"]["super_frames_written"] > 0


def test_simple_path(dlab):
    for host in dlab.hosts:  # h2 is simple already after the mixed test, not when this test runs alone
        if dlab.status(host)["datapath"] != "simple":
            dlab.restart_agent(host, extra_args=("--datapath", "simple"))
    check_path(dlab, "simple")
    status = dlab.status("h1")
    assert status["datapath_reason"] == "configured" and status["datapath_counters"] == {}


def datapath_pid(lab: L.Lab, host: str) -> int:
    text = lab.status(host)["datapath_process"]
    assert text.startswith("pid "), text
    return int(text.split()[1])


def test_datapath_process(dlab):
    for host in dlab.hosts:  # both restarted at once, as systemd would
        dlab.stop(dlab.proc(f"agent-{host}"))
        dlab.start_agent(host, ("--datapath", "batched", "--datapath-process"))
    for host in dlab.hosts:
        dlab.wait_connected(host)
    pids = {host: datapath_pid(dlab, host) for host in dlab.hosts}
    assert all(pid != dlab.proc(f"agent-{host}").pid for host, pid in pids.items())
    check_path(dlab, "batched")
    assert dlab.status("h2")["datapath_counters"]["super_frames_written"] > 0  # counters come from the datapath
    # A rekey (pair and multicast) during traffic loses nothing.
    before = dlab.status("h1")["peers"][0]["pw_id"]
    pinger = dlab.popen("h1", ["ping", "-4", "-n", "-i", "0.05", "-c", "40", "-W", "2", L.tap_ipv4("h2")],
                        name="ping-dp-rekey")
    time.sleep(0.5)
    res = dlab.keyserverd("rekey", "--pair", "h1", "h2", "--multicast")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for("the ping across the rekey", lambda: not pinger.alive(), timeout_s=15)
    dlab.stop(pinger)
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", dlab.log_text("ping-dp-rekey"))
    assert summary and summary.group(1) == summary.group(2) == "40", dlab.log_text("ping-dp-rekey")[-800:]
    wait_for("h1 to use the new pair key", lambda: dlab.status("h1")["peers"][0]["pw_id"] > before, timeout_s=10)
    for host in dlab.hosts:
        drops = dlab.status(host)["drops"]
        assert not {k: v for k, v in drops.items() if k in ("no_key", "bad_tag", "replayed")}, (host, drops)
    # h1's datapath process killed: the agent stops with one line, nothing passes, the port guard stays.
    agent = dlab.proc("agent-h1")
    os.kill(pids["h1"], signal.SIGKILL)
    wait_for("h1's agent to stop", lambda: not agent.alive(), timeout_s=5)
    log = dlab.log_text("agent-h1")
    assert f"error: the datapath process (pid {pids['h1']}) was killed by SIGKILL" in log, log[-1500:]
    switch = dlab.capture("br0", name="tcpdump-br0-dp-killed")
    try:
        res = ping(dlab, "h1", L.tap_ipv4("h2"), count=2, extra=["-s", "1200", "-p", MARKER.hex()])
        assert res.returncode != 0
        res = ping(dlab, "h2", L.tap_ipv4("h1"), count=2, extra=["-p", MARKER.hex()])
        assert res.returncode != 0
    finally:
        switch.stop()
    frames = switch.frames()
    assert len(l2c_frames(frames)) > 0  # h2's pings (sealed) reached the switch
    assert not any(MARKER in f for f in frames)
    guard = "from l2crypt.io.port_guard import PortGuard; print(PortGuard('eth0', 0x88b5, egress=True).read())"
    assert "'port_guard': 'intact'" in dlab.exec("h1", [sys.executable, "-c", guard], timeout=20).stdout
    dlab.restart_agent("h1", extra_args=("--datapath", "batched", "--datapath-process"))
    assert ping(dlab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0
