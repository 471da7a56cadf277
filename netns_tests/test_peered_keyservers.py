"""Peered key servers (cascaded switches, issue 5): hosts enrolled at KS-A and at
KS-B share one bridge and talk to each other, ARP and ND included.

    l2c-ks-<s>:  KS-A 10.67.0.1:7788 (CA A, state keyserver/)  <-- peering :7790, mutual TLS -->
                 KS-B 10.67.0.2:7788 (CA B, state keyserver2/)     KS-B 10.67.0.2:7790
                 |  management bridge mbr0
           h1 (KS-A)   h2 (KS-A)   h3 (KS-B; its agent trusts CA B only)
           |           |           |
           +---------- br0 (the switch, l2c-sw-<s>) ----------+

The servers agree on one multicast key (the smaller CA fingerprint leads), so
broadcasts of a KS-B host open at KS-A hosts and back; pair keys of a
cross-server pair live with the server of the lower host ID.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from pyroute2 import netns

from helpers import KeyServerClient, iperf3, l2c_frames, mac_bytes, ping, skip_reason, stored_keys, wait_for

from keyserverd.peering import messages as pm
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.lab import segment as L
from l2crypt.lab.peered import PeeredLab

pytestmark = pytest.mark.lab

MARKER = b"L2CRYPT-PEERED-5b1e"
HOSTS = ("h1", "h2", "h3")


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = PeeredLab(state_dir=tmp_path_factory.mktemp("plab"), hosts=HOSTS, ks2_hosts=("h3",))
    try:
        the_lab.up(timeout_s=120)
        wait_for("one multicast key at both servers and every agent", lambda: agreed(the_lab), timeout_s=60)
        yield the_lab
    finally:
        the_lab.down()


def newest_multicast(lab, name: str) -> tuple[bytes, int]:
    keys = stored_keys(lab.ks_state(name))
    pw_id = max(k[1] for k in keys if k[0] == "multicast")
    return keys[("multicast", pw_id)], pw_id


def agreed(lab) -> int | None:
    """The common multicast PW_ID when both servers hold the same newest key and
    every agent uses that version; else None."""
    a, b = newest_multicast(lab, "ks1"), newest_multicast(lab, "ks2")
    if a != b:
        return None
    return a[1] if all(lab.status(h).get("multicast_pw_id") == a[1] for h in HOSTS) else None


def pair_rows(lab, name: str, id1: str, id2: str) -> list[tuple[int, bytes]]:
    return sorted((k[3], key) for k, key in stored_keys(lab.ks_state(name)).items() if k[:3] == ("pair", id1, id2))


def test_two_cas_each_host_at_its_own_server_one_multicast_key(plab):
    assert plab.fingerprints["ks1"] != plab.fingerprints["ks2"]
    assert (plab.ks_state("ks1") / "ca.key").read_bytes() != (plab.ks_state("ks2") / "ca.key").read_bytes()
    for host in HOSTS:
        ks = plab.ks_of(host)
        assert plab.status(host)["keyserver"] == plab.addr_of(ks)
        # Each agent trusts its own server's CA only.
        assert (plab.host_dir(host) / "ca.crt").read_bytes() == (plab.ks_state(ks) / "ca.crt").read_bytes()
    assert [plab.ks_of(h) for h in HOSTS] == ["ks1", "ks1", "ks2"]
    # One multicast key: the follower took the leader's version as it is.
    assert newest_multicast(plab, "ks1") == newest_multicast(plab, "ks2")
    leader, follower = sorted(("ks1", "ks2"), key=lambda n: plab.fingerprints[n])
    assert plab.ks_status(follower)["rotations"].get("multicast_from_leader", 0) >= 1
    assert "multicast_follower" in plab.log_text(plab.proc_name(follower))
    assert "multicast_leader" in plab.log_text(plab.proc_name(leader))


@pytest.mark.parametrize("src,dst", [("h1", "h3"), ("h3", "h2"), ("h2", "h1")])
def test_hosts_of_both_servers_talk_arp_nd_iperf3(plab, src, dst):
    for host in (src, dst):
        plab.exec(host, ["ip", "neigh", "flush", "dev", L.TAP_IFNAME], check=True)
    for addr in (L.tap_ipv4(dst), L.tap_ipv6(dst)):  # ARP, then neighbour discovery
        res = ping(plab, src, addr, count=3)
        assert res.returncode == 0, f"{src} -> {addr}: {res.stdout}{res.stderr}"
    # The neighbour entries were learned (ARP / ND), not configured.
    neigh = plab.exec(src, ["ip", "neigh", "show", "dev", L.TAP_IFNAME], check=True).stdout
    learned = [ln for ln in neigh.splitlines() if plab.tap_mac_of(dst) in ln]
    assert len(learned) >= 2 and not any("PERMANENT" in ln for ln in learned), neigh
    result = iperf3(plab, src, dst, seconds=3)
    assert result["end"]["sum_received"]["bytes"] > 0


def test_no_plaintext_on_the_switch(plab):
    switch = plab.capture("br0", name="tcpdump-peered-br0")
    tap = plab.capture(L.TAP_IFNAME, role="h3", name="tcpdump-peered-h3-tap")
    pattern = MARKER[:16].hex()
    try:
        for addr in (L.tap_ipv4("h3"), L.tap_ipv6("h3")):
            res = ping(plab, "h1", addr, count=5, extra=["-s", "1000", "-p", pattern])
            assert res.returncode == 0, res.stdout + res.stderr
        res = ping(plab, "h3", L.tap_ipv4("h2"), count=5, extra=["-s", "1000", "-p", pattern])
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        switch_frames = L.read_pcap(switch.stop())
        tap_frames = L.read_pcap(tap.stop())
    assert sum(f.count(MARKER[:16]) for f in tap_frames) >= 10  # it really went through h3
    assert len(l2c_frames(switch_frames, src=plab.tap_mac_of("h3"))) >= 10
    assert sum(f.count(MARKER[:16]) for f in switch_frames) == 0


def test_cross_server_pair_key_lives_with_the_lower_host_ids_server(plab):
    assert ping(plab, "h3", L.tap_ipv4("h1"), count=2).returncode == 0
    at_a = wait_for("the pair h1-h3 at KS-A", lambda: pair_rows(plab, "ks1", "h1", "h3"), timeout_s=10)
    assert pair_rows(plab, "ks2", "h1", "h3") == []  # KS-B never made a key of its own
    # What each server hands out for the pair is KS-A's newest version.
    newest = at_a[-1]
    got = {}
    for host, other in (("h3", "h1"), ("h1", "h3")):
        client = KeyServerClient(plab.ns(host), plab.addr_of(plab.ks_of(host)), plab.host_dir(host))
        try:
            assert client.request({"t": "hello", "rid": 1, "mac": mac_bytes(plab.tap_mac_of(host))})["t"] == "welcome"
            got[host] = client.request({"t": "key_req", "rid": 2, "peer_mac": mac_bytes(plab.tap_mac_of(other))})
        finally:
            client.close()
    for host, other in (("h3", "h1"), ("h1", "h3")):
        answer = got[host]
        assert answer["t"] == "key" and answer["peer_id"] == other, answer
        assert (answer["pw_id"], answer["key"]) == newest


def test_a_host_of_ks_b_gets_no_key_of_a_pair_it_is_not_part_of(plab):
    log_before = len(plab.log_text("ks2"))
    client = KeyServerClient(plab.ns("h3"), plab.addr_of("ks2"), plab.host_dir("h3"))
    try:
        assert client.request({"t": "hello", "rid": 1, "mac": mac_bytes(plab.tap_mac_of("h3"))})["t"] == "welcome"
        answer = client.request({"t": "key_req", "rid": 2, "peer_mac": mac_bytes(plab.tap_mac_of("h2")),
                                 "my_mac": mac_bytes(plab.tap_mac_of("h1"))})
    finally:
        client.close()
    assert (answer["t"], answer["code"]) == ("error", "forbidden") and "key" not in answer, answer
    wait_for("a WARNING about h3 in KS-B's log",
             lambda: [ln for ln in plab.log_text("ks2")[log_before:].splitlines()
                      if "warning" in ln.lower() and "h3" in ln and "forbidden" in ln], timeout_s=5)
    # Nor straight at KS-A's peering port: h3's certificate (CA B, trusted there
    # for peering) is a host's, not a key server's.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(plab.ks_state("ks1") / "ca.crt")
    ctx.load_cert_chain(plab.host_dir("h3") / "host.crt", plab.host_dir("h3") / "host.key")
    raw = netns.create_socket(plab.ns("h3"), socket.AF_INET, socket.SOCK_STREAM, flags=0)
    raw.settimeout(10)
    raw.connect((plab.peer_addr_of("ks1").split(":")[0], int(plab.peer_addr_of("ks1").split(":")[1])))
    with ctx.wrap_socket(raw, server_hostname=KEYSERVER_TLS_NAME) as sock:
        sock.sendall(pm.encode_message({"t": "resolve", "rid": 7, "mac": mac_bytes(plab.tap_mac_of("h2")),
                                        "from_id": "h1", "hops": 0, "origin": []}))
        reader, answers = pm.FrameReader(), []
        while not answers:
            data = sock.recv(65536)
            assert data, "KS-A closed the peering connection without an answer"
            answers = reader.feed(data)
    assert (answers[0]["t"], answers[0]["code"]) == ("error", "unauthenticated") and "key" not in answers[0]


def test_a_rotation_at_the_follower_makes_the_leader_rotate_for_everyone(plab):
    """What `keyserverd host revoke` does to the multicast key at the follower."""
    leader, follower = sorted(("ks1", "ks2"), key=lambda n: plab.fingerprints[n])
    before = wait_for("agreement", lambda: agreed(plab), timeout_s=30)
    res = plab.keyserverd("rekey", "--multicast", ks=follower)
    assert res.returncode == 0, res.stdout + res.stderr
    now = wait_for("one new multicast key at both servers and every agent",
                   lambda: (agreed(plab) or 0) > before + 1 and agreed(plab), timeout_s=60)
    assert now == before + 2  # the follower's own version, then the leader's above it
    assert plab.ks_status(leader)["rotations"].get("multicast_peer", 0) >= 2
    for host in ("h1", "h3"):
        plab.exec(host, ["ip", "neigh", "flush", "dev", L.TAP_IFNAME], check=True)
    res = ping(plab, "h3", L.tap_ipv4("h1"), count=3)
    assert res.returncode == 0, res.stdout + res.stderr
