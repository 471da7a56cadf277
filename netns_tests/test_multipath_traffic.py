# Multipath inter-subnet tunnels (issue 17): traffic between segments A and B over
# three WAN paths (l2crypt/lab/multipath.py), path 3 through a relay.
#
#   h1 h2 --br0-- gA ==== wan1 -- r1 -- wan1 ==== gB --br0-- h3
#                    ==== wan2 -- r2 -- wan2 ====
#                    ==== wan3 -- r3 -- rly -- r3 -- wan3 ====
#
# The segments and the path links run jumbo frames (MTU 9000), so the gateways'
# per-frame cost in Python does not cap the runs below what three 100 Mbit/s paths
# carry: these tests measure the paths, not the interpreter.

from __future__ import annotations

import json
import re
import struct
import time

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import tunnel_wire as W
from helpers import listening, skip_unless_gateway_lab, wait_for
from test_gateway import scrape_gw
from l2crypt.lab import segment as L
from l2crypt.lab.gateway import TUNNEL_PORT
from l2crypt.lab.multipath import PATHS, MultipathLab

pytestmark = pytest.mark.lab
ALONE = True  # rates are asserted: no other test module runs meanwhile (l2crypt/lab/cpu_share.py)

SEGMENT_MTU = 9000
CAP_MBIT = 100
NETKEY_REKEY_S = 12.0  # every path's key rotates under all these tests
#: The usual TCP (this machine's default may be BBR, which fills a capped path until it
#: drops many packets, and shrugs off random loss: neither is what these tests measure).
CUBIC = ("-C", "cubic")
#: 4 TCP streams for 6 s, the first 2 s (slow start, the first weights) left out of the figure.
STEADY_STREAMS = ("-t", "6", "-O", "2", "-P", "4")


@pytest.fixture(scope="module")
def mp(tmp_path_factory):
    skip_unless_gateway_lab()
    the_lab = MultipathLab(tmp_path_factory.mktemp("mptraffic"), multipath=True, wire_mtu=SEGMENT_MTU,
                           tunnel_args={"mode": "split"}, netkey_rekey_after_s=NETKEY_REKEY_S)
    try:
        the_lab.up(timeout_s=150)
        _wait_paths(the_lab, lambda p: p["state"] == "up" and p["pw_id"] is not None, "every path up and keyed")
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def clean_paths(mp):
    """Every path up, unshaped and without loss, and the weights even again, before the next test."""
    yield
    for k in PATHS:
        mp.path_up(k)
        mp.set_loss(k, 0)
        mp.shape(k, None)
    _wait_paths(mp, lambda p: p["state"] == "up" and p["weight"] > 0.25, "every path up with its share")


def _paths(mp, gw: str = "gA") -> dict[int, dict]:
    return {p["id"]: p for p in mp.gateway_status(gw)["tunnel_paths"]}


def _wait_paths(mp, pred, what: str, timeout_s: float = 30.0, gws=("gA", "gB"), paths=PATHS) -> dict:
    def ok():
        got = {gw: _paths(mp, gw) for gw in gws}
        return got if all(pred(got[gw][k]) for gw in gws for k in paths) else None
    return wait_for(what, ok, timeout_s=timeout_s, every_s=0.2)


def _restart_gateways(mp, **tunnel_args) -> None:
    mp.tunnel_args = {"mode": "split", **tunnel_args}
    for gw in ("gA", "gB"):
        mp.stop_gateway(gw, sig=15)
        mp.start_gateway(gw)
    for gw in ("gA", "gB"):
        mp.wait_gateway(gw, lambda st: st.get("connected") and st.get("netkey_pw_id"), 60)
    _wait_paths(mp, lambda p: p["state"] == "up" and p["pw_id"] is not None, "every path up and keyed")
    wait_for("h1 -> h3 again after the restart", lambda: mp.a.exec(
        "h1", ["ping", "-c", "1", "-W", "1", L.tap_ipv4("h3")], timeout=10).returncode == 0, timeout_s=30, every_s=0.2)


