# Replay after the receiver restarts (issue 15, High 1), on real kernels.
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788 on bridge mbr0
#            |  management veths (mgmt0 10.67.0.1x in each host)  |
#      +-----------+          +-----------+          +-----------+
#      | h1        |          | h2 (kill  |          | h3        |
#      | l2c0 TAP  |          | -9, then  |          | l2c0 TAP  |
#      | agent     |          | restarted)|          | agent     |
#      | eth0      |          | eth0      |          | eth0      |
#      +----|------+          +----|------+          +----|------+
#      +----|----------------------|----------------------|------+
#      |            br0 in l2c-sw-<s> (the switch, captured)      |
#      +----|----------------------------------------------------+
#           pi-<s> -- eth0 of l2c-in-<s>: the intruder, no certificate
#
# The intruder records h1's sealed frames on the switch (unicast pings to h2,
# and broadcast pings), h2's agent is killed with SIGKILL and started again
# (its keys come back from the key server with the same PW_ID), and the
# intruder replays the recording.  h2's replay floors (state_dir/replay_floors)
# make every replayed frame count as `replayed`; none reaches h2's TAP.  A
# genuine ping after the restart still works.  f3b867d delivered the replay.

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import drop, l2c_frames, peer, ping, wait_for
from hostile import marker_count
from l2crypt.core.replay_floor import MAX_UNSAVED_S, SAVE_INTERVAL_S, SLACK_S
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

REPLAY_MARKER = b"L2C-REPLAY-AFTER-RESTART-7d2"   # in the recorded frames
LIVE_MARKER = b"L2C-GENUINE-AFTER-RESTART-91b"    # in the positive control


def _pattern(marker: bytes) -> list[str]:
    return ["-p", marker[:16].hex()]


def _record(lab, src, dst_addr, count, extra=()):
    """h1's sealed frames on the switch while it pings ``dst_addr`` with the replay marker."""
    cap = lab.capture("br0", name=f"tcpdump-record-{os.urandom(2).hex()}")
    try:
        ping(lab, src, dst_addr, count=count, extra=["-i", "0.05", *_pattern(REPLAY_MARKER), *extra])
    finally:
        frames = L.read_pcap(cap.stop())
    return frames


def _kill_9_and_restart(lab, host):
    agent = lab.proc(f"agent-{host}")
    status = lab.restart_agent(host, sig=signal.SIGKILL)
    assert not agent.alive()
    return status


def _settled(lab, host, before, more):
    """``host``'s status once ``more`` frames were refused as replayed or opened
    (f3b867d opened them)."""
    def done(st):
        refused = drop(st, "replayed") - drop(before, "replayed")
        opened = st["counters"]["opened"] - before["counters"]["opened"]
        return st if refused + opened >= more else None
    return wait_for(f"{host} to refuse or open {more} more frames", lambda: done(lab.status(host)), timeout_s=15)


def test_captured_unicast_frames_do_not_open_after_the_receiver_restarts(lab):
    h1_mac, h2_mac = lab.status("h1")["mac"], lab.status("h2")["mac"]
    recorded = l2c_frames(_record(lab, "h1", L.tap_ipv4("h2"), count=12), src=h1_mac, dst=h2_mac)
    assert len(recorded) >= 12 and marker_count(recorded, REPLAY_MARKER) == 0  # sealed: no marker in clear
    killed_at = time.monotonic()
    _kill_9_and_restart(lab, "h2")
    tap = lab.capture(L.TAP_IFNAME, role="h2", name=f"tcpdump-h2-tap-{os.urandom(2).hex()}")
    try:
        before = lab.status("h2")
        # The first frame makes h2 ask for h1's key (the same key and PW_ID as
        # before the crash); the rest meet the restored window directly.
        lab.inject(recorded[:1])
        wait_for("h2 to hold h1's key again", lambda: peer(lab.status("h2"), h1_mac), timeout_s=10)
        lab.inject(recorded[1:])
        after = _settled(lab, "h2", before, len(recorded))
        # h1's genuine frames pass once its clock is past the restored floor: at
        # most SAVE_INTERVAL_S + MAX_UNSAVED_S + SLACK_S after h2's last save.
        time.sleep(max(0.0, killed_at + SAVE_INTERVAL_S + MAX_UNSAVED_S + SLACK_S - time.monotonic()))
        live = ping(lab, "h1", L.tap_ipv4("h2"), count=3, extra=_pattern(LIVE_MARKER))
    finally:
        tap_frames = L.read_pcap(tap.stop())
    assert marker_count(tap_frames, REPLAY_MARKER) == 0
    # Every recorded frame is refused; a genuine frame of h1 that arrives in
    # the restored floor's lead after the SIGKILL is refused too (at most a few).
    assert len(recorded) <= drop(after, "replayed") - drop(before, "replayed") <= len(recorded) + 3
    assert peer(after, h1_mac)["frames_in"] == 0  # nothing of the replay opened
    assert (lab.host_dir("h2") / "replay_floors").exists()
    # Positive control: a genuine ping after the restart goes through, and the
    # TAP capture sees it.
    assert live.returncode == 0 and "3 received" in live.stdout, live.stdout
    assert marker_count(tap_frames, LIVE_MARKER) >= 3


def test_captured_broadcast_frames_do_not_open_after_the_receiver_restarts(lab):
    h1_mac = lab.status("h1")["mac"]
    frames = _record(lab, "h1", "10.66.0.255", count=8, extra=["-b"])
    recorded = l2c_frames(frames, src=h1_mac, dst="ff:ff:ff:ff:ff:ff")
    assert len(recorded) >= 8
    _kill_9_and_restart(lab, "h2")
    tap = lab.capture(L.TAP_IFNAME, role="h2", name=f"tcpdump-h2-tap-{os.urandom(2).hex()}")
    try:
        before = lab.status("h2")
        assert before["multicast_pw_id"] == int.from_bytes(recorded[0][16:20], "big")  # the same key came back
        lab.inject(recorded)
        after = _settled(lab, "h2", before, len(recorded))
        # Ten pings over 2 s: the first may still fall in the restored floor's
        # lead (see the replayed bound below).  Nobody answers a broadcast ping,
        # so ping returns while its last frame may still be on its way: wait
        # until h2 opened three of them.
        live = ping(lab, "h1", "10.66.0.255", count=10, extra=["-b", *_pattern(LIVE_MARKER)])
        try:
            wait_for("h2 to open three of h1's genuine broadcasts",
                     lambda: lab.status("h2")["counters"]["opened"] - after["counters"]["opened"] >= 3, timeout_s=10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; h2 drops before the ping {after['drops']}, "
                                 f"now {lab.status('h2')['drops']}; ping: {live.stdout[-300:]}") from None
    finally:
        tap_frames = L.read_pcap(tap.stop())
    assert marker_count(tap_frames, REPLAY_MARKER) == 0
    # Every recorded frame is refused; a genuine frame of h1 that arrives in
    # the restored floor's lead after the SIGKILL is refused too (at most a few).
    assert len(recorded) <= drop(after, "replayed") - drop(before, "replayed") <= len(recorded) + 3
    # Positive control: h1's genuine broadcasts after the restart reach h2's TAP.
    assert marker_count(tap_frames, LIVE_MARKER) >= 3, live.stdout
