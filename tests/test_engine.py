"""The frame engine over in-memory fakes: no kernel, milliseconds.

Topology: three EngineHosts (an engine behind the agent's frame path,
``FramePump``, on channel ports) on a FakeSwitch (a hub that records a
capture); a tiny in-test key server hands out pair keys by MAC.

The end-to-end scenarios with the real agents and key server (unicast after a
key miss, broadcast, unknown MAC, replay, rekey during traffic) are in
tests/scenarios.py, run over fakes and in the namespace lab.
"""

import os

import pytest

from l2crypt.core import engine as engine_mod
from l2crypt.agent.frame_pump import FramePump
from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.io.fakes import ChannelPort, ChannelTap, FakeSwitch

H1 = bytes.fromhex("020000000001")
H2 = bytes.fromhex("020000000002")
H3 = bytes.fromhex("020000000003")
BCAST = b"\xff" * 6
MARKER = b"PLAINTEXT-MARKER-4f1d"
MCAST_KEY = bytes(range(32, 64))


def ip_frame(dst, src, payload=MARKER * 3):
    return dst + src + b"\x08\x00" + payload


class EngineHost:
    """An engine behind the agent's frame path (``FramePump``) on a channel TAP and wire port."""

    def __init__(self, mac, settings=EngineSettings()):
        self.engine = FrameEngine(mac, settings)
        self.tap = ChannelTap("tap", mac)
        self.wire = ChannelPort("wire")
        self.now = 0.0
        self.frames = FramePump(self.engine, self.tap, self.wire, lambda: self.now, lambda now: None)
        self.key_requests: list[bytes] = []

    def pump(self, now):
        """One loop turn: both ports served, the engine's timers, its key requests collected."""
        self.now = now
        self.frames.on_tap_readable()
        self.frames.on_wire_readable()
        self.engine.on_timer(now)
        self.key_requests.extend(self.engine.take_key_requests(now))

    def deliver(self, delivered):
        self.frames.deliver(delivered)


class Segment:
    """Hosts, a switch, and a key server that knows every host."""

    def __init__(self, settings=EngineSettings(), macs=(H1, H2, H3)):
        self.switch = FakeSwitch()
        self.hosts = {}
        self.pair_keys = {}
        self.requests = []
        for i, mac in enumerate(macs):
            host = EngineHost(mac, settings)
            host.engine.install_multicast_key(MCAST_KEY, 1, 0.0)
            self.switch.attach(host.wire)
            self.hosts[mac] = host
        self.ids = {mac: f"h{i + 1}" for i, mac in enumerate(macs)}

    def pump(self, now=0.0, answer=True, rounds=4):
        for _ in range(rounds):
            for host in self.hosts.values():
                host.pump(now)
            self.switch.carry()
            if answer:
                self.answer(now)

    def answer(self, now):
        for mac, host in self.hosts.items():
            while host.key_requests:
                peer = host.key_requests.pop(0)
                self.requests.append((mac, peer))
                if peer not in self.ids:
                    host.engine.mark_unknown(peer, now)
                    continue
                pair = tuple(sorted((mac, peer)))
                key = self.pair_keys.setdefault(pair, os.urandom(32))
                host.deliver(host.engine.install_pair_key(peer, self.ids[peer], key, 1, now))


def test_request_retries_with_backoff_then_gives_up_when_idle():
    settings = EngineSettings(key_retry_s=0.5, key_retry_max_s=2.0, hold_age_s=3.0)
    host = EngineHost(H1, settings)
    host.tap.inbox.append(ip_frame(H2, H1))
    times = [0.0, 0.1, 0.5, 0.6, 1.5, 2.9, 3.5, 10.0]
    for t in times:
        host.pump(t)
    # requests at 0.0, 0.5, 1.5 (backoff 0.5, 1.0), then the frame aged out at 3.0
    assert host.key_requests == [H2, H2, H2]
    assert host.engine.drops[engine_mod.HOLD_EXPIRED] == 1
    assert not host.engine.holds.pending


def test_hold_queue_is_bounded():
    host = EngineHost(H1, EngineSettings(hold_frames=3))
    for i in range(10):
        host.tap.inbox.append(ip_frame(H2, H1, bytes([i]) * 30))
    host.pump(0.0)
    assert host.engine.drops[engine_mod.HOLD_OVERFLOW] == 7
    assert len(host.engine.holds.pending[H2].held) == 3


def test_receiver_without_key_holds_and_opens_after_answer():
    seg = Segment()
    key = os.urandom(32)
    h1, h2 = seg.hosts[H1], seg.hosts[H2]
    h1.engine.install_pair_key(H2, "h2", key, 1, 0.0)
    seg.pair_keys[(H1, H2)] = key
    h1.tap.inbox.append(ip_frame(H2, H1))
    seg.pump(0.0)
    assert h2.engine.counters["held"] == 1
    assert len(h2.tap.outbox) == 1