def _iperf3(mp, extra: tuple, port: int, client: str = "h1", server: str = "h3") -> dict:
    slab, clab = mp.lab_of(server), mp.lab_of(client)
    srv = slab.popen(server, ["iperf3", "-s", "-1", "-B", L.tap_ipv4(server), "-p", str(port)],
                     name=f"iperf3-{server}-{port}")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        res = clab.exec(client, ["iperf3", "-c", L.tap_ipv4(server), "-p", str(port), *CUBIC, *extra, "-J"],
                        timeout=60)
        assert res.returncode == 0, f"iperf3 {client}->{server}: {res.stdout[-1500:]}{res.stderr}"
        return json.loads(res.stdout)
    finally:
        slab.stop(srv)


def _mbit(doc: dict) -> float:
    return doc["end"]["sum_received"]["bits_per_second"] / 1e6


def _tunnel_datagrams(frames: list[bytes]) -> list[bytes]:
    """The UDP payloads to or from the tunnel port in captured Ethernet frames (IPv4)."""
    out = []
    for f in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17 or f[20] & 0x1F or f[21]:
            continue  # not IPv4 UDP, or a fragment after the first
        ihl = (f[14] & 15) * 4
        sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
        if TUNNEL_PORT in (sport, dport):
            out.append(f[14 + ihl + 8:])
    return out


def _path_keys(mp, k: int) -> dict[int, bytes]:
    """PW_ID -> the key gB seals path k with, for every NETKEY version the key servers hold:
    what an operator of path k might have been given.  Derived from NETKEY as segment B's key
    server derives it (its state files, read only: no session disturbs the gateways)."""
    from keyserverd.ca import CertificateAuthority
    from keyserverd.peering.netkey import NETKEY_FILE, NetkeyBook
    from keyserverd.store.kek import read_kek_file
    from l2crypt.core.tunnel_keys import Endpoint, link_key

    a_ca, b_ca = (CertificateAuthority.open(lab.ks_dir, ()).ca_fingerprint() for lab in (mp.a, mp.b))
    book = NetkeyBook(mp.b.ks_dir / NETKEY_FILE, read_kek_file(mp.b.ks_dir / "kek"))
    keys = {pw_id: link_key(netkey, pw_id, Endpoint(b_ca, "gB"), Endpoint(a_ca, "gA"), path=k)
            for pw_id, netkey in book.versions()}
    assert keys, "no NETKEY version on record"
    return keys


def _opens(key: bytes, datagram: bytes) -> bytes | None:
    pn = struct.unpack_from("!Q", datagram, 12)[0]
    try:
        return AESGCM(key).decrypt(b"\x00" * 4 + pn.to_bytes(8, "big"), datagram[W.HEADER_LEN:],
                                   datagram[:W.HEADER_LEN])
    except InvalidTag:
        return None


def _udp_flows(mp, count: int, marker: bytes, seconds: float = 3.0) -> None:
    """``count`` UDP flows h3 -> h1 (one source port each), each frame carrying ``marker``."""
    script = (
        "import socket, sys, time\n"
        f"socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range({count})]\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    for i, s in enumerate(socks):\n"
        f"        s.sendto({marker!r} + bytes([i]) * 200, ('{L.tap_ipv4('h1')}', 9))\n"
        "    time.sleep(0.005)\n")
    res = mp.b.exec("h3", [mp.b.cmd("python3"), "-c", script], timeout=seconds + 20)
    assert res.returncode == 0, res.stderr


# --- the tests ---------------------------------------------------------------------------


