# Faults on one encrypted segment, on real kernels (issue 8).
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788 (and, for the full-disk
#            test, a second keyserverd on :7789 with its state on a 4 MB tmpfs)
#      +-----------+          +-----------+          +-----------+
#      | h1        |          | h2        |          | h3        |
#      | l2c0 TAP  |          | l2c0 TAP  |          | l2c0 TAP  |
#      | eth0      |          | eth0      |          | eth0      |
#      +----|------+          +----|------+          +----|------+
#      +----|----------------------|----------------------|------+
#      |            br0 in l2c-sw-<s> (the switch)                |
#      +-----------------------------------------------------------+
#
# kill -9 of the key server during a burst of writes, a full disk under its
# state, an agent restart, a link flap on a wire port and a bridge restart.
# Each test checks that nothing acknowledged is lost, nothing leaks in clear,
# and traffic recovers within a bounded time.

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time

import pytest

from helpers import KeyServerClient, listening, mac_bytes, ping, stored_keys, wait_for
from hostile import MARKER, marker_count
from l2crypt.lab import segment as L
from pyroute2 import IPRoute

pytestmark = pytest.mark.lab

RECOVER_S = 30.0


def _pings_until_ok(lab, src, dst_host, timeout_s=RECOVER_S):
    return wait_for(f"{src} -> {dst_host} to answer again",
                    lambda: ping(lab, src, L.tap_ipv4(dst_host), count=1).returncode == 0,
                    timeout_s=timeout_s, every_s=0.5)


def _db(lab):
    return lab.ks_dir / "keyserver.db"


def _integrity(path) -> str:
    db = sqlite3.connect(path, timeout=10)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def _background_ping(lab, src, dst_host, seconds):
    """A marker-carrying ping running for ``seconds`` (as a lab process)."""
    count = int(seconds / 0.05)
    return lab.popen(src, ["ping", "-4", "-i", "0.05", "-c", str(count), "-W", "1",
                           "-p", MARKER[:16].hex(), L.tap_ipv4(dst_host)],
                     name=f"bgping-{src}-{os.urandom(2).hex()}")


# --- key server: kill -9 during writes, full disk ---------------------------------------


def test_kill_9_during_a_burst_of_writes_loses_nothing_acknowledged(lab, tmp_path):
    """Two streams of writes go through the key server while it is killed (-9):
    h1's rotations of its pair key with h2 (every ``key`` answer is a write),
    and new hosts enrolling (the server marks the token used and the host
    enrolled) then binding a MAC with their first hello (``welcome``).  Only
    the operator's ``host add`` before each enrollment runs as a CLI process.
    Every write the server acknowledged is in the store after the restart."""
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=1).returncode == 0  # the pair h1-h2 has a key
    acked_keys: list[tuple[int, bytes]] = []
    acked_enrolled: list[str] = []
    acked_binds: dict[str, bytes] = {}
    stop = threading.Event()

    def rekeys():
        # h1 asks for a new version of its pair key again and again (rekey_req):
        # every "key" answer is an acknowledged write.
        try:
            c = KeyServerClient(lab.ns("h1"), lab.keyserver_addr, lab.host_dir("h1"), timeout_s=3)
            c.request({"t": "hello", "rid": 1, "mac": mac_bytes(lab.tap_mac_of("h1"))}, timeout_s=3)
            rid, pw_id = 2, c.request({"t": "key_req", "rid": 2, "peer_mac": mac_bytes(lab.tap_mac_of("h2"))})["pw_id"]
            while not stop.is_set():
                rid += 1
                out = c.request({"t": "rekey_req", "rid": rid, "peer_mac": mac_bytes(lab.tap_mac_of("h2")),
                                 "pw_id": pw_id}, timeout_s=3)
                if out["t"] == "key":
                    acked_keys.append((out["pw_id"], out["key"]))
                    pw_id = out["pw_id"]
                elif out.get("code") == "rate_limited":
                    time.sleep(0.05)
        except (OSError, AssertionError, KeyError):
            pass  # the server died under us

    def enrollments():
        # New hosts enroll through the server and bind a MAC with their first hello.
        for i in range(1, 100):
            if stop.is_set():
                return
            host_id, mac = f"burst{i}", bytes.fromhex(f"024255{i:06x}")
            token = lab.keyserverd("host", "add", host_id, "--json")
            if token.returncode != 0:
                return  # the server is gone (the CLI may need it)
            token = json.loads(token.stdout)
            res = lab.enroll("h3", token["token"], token["ca_fingerprint"], host_id=host_id,
                             state_dir=tmp_path / host_id, timeout=10)
            if res.returncode != 0:
                return
            acked_enrolled.append(host_id)
            try:
                c = KeyServerClient(lab.ns("h3"), lab.keyserver_addr, tmp_path / host_id, timeout_s=3)
                try:
                    if c.request({"t": "hello", "rid": 1, "mac": mac}, timeout_s=3)["t"] == "welcome":
                        acked_binds[host_id] = mac
                finally:
                    c.close()
            except (OSError, AssertionError):
                return

    def enrollments_until_the_kill():
        try:
            enrollments()
        except L.LabError:
            pass  # a command outlived its timeout once the server was gone

    threads = [threading.Thread(target=rekeys), threading.Thread(target=enrollments_until_the_kill)]
    for t in threads:
        t.start()
    try:
        wait_for("some acknowledged writes", lambda: len(acked_keys) >= 20 and len(acked_binds) >= 2,
                 timeout_s=30)
        lab.kill_keyserver()  # SIGKILL in the middle of the burst
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if lab.proc("keyserverd") is None:
            lab.start_keyserver()
    assert _integrity(_db(lab)) == "ok"
    stored = {k[3]: key for k, key in stored_keys(lab.ks_dir).items() if k[:3] == ("pair", "h1", "h2")}
    db = sqlite3.connect(_db(lab), timeout=10)
    try:
        hosts = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, mac, enrolled_at FROM hosts").fetchall()}
    finally:
        db.close()
    print(f"acknowledged before the kill: {len(acked_keys)} pair-key versions, {len(acked_enrolled)} "
          f"enrollments, {len(acked_binds)} MAC bindings")
    for pw_id, key in acked_keys:
        assert bytes(stored.get(pw_id, b"")) == key, f"acknowledged pw_id {pw_id} lost"
    for host_id in acked_enrolled:
        assert hosts.get(host_id, (None, None))[1] is not None, f"the enrollment of {host_id} was lost"
    for host_id, mac in acked_binds.items():
        assert bytes(hosts[host_id][0] or b"") == mac, f"the MAC binding of {host_id} was lost"
    for host in lab.hosts:
        wait_for(f"{host} to reconnect", lambda h=host: lab.status(h).get("connected"), timeout_s=RECOVER_S)
    _pings_until_ok(lab, "h1", "h2")


