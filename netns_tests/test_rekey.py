# Lab tests of key versions (PW_ID): rekeying, the two races, data-volume
# rekeys, nonce uniqueness and revocation (issue 3, "Acceptance").
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
#      +---------------------------------------------------------+
#
# TAP addresses are 10.66.0.1x/24 and fd66::1x/64.  The module has its own lab
# (no lifetime capture: the iperf3 runs would fill the disk).  Rotations are
# made with the operator command (`keyserverd rekey`, `keyserverd host revoke`)
# while the key server runs; it pushes the new versions over the hosts' TLS
# connections.  A push is held back from h2 by taking h2's management link
# down until its agent notices (connected=false), so the push reaches the
# other end only.  The revocation test runs last: h3 is gone after it.
#
# Rekeys during frame traffic (nothing lost) are a scenario of tests/scenarios.py,
# run here by netns_tests/test_scenarios_netns.py and over fakes by tests/; the
# first test here does the same under real kernel traffic (iperf3 TCP, ping)
# and prints the goodput with and without rotations (pytest -s; also written to
# rekey_goodput.json in the test's tmp dir and the lab state dir).

from __future__ import annotations

import base64
import json
import re
import time

import pytest

from helpers import drop, iperf3, listening, mac_bytes, peer, ping, skip_reason, stored_keys, wait_for
from l2crypt.core.constants import KEY_ID_MULTICAST, KEY_ID_PAIR
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

#: Drop reasons that mean a key was missing, old, wrong or reused.
KEY_DROPS = ("no_key", "stale_key", "unknown_sender", "hold_overflow", "hold_expired",
             "bad_tag", "replayed")
SWITCH_AFTER_S = 2.0  # the agents' default switch_after_s
TEST_ETHERTYPE = 0x88B6  # local experimental 2: the hosts' stacks ignore it, nothing answers


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = L.Lab(state_dir=tmp_path_factory.mktemp("rekeylab"))
    try:
        the_lab.up(timeout_s=90)
        yield the_lab
    finally:
        the_lab.down()


# --- helpers -------------------------------------------------------------------


def _statuses(lab, hosts=L.HOSTS) -> dict[str, dict]:
    return {h: lab.status(h) for h in hosts}


def _key_drop_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Per host, the key-reason drop counters that moved."""
    out = {}
    for host in before:
        moved = {r: drop(after[host], r) - drop(before[host], r) for r in KEY_DROPS}
        moved = {r: n for r, n in moved.items() if n}
        if moved:
            out[host] = moved
    return out


def _counter(status: dict, name: str) -> int:
    return status["counters"].get(name, 0)


def _pw(lab, host: str, other: str) -> dict:
    """``host``'s peer entry for ``other`` (pw_id, pw_ids_held, ...)."""
    entry = peer(lab.status(host), lab.tap_mac_of(other))
    assert entry is not None, f"{host} has no key for {other}"
    return entry


def _rekey(lab, *args: str) -> dict[str, int]:
    """Run ``keyserverd rekey ARGS``; return the new versions it printed."""
    res = lab.keyserverd("rekey", *args)
    assert res.returncode == 0, f"keyserverd rekey {' '.join(args)}: {res.stdout}{res.stderr}"
    out = {}
    m = re.search(r"pair \S+ <-> \S+ rotated to pw_id (\d+)", res.stdout)
    if m:
        out["pair"] = int(m.group(1))
    m = re.search(r"multicast key rotated to pw_id (\d+)", res.stdout)
    if m:
        out["multicast"] = int(m.group(1))
    return out


def _bg_ping(lab, src: str, dst: str, interval: float, count: int, name: str) -> L.Proc:
    return lab.popen(src, ["ping", "-4", "-n", "-i", str(interval), "-c", str(count), "-W", "2",
                           L.tap_ipv4(dst)], name=name)


def _raw(dst: str, src: str, payload: bytes) -> bytes:
    """A plain frame of the test EtherType, written to a TAP as if the host sent it."""
    frame = (bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
             + TEST_ETHERTYPE.to_bytes(2, "big") + payload)
    return frame + bytes(max(0, 60 - len(frame)))


