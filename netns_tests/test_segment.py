# End-to-end tests of one encrypted segment on real kernels (issue 2, "Acceptance").
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788 on bridge mbr0
#            |  management veths (mgmt0 10.67.0.1x in each host)  |
#      +-----------+          +-----------+          +-----------+
#      | h1        |          | h2        |          | h3        |
#      | l2c0 TAP  |          | l2c0 TAP  |          | l2c0 TAP  |
#      | .11 ::11  |          | .12 ::12  |          | .13 ::13  |
#      |  agent    |          |  agent    |          |  agent    |
#      | eth0      |          | eth0      |          | eth0      |
#      +----|------+          +----|------+          +----|------+
#           p1-<s>                 p2-<s>                 p3-<s>
#      +----|----------------------|----------------------|------+
#      |            br0 in l2c-sw-<s> (the switch, silent)       |
#      +----|----------------------------------------------------+
#           pi-<s> -- eth0 of l2c-in-<s>: the intruder, no certificate
#
# TAP addresses are 10.66.0.1x/24 and fd66::1x/64.  Tcpdump watches what each
# host port receives from before the agents start (-Q in), for the lab's life.
# One lab serves the whole module.  A key miss, nothing plain on the switch and
# a replayed frame are scenarios of tests/scenarios.py, run here by
# netns_tests/test_scenarios_netns.py and over fakes by tests/test_scenarios.py.

from __future__ import annotations

import json
import os

import pytest

from helpers import (
    KeyServerClient,
    drop,
    drops_total,
    forged_frame,
    iperf3,
    l2c_frames,
    peer,
    ping,
    wait_for,
)
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

MARKER = b"L2CRYPT-MARKER-7f3a9c"


def _status(lab, host):
    return lab.status(host)


def _wait_status(lab, host, what, pred, timeout_s=10.0) -> dict:
    """Poll ``host``'s status until ``pred(status)`` holds; return that status."""
    def probe():
        st = _status(lab, host)
        return st if pred(st) else None
    return wait_for(what, probe, timeout_s=timeout_s)


def _real_frame(lab, src: str, dst: str) -> bytes:
    """A sealed frame src -> dst, taken off the switch during a ping."""
    cap = lab.capture("br0", name=f"tcpdump-real-{src}-{dst}-{os.urandom(2).hex()}")
    try:
        assert ping(lab, src, L.tap_ipv4(dst), count=2).returncode == 0
    finally:
        frames = L.read_pcap(cap.stop())
    mine = l2c_frames(frames, src=lab.tap_mac_of(src), dst=lab.tap_mac_of(dst))
    assert mine, f"no l2crypt frame {src} -> {dst} seen on br0"
    return mine[-1]


@pytest.mark.parametrize("src,dst", [("h1", "h2"), ("h2", "h3"), ("h1", "h3")])
def test_traffic_flows_ping_ping6_iperf3(lab, src, dst):
    for addr in (L.tap_ipv4(dst), L.tap_ipv6(dst)):  # ARP, then neighbour discovery
        res = ping(lab, src, addr, count=3)
        assert res.returncode == 0, f"{src} -> {addr}: {res.stdout}{res.stderr}"
    result = iperf3(lab, src, dst, seconds=3)
    assert result["end"]["sum_received"]["bits_per_second"] > 1e6


def test_pair_keys_stay_private(lab):
    log_before = len(lab.log_text("keyserverd"))
    client = KeyServerClient(lab.ns("h3"), lab.keyserver_addr, lab.host_dir("h3"))
    try:
        welcome = client.request({"t": "hello", "rid": 1, "mac": bytes.fromhex(lab.tap_mac_of("h3").replace(":", ""))})
        assert welcome["t"] == "welcome", welcome
        answer = client.request({"t": "key_req", "rid": 2,
                                 "peer_mac": bytes.fromhex(lab.tap_mac_of("h2").replace(":", "")),
                                 "my_mac": bytes.fromhex(lab.tap_mac_of("h1").replace(":", ""))})
    finally:
        client.close()
    assert answer["t"] == "error" and answer["code"] == "forbidden", answer
    assert "key" not in answer
    new_log = wait_for("a WARNING about h3 in the key server log",
                       lambda: [ln for ln in lab.log_text("keyserverd")[log_before:].splitlines()
                                if "warning" in ln.lower() and "h3" in ln and "forbidden" in ln],
                       timeout_s=5)
    assert new_log


