# A revocation reaches every holder of the revoked host's keys (issue 15,
# finding 2): one whose key server was down, one that was disconnected when
# the push went out, and one at a peered key server.
#
# One key server (tests a and b):
#
#        l2c-ks-<s>: keyserverd 10.67.0.1:7788 on mbr0
#        |  management veths (mgmt0 10.67.0.1x)                     |
#      h1         h2         h3 (revoked in a)      h4 (revoked in b)
#      |          |          |                      |
#      +---------- br0 in l2c-sw-<s> (the switch) --+
#
# Two peered key servers (test c), each with its own CA:
#
#        KS-A 10.67.0.1:7788 (h1, h2)  <-- peering :7790 -->  KS-B 10.67.0.2:7788 (h3, h4)
#        h1 h2 h3 h4 on one br0; KS-A knows h3,h4 as KS-B's host IDs and back.
#
# In each test the revoked host pings two others in the background.  Its frames
# must stop being opened (the drop counter revoked_sender moves at the others
# and its own ping then fails) within 5 s of the key server, or the agent,
# being back, while two remaining hosts still ping each other.  The revoked
# hosts stay revoked: each test revokes its own.

from __future__ import annotations

import re
import time

import pytest

from helpers import drop, ping, skip_reason, wait_for
from l2crypt.lab import segment as L
from l2crypt.lab.peered import PeeredLab

pytestmark = pytest.mark.lab

BACK_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = L.Lab(state_dir=tmp_path_factory.mktemp("revokelab"), hosts=("h1", "h2", "h3", "h4"))
    try:
        the_lab.up(timeout_s=120)
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = PeeredLab(state_dir=tmp_path_factory.mktemp("revokeplab"), hosts=("h1", "h2", "h3", "h4"),
                        ks2_hosts=("h3", "h4"))
    try:
        the_lab.up(timeout_s=150)
        yield the_lab
    finally:
        the_lab.down()


# --- helpers -------------------------------------------------------------------


def _revoked_pings(lab, revoked: str, others: tuple[str, ...]) -> list[L.Proc]:
    """``revoked`` pings each of ``others`` every 0.2 s (after one warm-up round)."""
    for other in others:
        res = ping(lab, revoked, L.tap_ipv4(other), count=2)
        assert res.returncode == 0, f"{revoked} -> {other} before the revocation: {res.stdout}{res.stderr}"
    return [lab.popen(revoked, ["ping", "-4", "-n", "-i", "0.2", "-c", "400", "-W", "1", L.tap_ipv4(other)],
                      name=f"ping-revoked-{revoked}-{other}") for other in others]


def _dropping(lab, revoked_mac: str, others: tuple[str, ...], before: dict[str, int]) -> bool:
    """Every host of ``others`` refuses the revoked host's frames now."""
    for host in others:
        st = lab.status(host)
        if revoked_mac not in st["revoked_peers"] or drop(st, "revoked_sender") <= before[host]:
            return False
    return True


def _frames_from(lab, host: str, mac: str) -> int:
    """Frames ``host`` opened from ``mac`` (0 once it forgot that peer)."""
    entry = next((p for p in lab.status(host)["peers"] if p["mac"] == mac), None)
    return entry["frames_in"] if entry else 0


def _baseline(lab, hosts: tuple[str, ...]) -> dict[str, int]:
    return {h: drop(lab.status(h), "revoked_sender") for h in hosts}


def _cut_off(lab, revoked: str, others: tuple[str, ...], revoked_mac: str, back_at: float,
             pings: list[L.Proc], what: str, before: dict[str, int]) -> float:
    """Wait (up to ``BACK_WITHIN_S`` after ``back_at``) until ``others`` drop the
    revoked host's frames (``revoked_sender`` above ``before``); check it can
    reach none of them.  The seconds it took."""
    try:
        wait_for(f"{', '.join(others)} to drop {revoked}'s frames after {what}",
                 lambda: _dropping(lab, revoked_mac, others, before),
                 timeout_s=max(0.5, back_at + BACK_WITHIN_S - time.monotonic()), every_s=0.1)
        took = time.monotonic() - back_at
    finally:
        for p in pings:
            lab.stop(p)
    for other in others:
        res = ping(lab, revoked, L.tap_ipv4(other), count=3)
        assert res.returncode != 0 and " 0 received" in res.stdout, res.stdout
    return took


def _still_talk(lab, a: str, b: str) -> None:
    """Positive control: two hosts that were not revoked."""
    for src, dst in ((a, b), (b, a)):
        res = ping(lab, src, L.tap_ipv4(dst), count=3)
        assert res.returncode == 0 and " 3 received" in res.stdout, f"{src} -> {dst}: {res.stdout}{res.stderr}"


# --- (a) revoked while the key server is down --------------------------------------