def _count(frames: list[bytes], marker: bytes) -> int:
    return sum(1 for f in frames if marker in f)


def _l2c_headers(frames: list[bytes]) -> list[tuple[bytes, bytes, int, int, int]]:
    """(DA, SA, key id, PW_ID, PN) of every l2crypt frame in ``frames``."""
    out = []
    for f in frames:
        if len(f) < 30 or int.from_bytes(f[12:14], "big") != L.L2C_ETHERTYPE:
            continue
        out.append((f[0:6], f[6:12], f[15], int.from_bytes(f[16:20], "big"),
                    int.from_bytes(f[20:28], "big")))
    return out


def _warm_up(lab, pairs) -> None:
    """Make sure each pair has a key and ARP entries (one ping each way)."""
    for a, b in pairs:
        res = ping(lab, a, L.tap_ipv4(b), count=2)
        assert res.returncode == 0, f"{a} -> {b}: {res.stdout}{res.stderr}"


def _iperf3_background(lab, client: str, server: str, seconds: int, logfile, port: int = 5202):
    srv = lab.popen(server, ["iperf3", "-s", "-1", "-B", L.tap_ipv4(server), "-p", str(port)],
                    name=f"iperf3-server-{server}-{port}")
    wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
    cli = lab.popen(client, ["iperf3", "-c", L.tap_ipv4(server), "-p", str(port), "-t", str(seconds),
                             "-J", "--logfile", str(logfile)], name=f"iperf3-client-{client}-{port}")
    return srv, cli


def _ping_counts(lab, name: str) -> tuple[int, int]:
    """(transmitted, received) from a background ping's log."""
    text = lab.log_text(name)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert m, f"no ping summary in {name}:\n{text[-1500:]}"
    return int(m.group(1)), int(m.group(2))


def _wait_exit(lab, proc: L.Proc, timeout_s: float) -> None:
    try:
        wait_for(f"{proc.name} to finish", lambda: not proc.alive(), timeout_s=timeout_s)
    finally:
        lab.stop(proc)  # reaps it (or ends it, if it overran)


def _leaked_keys(lab, texts: dict[str, str]) -> list[str]:
    """Names of the ``texts`` that hold any pair or multicast key version (hex or base64)."""
    keys = list(stored_keys(lab.ks_dir).values())
    assert len(keys) >= 2
    forms = [f for k in keys for f in (k.hex(), k.hex().upper(), base64.b64encode(k).decode()[:40])]
    return [name for name, text in texts.items() if any(f in text for f in forms)]


def _goodput(result: dict) -> float:
    return result["end"]["sum_received"]["bits_per_second"]


# --- 1. rekeys during traffic lose nothing (frames: tests/scenarios.py, both worlds) ------