def test_forged_frames_are_dropped_and_never_reach_the_tap(lab):
    before = _status(lab, "h2")
    pw_id = (peer(before, lab.tap_mac_of("h1")) or {"pw_id": 1})["pw_id"]
    random_sa = "02:" + ":".join(f"{b:02x}" for b in os.urandom(5))
    frames = [forged_frame(lab.tap_mac_of("h2"), sa, pw_id, MARKER + os.urandom(64))
              for sa in [lab.tap_mac_of("h1")] * 10 + [random_sa] * 5]
    tap = lab.capture(L.TAP_IFNAME, role="h2", name="tcpdump-forged-h2-tap")
    try:
        assert lab.inject(frames) == len(frames)
        after = _wait_status(lab, "h2", "h2 to count every forged frame",
                             lambda s: drops_total(s) - drops_total(before) >= len(frames))
    finally:
        tap_frames = L.read_pcap(tap.stop())
    assert drops_total(after) - drops_total(before) == len(frames), (before["drops"], after["drops"])
    assert drop(after, "bad_tag") - drop(before, "bad_tag") >= 10
    assert sum(f.count(MARKER) for f in tap_frames) == 0


def test_damaged_frames_are_dropped_and_the_agent_keeps_running(lab):
    frame = _real_frame(lab, "h1", "h2")
    truncated = frame[:40]
    flipped = bytearray(frame)
    flipped[20:28] = (int.from_bytes(frame[20:28], "big") + 1_000_000).to_bytes(8, "big")  # fresh PN
    flipped[-20] ^= 0x01  # and a flipped ciphertext bit
    unknown_version = bytearray(frame)
    unknown_version[14] = 0x7F
    before = _status(lab, "h2")
    lab.inject([truncated, bytes(flipped), bytes(unknown_version)])
    wanted = ("truncated", "bad_tag", "unknown_version")
    after = _wait_status(lab, "h2", "h2 to count the damaged frames",
                         lambda s: all(drop(s, r) > drop(before, r) for r in wanted))
    for reason in wanted:
        assert drop(after, reason) - drop(before, reason) == 1, reason
    assert lab.proc("agent-h2").alive()
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0


def test_key_server_crash(lab):
    # h1 and h2 hold their pair key (also when this test runs alone).
    wait_for("h1 -> h2 answered", lambda: ping(lab, "h1", L.tap_ipv4("h2"), count=1).returncode == 0, timeout_s=20)
    lab.kill_keyserver()  # SIGKILL
    try:
        res = ping(lab, "h1", L.tap_ipv4("h2"), count=5)  # a pair with a key keeps flowing
        assert res.returncode == 0 and "5 received" in res.stdout, res.stdout
    finally:
        lab.start_keyserver()
    for host in lab.hosts:  # they reconnect on their own (key client backoff <= 8 s)
        wait_for(f"{host} to reconnect", lambda h=host: _status(lab, h).get("connected"), timeout_s=30)
    # A pair without a key gets one from the restarted server: h3 restarts with an empty key table.
    lab.restart_agent("h3")
    before = _status(lab, "h3")
    assert ping(lab, "h3", L.tap_ipv4("h1"), count=3).returncode == 0
    after = _status(lab, "h3")
    assert after["counters"]["key_answers"] > before["counters"]["key_answers"]
    assert peer(after, lab.tap_mac_of("h1"))
    # No binding is lost.
    listing = lab.keyserverd("host", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    hosts = {h["id"]: h for h in json.loads(listing.stdout)}
    for host in lab.hosts:
        assert host in hosts, listing.stdout
        assert hosts[host]["mac"].lower() == lab.tap_mac_of(host), hosts[host]


def _one_clear_line(res) -> str:
    text = (res.stderr or res.stdout).strip()
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    assert len(text.splitlines()) == 1, text
    return text.lower()


def test_bad_enrollment(lab, tmp_path):
    good = lab.host_add("h9")
    first = lab.enroll("h3", good["token"], good["ca_fingerprint"], host_id="h9", state_dir=tmp_path / "a")
    assert first.returncode == 0, first.stdout + first.stderr
    used = lab.enroll("h3", good["token"], good["ca_fingerprint"], host_id="h9", state_dir=tmp_path / "b")
    assert "token" in _one_clear_line(used)

    other = lab.host_add("h8")
    wrong = "x" * len(other["token"]) if other["token"][0] != "x" else "y" * len(other["token"])
    bad = lab.enroll("h3", wrong, other["ca_fingerprint"], host_id="h8", state_dir=tmp_path / "c")
    assert "token" in _one_clear_line(bad)

    fp = other["ca_fingerprint"]
    wrong_fp = "".join("0" if c.isalnum() and c != "0" else ("1" if c == "0" else c) for c in fp)
    res = lab.enroll("h3", other["token"], wrong_fp, host_id="h8", state_dir=tmp_path / "d")
    assert "fingerprint" in _one_clear_line(res)