def test_a_revoked_while_the_key_server_is_down(lab):
    revoked, others = "h3", ("h1", "h2")
    mac = lab.status(revoked)["mac"]
    pings = _revoked_pings(lab, revoked, others)
    try:
        time.sleep(1)
        before = _baseline(lab, others)
        lab.kill_keyserver()
        res = lab.keyserverd("host", "revoke", revoked)  # the CLI writes the store itself
        assert res.returncode == 0, res.stdout + res.stderr
        for host in others:  # nobody told them yet
            assert mac not in lab.status(host)["revoked_peers"]
        lab.start_keyserver()
        back = time.monotonic()
    except BaseException:
        for p in pings:
            lab.stop(p)
        raise
    took = _cut_off(lab, revoked, others, mac, back, pings, "the key server started", before)
    print(f"\nREVOKED WHILE THE KEY SERVER WAS DOWN: {revoked}'s frames dropped {took:.1f} s after it started")
    _still_talk(lab, "h1", "h2")


# --- (b) revoked while an agent is disconnected ---------------------------------------


def test_b_revoked_while_an_agent_is_disconnected(lab):
    revoked, away, present = "h4", "h2", "h1"
    mac = lab.status(revoked)["mac"]
    pings = _revoked_pings(lab, revoked, (present, away))
    try:
        before = _baseline(lab, (present, away))
        lab.exec(away, ["ip", "link", "set", L.MGMT_IFNAME, "down"], check=True)
        try:
            # The key client probes every 5 s and gives up after 5 s more.
            wait_for(f"{away} to notice it lost the key server",
                     lambda: not lab.status(away)["connected"], timeout_s=30, every_s=0.5)
            res = lab.keyserverd("host", "revoke", revoked)
            assert res.returncode == 0, res.stdout + res.stderr
            # The connected host gets the push at once; the one away does not.
            wait_for(f"{present} to drop {revoked}'s frames",
                     lambda: _dropping(lab, mac, (present,), before), timeout_s=BACK_WITHIN_S)
            # ... and still opens the revoked host's frames.
            first = _frames_from(lab, away, mac)
            wait_for(f"{away} to go on opening {revoked}'s frames", lambda: _frames_from(lab, away, mac) > first,
                     timeout_s=5)
            assert mac not in lab.status(away)["revoked_peers"]
        finally:
            lab.exec(away, ["ip", "link", "set", L.MGMT_IFNAME, "up"], check=True)
        wait_for(f"{away} to reconnect", lambda: lab.status(away)["connected"], timeout_s=40, every_s=0.2)
        back = time.monotonic()
    except BaseException:
        for p in pings:
            lab.stop(p)
        raise
    took = _cut_off(lab, revoked, (away,), mac, back, pings, f"{away} reconnected", before)
    print(f"\nREVOKED WHILE {away} WAS AWAY: it dropped {revoked}'s frames {took:.1f} s after it reconnected")
    log = lab.log_text(f"agent-{away}")
    assert re.search(rf"peer_revoked peer_mac={mac}", log), log[-2000:]
    _still_talk(lab, "h1", "h2")


# --- (c) revoked at a peered key server --------------------------------------------------


def test_c_revoked_at_a_peered_key_server(plab):
    """h4 (KS-B) is revoked at KS-B; h1 and h2 (KS-A) hold pair keys with it."""
    revoked, others = "h4", ("h1", "h2")
    mac = plab.status(revoked)["mac"]
    pings = _revoked_pings(plab, revoked, others)
    try:
        time.sleep(1)
        before = _baseline(plab, others)
        res = plab.keyserverd("host", "revoke", revoked, ks="ks2")
        assert res.returncode == 0, res.stdout + res.stderr
        back = time.monotonic()
    except BaseException:
        for p in pings:
            plab.stop(p)
        raise
    took = _cut_off(plab, revoked, others, mac, back, pings, "its revocation at KS-B", before)
    print(f"\nREVOKED AT THE PEER: KS-A's hosts dropped {revoked}'s frames {took:.1f} s after the revocation")
    assert re.search(rf"peer_host_revoked .*host={revoked}\b", plab.log_text("keyserverd")), \
        plab.log_text("keyserverd")[-2000:]
    _still_talk(plab, "h1", "h3")  # across the peering, still fine


def test_c_revoked_at_a_peer_while_our_key_server_is_down(plab):
    """h3 (KS-B) is revoked at KS-B while KS-A is down; KS-A learns it when it starts."""
    revoked, others = "h3", ("h1", "h2")
    mac = plab.status(revoked)["mac"]
    pings = _revoked_pings(plab, revoked, others)
    try:
        time.sleep(1)
        before = _baseline(plab, others)
        plab.kill_keyserver()  # KS-A
        res = plab.keyserverd("host", "revoke", revoked, ks="ks2")
        assert res.returncode == 0, res.stdout + res.stderr
        for host in others:  # nobody told them yet
            assert mac not in plab.status(host)["revoked_peers"]
        plab.start_ks("ks1")
        back = time.monotonic()
    except BaseException:
        for p in pings:
            plab.stop(p)
        raise
    took = _cut_off(plab, revoked, others, mac, back, pings, "KS-A started", before)
    print(f"\nREVOKED AT THE PEER WHILE KS-A WAS DOWN: dropped {took:.1f} s after KS-A started")
    _still_talk(plab, "h1", "h2")