def test_full_disk_under_the_key_server_state(lab, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)], check=True)
    proc = None
    try:
        state = mnt / "ks"
        addr = f"{L.KS_IP}:7789"
        first = subprocess.run([lab.cmd("keyserverd"), "--state-dir", state, "host", "add", "fd1", "--json"],
                               capture_output=True, text=True, timeout=30)
        assert first.returncode == 0, first.stderr
        token = json.loads(first.stdout)
        proc = lab.popen("ks", [lab.cmd("keyserverd"), "--state-dir", state, "--listen", addr,
                                "--metrics-listen", ""], name="keyserverd-full")
        wait_for("the second key server", lambda: listening(proc.pid, 7789), timeout_s=20)
        enroll = lab.exec("h3", [lab.cmd("l2crypt"), "enroll", "--server", addr, "--id", "fd1",
                                 "--token", "-", "--ca-fingerprint", token["ca_fingerprint"],
                                 "--state-dir", tmp_path / "fd1"], timeout=30, input=token["token"].encode())
        assert enroll.returncode == 0, enroll.stdout + enroll.stderr
        # Fill the file system.
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:  # unbuffered: close() has nothing left to flush
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        failed = None
        for i in range(100):  # the WAL absorbs a few writes; then they fail
            res = subprocess.run([lab.cmd("keyserverd"), "--state-dir", state, "host", "add", f"full{i}"],
                                 capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                failed = res
                break
        assert failed is not None, "no write failed on a full disk"
        line = failed.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert "full" in line, line
        print(f"operator sees: {line}")
        # An agent-side client: its first hello (a new binding) gets a typed answer, never 'internal'.
        client = KeyServerClient(lab.ns("h3"), addr, tmp_path / "fd1")
        try:
            hello = client.request({"t": "hello", "rid": 1, "mac": bytes.fromhex("02fd00000001")})
        finally:
            client.close()
        print(f"client sees: {hello}")
        assert hello["t"] == "welcome" or hello["code"] == "store_unavailable", hello
        assert proc.alive()
        assert _integrity(state / "keyserver.db") == "ok"
        # Room again: everything works.
        filler.unlink()
        res = subprocess.run([lab.cmd("keyserverd"), "--state-dir", state, "host", "add", "after-full"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        client = KeyServerClient(lab.ns("h3"), addr, tmp_path / "fd1")
        try:
            hello = client.request({"t": "hello", "rid": 1, "mac": bytes.fromhex("02fd00000001")})
        finally:
            client.close()
        assert hello["t"] == "welcome", hello
        assert _integrity(state / "keyserver.db") == "ok"
    finally:
        if proc is not None:
            lab.stop(proc)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- agent, link and bridge ------------------------------------------------------------------


def _switch_capture(lab, name):
    return lab.capture("br0", name=f"tcpdump-{name}-{os.urandom(2).hex()}")


def test_agent_restart_during_traffic(lab):
    cap = _switch_capture(lab, "agent-restart")
    bg = _background_ping(lab, "h1", "h2", seconds=8)
    try:
        time.sleep(1.5)
        lab.restart_agent("h2")
        _pings_until_ok(lab, "h1", "h2")
    finally:
        lab.stop(bg)
        frames = L.read_pcap(cap.stop())
    assert marker_count(frames) == 0
    others = {hex(e): n for e, n in L.ethertype_counts(frames).items() if e != L.L2C_ETHERTYPE}
    assert not others, others
    res = ping(lab, "h2", L.tap_ipv4("h1"), count=3)
    assert res.returncode == 0 and "3 received" in res.stdout, res.stdout


def test_link_flap_on_the_wire_port(lab):
    guard_before = lab.status("h1")["egress_blocked"]
    assert guard_before is not None
    cap = _switch_capture(lab, "flap")
    bg = _background_ping(lab, "h1", "h2", seconds=8)
    try:
        time.sleep(1.0)
        lab.exec("h1", ["ip", "link", "set", L.WIRE_IFNAME, "down"], check=True)
        time.sleep(2.0)
        lab.exec("h1", ["ip", "link", "set", L.WIRE_IFNAME, "up"], check=True)
        _pings_until_ok(lab, "h1", "h2")
    finally:
        lab.stop(bg)
        frames = L.read_pcap(cap.stop())
    assert lab.proc("agent-h1").alive()
    assert lab.status("h1")["egress_blocked"] is not None  # the port guard is still there
    assert marker_count(frames) == 0
    h1_frames = [f for f in frames if f[6:12] in (mac_bytes(lab.tap_mac_of("h1")), mac_bytes(L.wire_mac("h1")))]
    assert all(int.from_bytes(f[12:14], "big") == L.L2C_ETHERTYPE for f in h1_frames)
    res = ping(lab, "h1", L.tap_ipv4("h2"), count=3)
    assert res.returncode == 0 and "3 received" in res.stdout, res.stdout


def _recreate_bridge(lab):
    ports = [lab.port_name(h) for h in lab.hosts] + ([lab.port_name("in")] if "in" in lab.namespaces else [])
    with IPRoute(netns=lab.ns("sw"), flags=0) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=L.BRIDGE)[0])
    time.sleep(1.0)
    with IPRoute(netns=lab.ns("sw"), flags=0) as ipr:
        ipr.link("add", ifname=L.BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
        br = ipr.link_lookup(ifname=L.BRIDGE)[0]
        for port in ports:
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
        ipr.link("set", index=br, state="up")


def test_bridge_restart(lab):
    cap = lab.capture(lab.port_name("h1"), direction="in", name=f"tcpdump-brrestart-{os.urandom(2).hex()}")
    bg = _background_ping(lab, "h1", "h2", seconds=8)
    try:
        time.sleep(1.0)
        with IPRoute(netns=lab.ns("sw"), flags=0) as ipr:  # down and up ...
            br = ipr.link_lookup(ifname=L.BRIDGE)[0]
            ipr.link("set", index=br, state="down")
            time.sleep(1.0)
            ipr.link("set", index=br, state="up")
        _pings_until_ok(lab, "h1", "h2")
        _recreate_bridge(lab)  # ... and deleted and made again
        _pings_until_ok(lab, "h1", "h3")
        _pings_until_ok(lab, "h2", "h3")
    finally:
        lab.stop(bg)
        frames = L.read_pcap(cap.stop())
    assert marker_count(frames) == 0
    others = {hex(e): n for e, n in L.ethertype_counts(frames).items() if e != L.L2C_ETHERTYPE}
    assert not others, others
