"""The one daemon shell (``l2crypt.ops.daemon_shell``) and the three daemons on it,
without root: the real ``Agent``, ``L3Agent`` and ``Gateway`` objects, built from
their configs and an enrolled state directory, on in-memory ports
(``l2crypt.io.fakes``), run tick cycles through the shell.

    h1's Agent --ChannelTap/ChannelPort-- FakeSwitch --ChannelPort/ChannelTap-- h2's Agent

The gateway's test also checks that every engine tuning key of its config
reaches its engines (it used the defaults for rekey_after_frames,
max_pending_keys and key_requests_per_s before the shared ``FrameTuning``).
"""

import asyncio
import logging
from collections import Counter
from types import SimpleNamespace

from gateway.config import GatewayConfig
from gateway.daemon import Gateway
from l2crypt.agent.agent import Agent
from l2crypt.agent.config import AgentConfig
from l2crypt.core.replay_floor import FloorBook, decode_file
from l2crypt.io.fakes import ChannelPort, ChannelTap, FakeSwitch
from l2crypt.io.state_file import FloorFile
from l2crypt.l3.agent import L3Agent
from l2crypt.l3.config import L3AgentConfig
from l2crypt.ops import daemon_shell
from l2crypt.ops.daemon_shell import MIN_SLEEP_S, TICK_CAP_S, DaemonShell, FloorSave
from test_gateway_core import GA, MARKER, MCAST_A, P1, arp, frame, pair_key
from test_gateway_operations import enrolled_state_dir

H1 = bytes.fromhex("024c32000011")
H2 = bytes.fromhex("024c32000012")
KS = ("127.0.0.1:9",)  # nothing listens: the key clients are built, never run here