def test_rekeys_under_tcp_and_ping_lose_nothing(lab, tmp_path):
    """Real kernel traffic (iperf3 TCP h1->h2, pings h1<->h3) while the pair and
    multicast keys rotate every 1.5 s: no ping lost, no key drop, every agent
    ends on the newest versions.  (The frame-level scenario is in tests/scenarios.py.)"""
    _warm_up(lab, [("h1", "h2"), ("h1", "h3")])
    baseline = iperf3(lab, "h1", "h2", seconds=5)

    period_s, every_s = 18, 1.5
    before = _statuses(lab)
    pw_before = peer(before["h1"], lab.tap_mac_of("h2"))["pw_id"]
    pings = [_bg_ping(lab, "h1", "h3", 0.2, int(period_s / 0.2), "ping-rekey-h1-h3"),
             _bg_ping(lab, "h3", "h1", 0.2, int(period_s / 0.2), "ping-rekey-h3-h1")]
    logfile = tmp_path / "iperf3-rekeys.json"
    srv, cli = _iperf3_background(lab, "h1", "h2", period_s, logfile)
    rotations: list[dict[str, int]] = []
    try:
        start = time.monotonic()
        tick = start + every_s
        while time.monotonic() < start + period_s - 1 and cli.alive():
            time.sleep(max(0.0, tick - time.monotonic()))
            tick += every_s
            rotations.append(_rekey(lab, "--pair", "h1", "h2", "--multicast"))
        _wait_exit(lab, cli, timeout_s=period_s + 30)
        for p in pings:
            _wait_exit(lab, p, timeout_s=period_s + 20)
    finally:
        for p in (srv, cli, *pings):
            lab.stop(p)
    text = logfile.read_text()
    assert text.strip(), "iperf3 wrote nothing"
    with_rekeys = json.loads(text)
    assert "error" not in with_rekeys, with_rekeys["error"]

    last_pair, last_mcast = rotations[-1]["pair"], rotations[-1]["multicast"]
    # Every agent ends on the newest versions (after the switch delay).
    for host in ("h1", "h2"):
        other = "h2" if host == "h1" else "h1"
        wait_for(f"{host} to send with pair pw_id {last_pair}",
                 lambda h=host, o=other: _pw(lab, h, o)["pw_id"] == last_pair, timeout_s=15)
    for host in L.HOSTS:
        wait_for(f"{host} to send with multicast pw_id {last_mcast}",
                 lambda h=host: lab.status(h)["multicast_pw_id"] == last_mcast, timeout_s=15)
    after = _statuses(lab)

    figures = {
        "goodput_without_rekeys_mbit_s": round(_goodput(baseline) / 1e6, 1),
        "goodput_with_rekeys_mbit_s": round(_goodput(with_rekeys) / 1e6, 1),
        "baseline_seconds": 5, "rekey_run_seconds": period_s,
        "pair_rotations": len(rotations), "pair_pw_id": [pw_before, last_pair],
        "multicast_rotations": len(rotations),
        "rekeys_counted": {h: _counter(after[h], "rekeys") - _counter(before[h], "rekeys") for h in L.HOSTS},
        "ping_h1_h3": _ping_counts(lab, "ping-rekey-h1-h3"),
        "ping_h3_h1": _ping_counts(lab, "ping-rekey-h3-h1"),
    }
    for path in (tmp_path / "rekey_goodput.json", lab.state_dir / "rekey_goodput.json"):
        path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nREKEY GOODPUT (iperf3 TCP h1->h2): {json.dumps(figures)}")

    assert _key_drop_deltas(before, after) == {}, {h: after[h]["drops"] for h in L.HOSTS}
    for name in ("ping-rekey-h1-h3", "ping-rekey-h3-h1"):
        sent, got = _ping_counts(lab, name)
        assert sent >= 80 and got == sent, f"{name}: {sent} sent, {got} received"
    assert len(rotations) >= 8, rotations  # about 11: one every 1.5 s for 18 s
    assert last_pair - pw_before == len(rotations)
    assert with_rekeys["end"]["sum_received"]["bytes"] > 0




# --- 2. the two races --------------------------------------------------------------


def _hold_back_pushes_from_h2(lab) -> dict[str, int]:
    """Rotate h1-h2 and h2-h3 while h2 is cut off from the key server, so
    only h1 and h3 get the new versions; return them once h2 is back."""
    lab.exec("h2", ["ip", "link", "set", L.MGMT_IFNAME, "down"], check=True)
    try:
        # The key client probes every 5 s and gives up after 5 s more.
        wait_for("h2 to notice it lost the key server",
                 lambda: not lab.status("h2")["connected"], timeout_s=30, every_s=0.5)
        new = {"h1": _rekey(lab, "--pair", "h1", "h2")["pair"],
               "h3": _rekey(lab, "--pair", "h2", "h3")["pair"]}
        for host, pw_id in new.items():
            wait_for(f"the push of pw_id {pw_id} to {host}",
                     lambda h=host, p=pw_id: p in _pw(lab, h, "h2")["pw_ids_held"], timeout_s=10)
    finally:
        lab.exec("h2", ["ip", "link", "set", L.MGMT_IFNAME, "up"], check=True)
    wait_for("h2 to reconnect", lambda: lab.status("h2")["connected"], timeout_s=40, every_s=0.5)
    # Nothing pushes the missed versions on reconnect: h2 still lacks both.
    for host, pw_id in new.items():
        held = _pw(lab, "h2", host)["pw_ids_held"]
        assert max(held) < pw_id, f"h2 already holds {held} for {host} (the push was not held back)"
    # h1 and h3 move to the new versions after the switch delay.
    for host, pw_id in new.items():
        wait_for(f"{host} to switch to pw_id {pw_id}",
                 lambda h=host, p=pw_id: _pw(lab, h, "h2")["pw_id"] == p, timeout_s=10)
    return new