def test_three_paths_carry_more_than_twice_what_one_does(mp, clean_paths):
    """Aggregation: each path capped at 100 Mbit/s; 4 TCP streams h1 -> h3 get at least
    2.2 times what they get when only one path is up."""
    for k in PATHS:
        mp.shape(k, CAP_MBIT)
    for k in (2, 3):
        mp.path_down(k)
    _wait_paths(mp, lambda p: p["state"] != "up", "paths 2 and 3 out", paths=(2, 3))
    one = _mbit(_iperf3(mp, STEADY_STREAMS, 5301))
    for k in (2, 3):
        mp.path_up(k)
    _wait_paths(mp, lambda p: p["state"] == "up", "paths 2 and 3 back", paths=(2, 3))
    before = _paths(mp)
    three = _mbit(_iperf3(mp, STEADY_STREAMS, 5302))
    after = _paths(mp)
    print(f"aggregation: one path {one:.1f} Mbit/s, three paths {three:.1f} Mbit/s ({three / one:.2f}x); "
          f"MB per path: {[round((after[k]['tx_bytes'] - before[k]['tx_bytes']) / 1e6, 1) for k in PATHS]}, "
          f"weights before {[before[k]['weight'] for k in PATHS]}, flows {[before[k]['flows'] for k in PATHS]}")
    assert one <= CAP_MBIT * 1.05
    assert three >= 2.2 * one, f"three paths {three:.1f} Mbit/s, one path {one:.1f} Mbit/s"


def test_a_path_that_fails_mid_run_leaves_no_gap_over_a_second_and_no_plaintext(mp, clean_paths):
    """Failure: the path carrying a TCP stream goes down 2 s into the run; delivery
    (iperf3's 0.2 s intervals) never stops for more than 1 s, and no path carries a
    clear marker."""
    marker = b"MPATH-CLEAR-MARK"
    caps = {k: mp.capture(k) for k in PATHS}
    before = {k: p["tx_bytes"] for k, p in _paths(mp).items()}
    srv_port = 5303
    h3 = mp.b
    srv = h3.popen("h3", ["iperf3", "-s", "-1", "-B", L.tap_ipv4("h3"), "-p", str(srv_port)], name="iperf3-fail")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, srv_port), timeout_s=10)
        client = mp.a.popen("h1", ["iperf3", "-c", L.tap_ipv4("h3"), "-p", str(srv_port), "-t", "6", "-i", "0.2",
                                   *CUBIC, "-J"], name="iperf3-fail-client")
        time.sleep(2.0)
        now = _paths(mp)
        busiest = max(PATHS, key=lambda k: now[k]["tx_bytes"] - before[k])
        mp.path_down(busiest)
        mp.a.exec("h1", ["ping", "-c", "5", "-i", "0.2", "-p", marker.hex(), L.tap_ipv4("h3")], timeout=20)
        wait_for("iperf3 to end", lambda: not client.alive(), timeout_s=30)
        text = mp.a.log_text("iperf3-fail-client")
        doc = json.loads(text[text.index("{"):])
    finally:
        h3.stop(srv)
        frames = {k: L.read_pcap(cap.stop()) for k, cap in caps.items()}
    intervals = [i["sum"]["bytes"] for i in doc["intervals"]]
    longest, run = 0, 0
    for n in intervals:
        run = run + 1 if n == 0 else 0
        longest = max(longest, run)
    print(f"failover: path {busiest} down at 2 s; longest gap {longest * 0.2:.1f} s; "
          f"per 0.2 s: {[round(n / 1e6, 2) for n in intervals]} MB")
    assert longest * 0.2 <= 1.0, intervals
    assert sum(intervals[-5:]) > 0  # still flowing at the end, on the other paths
    state = _paths(mp)[busiest]["state"]
    assert state != "up", state
    metrics = scrape_gw(mp, "gA")
    assert metrics[f"l2crypt_gateway_tunnel_path_up{{path={busiest},peer=gB}}"] == 0
    assert sum(metrics[f"l2crypt_gateway_tunnel_path_up{{path={k},peer=gB}}"] for k in PATHS) == 2
    table = mp.a.exec("gA", [mp.a.cmd("l2crypt-gateway"), "status", "--state-dir", mp.gw_dir("gA")], timeout=10)
    assert "tunnel paths" in table.stdout and table.stdout.count(" up ") >= 2, table.stdout
    for k, fr in frames.items():
        assert not any(marker in f for f in fr), f"a clear marker on path {k}"
        assert all(d[0] == W.TUNNEL_VERSION for d in _tunnel_datagrams(fr))