class FakeLoop:
    """The loop's clock, set by the test."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


def enrolled(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return str(enrolled_state_dir(d, name))


def agent_on(tmp_path, name, mac, switch, now, **tuning) -> Agent:
    agent = Agent(AgentConfig(port="eth0", servers=KS, state_dir=enrolled(tmp_path, name), wire_mtu=1500,
                              metrics_listen="", **tuning))
    agent._loop = FakeLoop(now)
    wire = ChannelPort("wire")
    switch.attach(wire)
    agent.start(ChannelTap("l2c0", mac), lambda: (wire, "fake"), now)
    return agent


def test_two_agents_pass_a_frame_and_tick_through_the_shell(tmp_path):
    switch = FakeSwitch()
    a1 = agent_on(tmp_path, "h1", H1, switch, 100.0, rekey_after_frames=5000, hold_age_s=1.0)
    a2 = agent_on(tmp_path, "h2", H2, switch, 100.0)
    assert a1.engine.settings.rekey_after_frames == 5000 and a1.engine.settings.hold_age_s == 1.0
    shell = DaemonShell(a1, a1.config.socket_path, "")
    # A frame to h2 before any key: held, a key request raised (the client is not connected).
    a1.tap.inbox.append(frame(H2, H1))
    a1.pump.on_tap_readable()
    assert H2 in a1.engine.holds.pending and a1.engine.counters["held"] == 1
    deadline = a1.next_deadline()
    assert deadline is not None and MIN_SLEEP_S <= shell.sleep_s(100.0) <= TICK_CAP_S
    # The key arrives on both sides: the held frame leaves sealed and reaches h2's TAP.
    a2.on_key(H1, "h1", pair_key("h1", "h2"), 1)
    a1.on_key(H2, "h2", pair_key("h1", "h2"), 1)
    assert switch.carry() == 1 and MARKER not in switch.capture[0]
    a2.pump.on_wire_readable()
    assert list(a2.tap.outbox) == [frame(H2, H1)]
    # Tick cycles: floors saved when due, the clock reserved after PERSIST_INTERVAL_S.
    limit = a1.engine.pn_limit
    for t in (100.2, 100.7, 101.3):
        a1._loop.now = t
        shell.tick(t)
    assert shell.ticks == 3 and a1.floors.saved_at == 101.3  # 100.2 (due), 100.7 (due), 101.3 (due)
    assert a1.engine.pn_limit >= limit and a1.clock.reserved == a1.engine.pn_limit
    # A frame held past hold_age_s is dropped at a tick, and the drop is logged once.
    a1.tap.inbox.append(frame(bytes.fromhex("024c32000099"), H1))
    a1.pump.on_tap_readable()
    shell.tick(103.0)
    assert a1.all_drops()["hold_expired"] == 1


def test_the_layer3_agent_ticks_through_the_shell(tmp_path):
    cfg = L3AgentConfig(servers=KS, addresses=("10.71.0.2",), prefixes=("10.72.0.0/24",),
                        state_dir=enrolled(tmp_path, "l3a"), metrics_listen="", rekey_after_frames=4000,
                        max_pending_keys=10, key_requests_per_s=5.0)
    agent = L3Agent(cfg)
    agent._loop = FakeLoop(50.0)
    agent.start(50.0)
    s = agent.engine.settings
    assert (s.rekey_after_frames, s.max_pending_keys, s.key_requests_per_s) == (4000, 10, 5.0)
    shell = DaemonShell(agent, cfg.socket_path, "")
    assert shell.sleep_s(50.0) == TICK_CAP_S  # no timer pending
    shell.tick(50.6)
    assert shell.ticks == 1 and agent.floors.saved_at == 50.6
    assert agent.floor_saves()[0].file.path.name == "l3_replay_floors"


def test_the_gateways_tuning_reaches_every_engine_and_it_ticks_through_the_shell(tmp_path):
    cfg = GatewayConfig(encrypted_port="eth0", plain_port="plain0", servers=KS, state_dir=enrolled(tmp_path, "gA"),
                        metrics_listen="", rekey_after_frames=777, max_pending_keys=99, key_requests_per_s=7.0,
                        key_max_age_s=600.0, hold_frames=3, replay_window_frames=128, retire_after_s=9.0)
    gw = Gateway(cfg)
    gw._loop = FakeLoop(10.0)
    gw.enc, gw.plain = ChannelPort("eth0"), ChannelPort("plain0")
    gw.start(GA, 10.0)
    gw.on_multicast(MCAST_A, 1)
    # p1 speaks on the plain side: learned, mapped, a virtual engine speaks for it.
    gw.plain.inbox.append(arp(P1))
    gw._on_plain()
    gw.on_mapped(P1, "plain")
    engines = list(gw.core.engines())
    assert len(engines) == 2
    for engine in engines:
        s = engine.settings
        assert (s.rekey_after_frames, s.max_pending_keys, s.key_requests_per_s, s.hold_frames,
                s.replay_window_frames, s.retire_after_s) == (777, 99, 7.0, 3, 128, 9.0)
        assert engine.key_max_age_s == 600.0
    assert gw.core.tunnel.retire_after_s == 9.0 and gw.core.tunnel.window_frames == 128
    assert len(gw.enc.outbox) == 1  # p1's ARP, sealed onto the segment
    shell = DaemonShell(gw, cfg.socket_path, "")
    assert gw.core.next_deadline() is not None  # p1 ages out some day
    shell.tick(10.6)
    assert shell.ticks == 1 and gw.floors.saved_at == 10.6


class StubDaemon:
    """The smallest ``Daemon``: one floor book, a timer every 20 ms, a key client that waits."""

    name, unit = "stub", "frames"
    log = logging.getLogger("l2crypt.test_stub")

    def __init__(self, state_dir):
        self.book, self.file = FloorBook(), FloorFile(state_dir)
        self.client = SimpleNamespace(run=lambda stop: stop.wait())
        self.ticks: list[float] = []
        self.reserved = 0
        self.drops = Counter(bad_tag=2)

    def readers(self):
        return []

    def floor_saves(self):
        return [FloorSave(self.file, self.book, lambda: [(b"peer", 41)])]

    def tick(self, now):
        self.ticks.append(now)

    def next_deadline(self):
        return (self.ticks[-1] if self.ticks else 0.0) + 0.02

    def reserve(self):
        self.reserved += 1

    def all_drops(self):
        return self.drops

    def snapshot(self):
        return {"ok": True}

    def metrics(self, now):
        return []

    def started_fields(self):
        return {"id": "stub"}

    def stopped_fields(self):
        return {}


def test_serve_ticks_at_the_next_deadline_and_cleans_up(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(daemon_shell, "DROP_LOG_S", 0.05)
    stub = StubDaemon(tmp_path)
    shell = DaemonShell(stub, tmp_path / "stub.sock", "")

    async def main():
        task = asyncio.ensure_future(shell.serve())
        await asyncio.sleep(0.3)
        assert (tmp_path / "stub.sock").exists()
        shell.stop.set()
        await task

    with caplog.at_level(logging.INFO, logger="l2crypt.test_stub"):
        asyncio.run(main())
    # A deadline 20 ms ahead wakes the loop more often than the 100 ms cap would.
    assert len(stub.ticks) >= 6, stub.ticks
    assert stub.reserved >= 1  # at the stop
    bounds, stopped = decode_file(stub.file.path.read_bytes())
    assert stopped and bounds[b"peer"] >= 41  # saved as a clean stop, with the highest number
    assert not (tmp_path / "stub.sock").exists()
    events = [r.getMessage() for r in caplog.records]
    assert events[0] == "stub_started" and events[-1] == "stub_stopped"
    assert events.count("frames_dropped") == 1  # new drops once, not again while unchanged


def client_settings(client) -> tuple:
    s = client.schedule
    return (client.probe_interval_s, client.selector.probe_failures, client.selector.failback_holddown_s,
            s.jitter_s, s.max_s)


def test_every_daemon_hands_its_failover_and_reconnect_keys_to_its_key_client(tmp_path):
    keys = dict(probe_interval_s=2.5, probe_failures=5, failback_holddown_s=12.0,
                reconnect_jitter_s=0.3, reconnect_max_s=40.0)
    want = (2.5, 5, 12.0, 0.3, 40.0)
    agent = agent_on(tmp_path, "h1", H1, FakeSwitch(), 1.0, **keys)
    assert client_settings(agent.client) == want
    l3 = L3Agent(L3AgentConfig(servers=KS, addresses=("10.71.0.2",), prefixes=("10.72.0.0/24",),
                               state_dir=enrolled(tmp_path, "l3a"), metrics_listen="", **keys))
    l3._loop = FakeLoop(1.0)
    l3.start(1.0)
    assert client_settings(l3.client) == want
    gw = Gateway(GatewayConfig(encrypted_port="eth0", plain_port="plain0", servers=KS,
                               state_dir=enrolled(tmp_path, "gA"), metrics_listen="", **keys))
    gw._loop = FakeLoop(1.0)
    gw.enc, gw.plain = ChannelPort("eth0"), ChannelPort("plain0")
    gw.start(GA, 1.0)
    assert client_settings(gw.client) == want