def test_race_a_and_race_b(lab):
    _warm_up(lab, [("h1", "h2"), ("h2", "h3")])
    new = _hold_back_pushes_from_h2(lab)

    # Race (b) on the pair h2-h3: h2 still sends with the old version to h3,
    # which switched.  Only h2 -> h3 frames (a test EtherType: h3 answers nothing).
    before = _statuses(lab, ("h2", "h3"))
    log_mark = len(lab.log_text("keyserverd"))
    marker = b"L2C-RACE-B-" + bytes(8)
    tap = lab.capture(L.TAP_IFNAME, role="h3", name="tcpdump-race-b-h3-tap")
    try:
        frames = [_raw(lab.tap_mac_of("h3"), lab.tap_mac_of("h2"), marker + bytes([i])) for i in range(20)]
        assert lab.inject(frames, role="h2", ifname=L.TAP_IFNAME) == len(frames)
        wait_for("h3 to report h2 lagging",
                 lambda: _counter(lab.status("h3"), "lag_reports") > _counter(before["h3"], "lag_reports"),
                 timeout_s=10)
        wait_for(f"the key server to push pw_id {new['h3']} to h2 again",
                 lambda: new["h3"] in _pw(lab, "h2", "h3")["pw_ids_held"], timeout_s=10)
    finally:
        seen = L.read_pcap(tap.stop())
    after = _statuses(lab, ("h2", "h3"))
    server_log = lab.log_text("keyserverd")[log_mark:]
    assert re.search(rf"peer_lagging host=h3 peer=h2 pw_id={new['h3']}\b", server_log), \
        server_log[-2000:]
    # h2 got the new version without asking for it ...
    assert _counter(after["h2"], "key_requests") == _counter(before["h2"], "key_requests")
    # ... and the old-version frames were still accepted meanwhile (make before break).
    assert _count(seen, marker) == len(frames), f"{_count(seen, marker)} of {len(frames)} reached h3"
    assert _key_drop_deltas(before, after) == {}

    # Race (a) on the pair h1-h2: h1 sends with a version h2 lacks.
    before = lab.status("h2")
    res = ping(lab, "h1", L.tap_ipv4("h2"), count=5)
    after = lab.status("h2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"5 packets transmitted, [45] received", res.stdout), res.stdout
    assert _counter(after, "key_requests") > _counter(before, "key_requests")
    assert _counter(after, "held") > _counter(before, "held")
    entry = peer(after, lab.tap_mac_of("h1"))
    assert entry["pw_id"] == new["h1"], entry
    assert drop(after, "hold_expired") == drop(before, "hold_expired")
    assert drop(after, "hold_overflow") == drop(before, "hold_overflow")


# --- 3. data-volume rekey ------------------------------------------------------------


def test_data_volume_rekey(lab):
    try:
        lab.restart_agent("h1", extra_args=("--rekey-after-frames", "2000"))
        _warm_up(lab, [("h1", "h2")])
        before = _statuses(lab, ("h1", "h2"))
        pw_before = peer(before["h1"], lab.tap_mac_of("h2"))["pw_id"]
        result = iperf3(lab, "h1", "h2", seconds=8, port=5203)
        res = ping(lab, "h1", L.tap_ipv4("h2"), count=3)
        after = _statuses(lab, ("h1", "h2"))
    finally:
        lab.restart_agent("h1")
    asked = _counter(after["h1"], "rekey_requests") - _counter(before["h1"], "rekey_requests")
    pw_after = peer(after["h1"], lab.tap_mac_of("h2"))["pw_id"]
    print(f"\nDATA-VOLUME REKEY: {asked} rekey requests, pw_id {pw_before} -> {pw_after}, "
          f"{_goodput(result) / 1e6:.1f} Mbit/s, {peer(after['h1'], lab.tap_mac_of('h2'))['frames_out']} frames")
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
    assert res.returncode == 0 and "3 received" in res.stdout, res.stdout
    assert asked >= 2, after["h1"]["counters"]
    assert pw_after - pw_before >= 2, (pw_before, pw_after)
    assert peer(after["h2"], lab.tap_mac_of("h1"))["pw_id"] >= pw_after - 1
    assert _key_drop_deltas(before, after) == {}


# --- 5. no nonce reuse -----------------------------------------------------------------


def test_no_nonce_reuse_across_restart_and_rekeys(lab):
    _warm_up(lab, [("h1", "h2"), ("h1", "h3")])
    cap = lab.capture("br0", name="tcpdump-nonce-br0", snaplen=64)
    bcast = _raw("ff:ff:ff:ff:ff:ff", lab.tap_mac_of("h1"), b"L2C-NONCE-BCAST")
    pings = [_bg_ping(lab, "h1", "h2", 0.005, 3000, "ping-nonce-h1-h2"),
             _bg_ping(lab, "h2", "h1", 0.005, 3000, "ping-nonce-h2-h1"),
             _bg_ping(lab, "h3", "h1", 0.05, 300, "ping-nonce-h3-h1")]
    try:
        time.sleep(1.5)
        _rekey(lab, "--pair", "h1", "h2", "--multicast")
        time.sleep(SWITCH_AFTER_S + 1)
        lab.inject([bcast] * 20, role="h1", ifname=L.TAP_IFNAME)  # multicast key, same counter
        n_before = len([h for h in _l2c_headers(cap.frames()) if h[1] == mac_bytes(lab.tap_mac_of("h1"))])
        lab.restart_agent("h1")
        _rekey(lab, "--pair", "h1", "h2", "--multicast")
        time.sleep(SWITCH_AFTER_S + 1.5)
        lab.inject([bcast] * 20, role="h1", ifname=L.TAP_IFNAME)
        time.sleep(0.5)
    finally:
        for p in pings:
            lab.stop(p)
        frames = L.read_pcap(cap.stop())
    headers = _l2c_headers(frames)
    h1 = mac_bytes(lab.tap_mac_of("h1"))
    h1_frames = [h for h in headers if h[1] == h1]
    assert n_before >= 100, f"only {n_before} frames from h1 before its restart"
    assert len(h1_frames) - n_before >= 100, f"only {len(h1_frames) - n_before} frames from h1 after it"
    # Rekeys happened inside the capture: several pair and multicast versions.
    pair_versions = {h[3] for h in h1_frames if h[2] == KEY_ID_PAIR}
    group_versions = {h[3] for h in h1_frames if h[2] == KEY_ID_MULTICAST}
    assert len(pair_versions) >= 2 and len(group_versions) >= 2, (pair_versions, group_versions)
    seen: dict[tuple[bytes, int], tuple] = {}
    repeats = []
    for h in headers:
        key = (h[1], h[4])  # (source MAC, packet number): one counter per sender for every key
        if key in seen:
            repeats.append((seen[key], h))
        seen[key] = h
    assert not repeats, f"{len(repeats)} (SA, PN) repeats, first: {repeats[:3]}"
    full = {(h[1], h[2], h[3], h[4]) for h in headers}
    assert len(full) == len(headers)
    # No key version shows in a log or in status output.
    texts = {p.name: p.read_text(errors="replace") for p in (lab.state_dir / "logs").glob("*.log")}
    texts.update({f"status {h}": json.dumps(lab.status(h)) for h in L.HOSTS})
    assert "keyserverd.log" in texts and "agent-h1.log" in texts
    assert _leaked_keys(lab, texts) == []


# --- 4. revocation (last: h3 is gone after it) ---------------------------------------------


def test_revocation(lab):
    _warm_up(lab, [("h1", "h3"), ("h2", "h3"), ("h3", "h1"), ("h3", "h2")])
    h3_mac = lab.tap_mac_of("h3")
    marker_before, marker_after = b"L2C-MCAST-BEFORE-1", b"L2C-MCAST-AFTER-2"
    tap3 = lab.capture(L.TAP_IFNAME, role="h3", name="tcpdump-revoke-h3-tap")
    tap2 = lab.capture(L.TAP_IFNAME, role="h2", name="tcpdump-revoke-h2-tap")
    pings = []
    try:
        # Before: h1's broadcasts reach h3 (the capture works).
        lab.inject([_raw("ff:ff:ff:ff:ff:ff", lab.tap_mac_of("h1"), marker_before)] * 3,
                   role="h1", ifname=L.TAP_IFNAME)
        wait_for("h1's broadcast on h3's TAP", lambda: _count(tap3.frames(), marker_before), timeout_s=5)

        pings = [_bg_ping(lab, "h3", "h1", 0.2, 60, "ping-revoke-h3-h1"),
                 _bg_ping(lab, "h3", "h2", 0.2, 60, "ping-revoke-h3-h2")]
        time.sleep(1)
        before = _statuses(lab, ("h1", "h2"))
        mcast_before = before["h1"]["multicast_pw_id"]
        t0 = time.monotonic()
        res = lab.keyserverd("host", "revoke", "h3")
        assert res.returncode == 0, res.stdout + res.stderr

        def dropping() -> bool:
            st = _statuses(lab, ("h1", "h2"))
            return all(h3_mac in st[h]["revoked_peers"]
                       and drop(st[h], "revoked_sender") > drop(before[h], "revoked_sender")
                       for h in st)
        wait_for("h1 and h2 to drop h3's frames", dropping, timeout_s=max(0.5, t0 + 5 - time.monotonic()))
        revoked_after_s = time.monotonic() - t0
        for p in pings:
            lab.stop(p)
        # h3 can no longer reach anyone.
        for dst in ("h1", "h2"):
            res = ping(lab, "h3", L.tap_ipv4(dst), count=3)
            assert res.returncode != 0 and " 0 received" in res.stdout, res.stdout

        # After the switch delay h1 sends broadcasts under the new multicast key:
        # h2 opens them, h3 cannot.
        wait_for("h1 to switch to the new multicast key",
                 lambda: (lab.status("h1")["multicast_pw_id"] or 0) > mcast_before, timeout_s=10)
        lab.inject([_raw("ff:ff:ff:ff:ff:ff", lab.tap_mac_of("h1"), marker_after)] * 5,
                   role="h1", ifname=L.TAP_IFNAME)
        wait_for("h1's new broadcast on h2's TAP", lambda: _count(tap2.frames(), marker_after), timeout_s=5)
        time.sleep(1)
    finally:
        for p in pings:
            lab.stop(p)
        seen3 = L.read_pcap(tap3.stop())
        tap2.stop()
    assert _count(seen3, marker_before) >= 1
    assert _count(seen3, marker_after) == 0, "h3 decrypted a multicast frame after its revocation"
    print(f"\nREVOCATION: h1 and h2 dropped h3's frames {revoked_after_s:.1f} s after 'host revoke h3'")

    # h3's agent is refused when it reconnects.
    wait_for("the key server to refuse h3",
             lambda: re.search(r"request_refused type=hello host=h3 code=revoked", lab.log_text("keyserverd")),
             timeout_s=30)
    wait_for("h3 to stay disconnected", lambda: not lab.status("h3")["connected"], timeout_s=10)