def test_forged_frames_are_dropped_and_counted():
    seg = Segment()
    seg.hosts[H1].tap.inbox.append(ip_frame(H2, H1))
    seg.pump()
    real = seg.switch.capture[-1]
    h2 = seg.hosts[H2]
    before = len(h2.tap.outbox)
    pn = int.from_bytes(real[20:28], "big")

    def fresh(frame, k):  # the same frame under a packet number not seen yet
        return frame[:20] + (pn + k).to_bytes(8, "big") + frame[28:]

    forged = [
        fresh(real[:28] + os.urandom(len(real) - 28), 1),         # random body: bad tag
        fresh(real[:-1] + bytes([real[-1] ^ 1]), 2),              # bit flip in the tag
        fresh(real, 3),                                           # PN changed: AAD mismatch
        fresh(real[:50], 4),                                      # truncated body: bad tag
        real[:30],                                                # truncated below minimum
        real[:14] + b"\x09" + real[15:],                          # unknown version
        real[:15] + b"\x07" + real[16:],                          # unknown key id
        real,                                                     # replay
        real[:40] + bytes([real[40] ^ 4]) + real[41:],            # bit flip, old PN: replayed first
    ]
    for frame in forged:
        h2.wire.inbox.append(frame)
    h2.pump(1.0)
    assert len(h2.tap.outbox) == before
    drops = h2.engine.drops
    assert drops[engine_mod.BAD_TAG] == 4
    assert drops["truncated"] == 1
    assert drops["unknown_version"] == 1
    assert drops[engine_mod.UNKNOWN_KEY_ID] == 1
    assert drops[engine_mod.REPLAYED] == 2


def test_forged_huge_packet_number_does_not_poison_the_window():
    seg = Segment()
    seg.hosts[H1].tap.inbox.append(ip_frame(H2, H1))
    seg.pump()
    real = seg.switch.capture[-1]
    h2 = seg.hosts[H2]
    forged = real[:20] + (2**63).to_bytes(8, "big") + real[28:]
    h2.wire.inbox.append(forged)
    h2.pump(1.0)
    assert h2.engine.drops[engine_mod.BAD_TAG] == 1
    seg.hosts[H1].tap.inbox.append(ip_frame(H2, H1, b"after" * 10))
    seg.pump(1.0)
    assert h2.tap.outbox[-1].endswith(b"after" * 10)


def test_frames_for_other_hosts_and_own_frames_are_ignored():
    seg = Segment()
    seg.hosts[H1].tap.inbox.append(ip_frame(H2, H1))
    seg.pump()
    assert seg.hosts[H3].engine.drops[engine_mod.NOT_FOR_US] == 1
    seg.hosts[H1].wire.inbox.append(seg.switch.capture[-1])
    seg.hosts[H1].pump(1.0)
    assert seg.hosts[H1].engine.drops[engine_mod.OWN_FRAME] == 1


def test_runts_and_foreign_sources_are_not_sent():
    host = EngineHost(H1)
    host.tap.inbox.extend([b"\x00" * 20, ip_frame(H2, H3)])
    host.pump(0.0)
    assert not host.wire.outbox
    assert host.engine.drops[engine_mod.RUNT] == 1
    assert host.engine.drops[engine_mod.FOREIGN_SOURCE] == 1


def test_broadcast_waits_for_the_multicast_key():
    host = EngineHost(H1, EngineSettings(hold_age_s=2.0))
    arp = BCAST + H1 + b"\x08\x06" + b"\x00" * 28
    host.tap.inbox.extend([arp, arp])
    host.pump(0.0)
    assert not host.wire.outbox                                   # never in clear
    assert host.key_requests == [engine_mod.GROUP_MAC]            # asks for the multicast key
    host.deliver(host.engine.install_multicast_key(MCAST_KEY, 1, 0.5))
    assert len(host.wire.outbox) == 2 and all(f[15] == 2 for f in host.wire.outbox)
    host.tap.inbox.append(arp)
    host.pump(10.0)                                               # too late for nobody: nothing dropped
    assert not host.engine.drops


def test_broadcast_held_too_long_is_dropped_and_counted():
    host = EngineHost(H1, EngineSettings(hold_age_s=2.0))
    host.tap.inbox.append(BCAST + H1 + b"\x08\x06" + b"\x00" * 28)
    host.pump(0.0)
    host.pump(3.0)
    assert not host.wire.outbox
    assert host.engine.drops[engine_mod.HOLD_EXPIRED] == 1


def test_reinstalling_the_same_version_keeps_the_counter():
    host = EngineHost(H1)
    host.engine.send_pn = 100
    key = os.urandom(32)
    host.engine.install_pair_key(H2, "h2", key, 1, 0.0)
    host.tap.inbox.append(ip_frame(H2, H1))
    host.pump(0.0)
    host.engine.install_pair_key(H2, "h2", key, 1, 1.0)  # a repeated answer
    host.tap.inbox.append(ip_frame(H2, H1))
    host.pump(1.0)
    pns = [int.from_bytes(f[20:28], "big") for f in host.wire.outbox]
    assert pns == [100, 101]


def test_snapshot_holds_no_key_material():
    seg = Segment()
    seg.hosts[H1].tap.inbox.append(ip_frame(H2, H1))
    seg.pump()
    text = repr(seg.hosts[H1].engine.snapshot(5.0))
    for key in list(seg.pair_keys.values()) + [MCAST_KEY]:
        assert key.hex() not in text and repr(key) not in text
    assert "02:00:00:00:00:02" in text


def test_cipher_switch_drops_old_keys():
    host = EngineHost(H1)
    host.engine.install_pair_key(H2, "h2", os.urandom(32), 1, 0.0)
    assert engine_mod.use_cipher(host.engine, "chacha20-poly1305")
    assert not host.engine.peers
    with pytest.raises(ValueError):
        engine_mod.use_cipher(host.engine, "rot13")


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_both_ciphers_work(cipher):
    seg = Segment(EngineSettings(cipher=cipher))
    frame = ip_frame(H3, H2)
    seg.hosts[H2].tap.inbox.append(frame)
    seg.pump()
    assert list(seg.hosts[H3].tap.outbox) == [frame]