def test_a_lossy_path_loses_its_weight_within_two_intervals_and_throughput_recovers(mp, clean_paths):
    """Adaptation: 5% loss on the path carrying most of 4 TCP streams, 1 s into an 8 s run;
    its weight falls below half within two weight intervals (1 s each), and the last 3 s
    of the run carry what the two whole paths carried in a loss-free run."""
    for k in PATHS:
        mp.shape(k, CAP_MBIT)
    clean = _mbit(_iperf3(mp, ("-t", "3", "-P", "4"), 5304))
    port = 5305
    srv = mp.b.popen("h3", ["iperf3", "-s", "-1", "-B", L.tap_ipv4("h3"), "-p", str(port)], name="iperf3-adapt")
    try:
        wait_for("iperf3 server", lambda: listening(srv.pid, port), timeout_s=10)
        before = {k: p["tx_bytes"] for k, p in _paths(mp).items()}
        client = mp.a.popen("h1", ["iperf3", "-c", L.tap_ipv4("h3"), "-p", str(port), "-t", "8", "-P", "4",
                                   "-i", "0.5", *CUBIC, "-J"], name="iperf3-adapt-client")
        time.sleep(1.0)
        now = _paths(mp)
        lossy = max(PATHS, key=lambda k: now[k]["tx_bytes"] - before[k])
        weight_before, intervals_before = now[lossy]["weight"], now[lossy]["intervals"]
        mp.set_loss(lossy, 5)
        started = time.monotonic()
        low_at = wait_for("the lossy path's weight to fall", lambda: next(
            ((i, w) for i, w in _paths(mp)[lossy]["weights"] if i > intervals_before and w < weight_before / 2),
            None), timeout_s=10, every_s=0.1)
        took = time.monotonic() - started
        low, intervals = low_at[1], low_at[0] - intervals_before
        wait_for("iperf3 to end", lambda: not client.alive(), timeout_s=30)
        text = mp.a.log_text("iperf3-adapt-client")
        doc = json.loads(text[text.index("{"):])
    finally:
        mp.b.stop(srv)
    rates = [i["sum"]["bits_per_second"] / 1e6 for i in doc["intervals"]]
    recovered = sum(rates[-6:]) / 6
    print(f"adaptation: path {lossy} (5% loss) weight {weight_before:.2f} -> {low:.2f} in {took:.1f} s "
          f"({intervals} weight intervals); "
          f"4 streams {clean:.1f} Mbit/s clean, {recovered:.1f} Mbit/s in the last 3 s; per 0.5 s: "
          f"{[round(r) for r in rates]}")
    assert intervals <= 2, (intervals_before, _paths(mp)[lossy]["weights"])  # the first saw part of it
    assert recovered >= 0.6 * clean  # the two whole paths carry what they carried before (2/3 of it), or more


def test_each_path_carries_only_its_own_key_and_a_share_of_the_flows(mp, clean_paths):
    """Shares: a capture on each path holds only that path's ID and PW_IDs; path 1's key
    opens path 1's datagrams and none of the others'; no path carries every flow."""
    marker = b"MPATH-SHARE-MARK"
    caps = {k: mp.capture(k) for k in PATHS}
    try:
        _udp_flows(mp, 12, marker)
        time.sleep(0.5)
    finally:
        frames = {k: _tunnel_datagrams(L.read_pcap(cap.stop())) for k, cap in caps.items()}
    status = _paths(mp, "gB")
    keys = _path_keys(mp, 1)
    flows_on = {}
    for k, datagrams in frames.items():
        from_gb = [d for d in datagrams if len(d) >= W.MIN_DATAGRAM and W.decode_header(d).sender == _tag("gB")]
        assert from_gb, f"nothing from gB on path {k}"
        headers = [W.decode_header(d) for d in from_gb]
        assert {h.path for h in headers} == {k}
        assert {h.pw_id for h in headers} <= {status[k]["pw_id"], status[k]["pw_id"] - 1}
        opened = [_opens(keys[h.pw_id], d) for h, d in zip(headers, from_gb) if h.pw_id in keys]
        if k == 1:
            assert opened and all(m is not None for m in opened)
            flows_on[k] = {m[8 + 14 + 28 + len(marker)] for m in opened if marker in m}
        else:
            assert all(m is None for m in opened), f"path 1's key opened a datagram of path {k}"
        assert not any(marker in d for d in datagrams)
    assert 0 < len(flows_on[1]) < 12, f"path 1 carried {len(flows_on[1])} of 12 flows"


KEY_DROPS = ("tunnel_no_netkey", "tunnel_stale_netkey", "tunnel_bad_tag", "tunnel_replayed")


def test_every_paths_key_rotates_make_before_break_without_losing_a_frame(mp, clean_paths):
    """A key per path, rotated with NETKEY: across a rotation every path moves to a new
    PW_ID, 3 flows of pings lose nothing, and no datagram is dropped for its key."""
    before = {gw: mp.gateway_status(gw) for gw in ("gA", "gB")}
    flows = [mp.a.popen("h1", ["ping", "-c", str(int(NETKEY_REKEY_S * 1.5 / 0.1)), "-i", "0.1", "-s", str(size),
                               L.tap_ipv4("h3")], name=f"ping-rekey-{size}") for size in (56, 200, 1000)]
    wait_for("the pings", lambda: not any(p.alive() for p in flows), timeout_s=NETKEY_REKEY_S * 3)
    after = {gw: mp.gateway_status(gw) for gw in ("gA", "gB")}
    drops = {gw: {r: n - before[gw]["drops"].get(r, 0) for r, n in after[gw]["drops"].items()
                  if n != before[gw]["drops"].get(r, 0)} for gw in ("gA", "gB")}
    for size in (56, 200, 1000):
        log = mp.a.log_text(f"ping-rekey-{size}")
        got = {int(m) for m in re.findall(r"icmp_seq=(\d+)", log)}
        lost = sorted(set(range(1, max(got, default=0) + 1)) - got)
        assert " 0% packet loss" in log, (size, lost, drops, log[-200:])
    for gw in ("gA", "gB"):
        old = {p["id"]: p["pw_id"] for p in before[gw]["tunnel_paths"]}
        new = {p["id"]: p["pw_id"] for p in after[gw]["tunnel_paths"]}
        assert all(new[k] > old[k] for k in PATHS), (gw, old, new)
        assert {r: after[gw]["drops"].get(r, 0) - before[gw]["drops"].get(r, 0) for r in KEY_DROPS} == \
            dict.fromkeys(KEY_DROPS, 0), gw


def test_redundant_mode_delivers_everything_once_over_a_lossy_path(mp, clean_paths):
    """Redundant mode: every frame on two paths; with path 1 dropping 20%, 500 pings all
    come back and none twice."""
    _restart_gateways(mp, mode="redundant")
    try:
        mp.set_loss(1, 20)
        res = mp.a.exec("h1", ["ping", "-c", "500", "-i", "0.01", "-W", "2", L.tap_ipv4("h3")], timeout=60)
        print("redundant:", res.stdout.strip().splitlines()[-2], "; second copies dropped at gB:",
              mp.gateway_status("gB")["drops"].get("tunnel_duplicate", 0))
        assert " 0% packet loss" in res.stdout, res.stdout[-500:]
        assert "DUP!" not in res.stdout
        drops = mp.gateway_status("gB")["drops"]
        assert drops.get("tunnel_duplicate", 0) > 0  # the second copies, dropped at gB
    finally:
        _restart_gateways(mp)


def test_the_relay_holds_no_key_and_sees_no_plaintext(mp, clean_paths):
    """Relay: its memory holds none of the three paths' keys, and what it forwarded
    (captured on path 3) holds no clear marker."""
    marker = b"MPATH-RELAY-MARK"
    cap = mp.capture(3)
    try:
        _udp_flows(mp, 12, marker, seconds=2.0)
    finally:
        frames = L.read_pcap(cap.stop())
    assert mp.relay_stats()["forwarded"], "the relay forwarded nothing"
    memory = mp.process_memory(mp.relay_pid())
    keys = [key for k in PATHS for key in _path_keys(mp, k).values()]
    assert memory and len(keys) >= 3 and not any(k in memory for k in keys)
    assert not any(marker in f for f in frames)


def _tag(gw: str) -> bytes:
    from l2crypt.core.tunnel_keys import sender_tag

    return sender_tag(gw)
