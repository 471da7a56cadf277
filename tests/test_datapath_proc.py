"""The datapath process (``datapath_process = true``, issue 13 step 5): the real
``Agent`` started on in-memory ports, its engine and pump driven by a
``DatapathWorker``, its key events crossing as messages.

    key events -> Agent -> ProcessDatapath ==socketpair== DatapathWorker -> engine, pump
                                                                            |       |
                                                                     ChannelTap  ChannelPort -- FakeSwitch

The first test turns the worker by hand (no fork); the others fork the real
datapath process over socketpair ports and kill it.
"""

import os
import signal
import time
from types import SimpleNamespace

import pytest

from l2crypt.agent.agent import Agent
from l2crypt.agent.config import AgentConfig
from l2crypt.agent.datapath_link import ProcessDatapath, RemoteEngine
from l2crypt.agent.datapath_proc import DatapathWorker
from l2crypt.core import datapath_msgs as msgs
from l2crypt.core.engine import GROUP_MAC, FrameEngine
from l2crypt.core.errors import LocalError
from l2crypt.core.replay_floor import decode_file
from l2crypt.io.fakes import ChannelPort, ChannelTap, FakeSwitch, SocketPort
from l2crypt.io.msg_channel import channel_pair
from test_gateway_core import MARKER, MCAST_A, frame, pair_key
from test_gateway_operations import enrolled_state_dir

H1 = bytes.fromhex("024c32000011")
H2 = bytes.fromhex("024c32000012")
H3 = bytes.fromhex("024c32000013")
KS = ("127.0.0.1:9",)  # nothing listens: the key client is built, never run here


def new_agent(tmp_path, now_fn) -> Agent:
    d = tmp_path / "h1"
    d.mkdir()
    agent = Agent(AgentConfig(port="eth0", servers=KS, state_dir=str(enrolled_state_dir(d, "h1")), wire_mtu=1500,
                              metrics_listen="", datapath_process=True))
    agent._loop = SimpleNamespace(time=now_fn)
    return agent


def peer_h2(now: float) -> FrameEngine:
    h2 = FrameEngine(H2)
    h2.install_pair_key(H1, "h1", pair_key("h1", "h2"), 1, now)
    return h2


def welcome() -> dict:
    return {"cipher": "aes-256-gcm", "multicast_key": MCAST_A, "multicast_pw_id": 4, "key_max_age_s": 3600,
            "revoked_macs": H3}


def test_key_events_reach_the_engine_only_as_messages(tmp_path):
    clock = SimpleNamespace(now=100.0)
    agent = new_agent(tmp_path, lambda: clock.now)
    switch, wire = FakeSwitch(), ChannelPort("wire")
    switch.attach(wire)
    agent.start(ChannelTap("l2c0", H1), lambda: (wire, "fake"), 100.0)
    engine, tap = agent.engine, agent.tap
    control_end, datapath_end = channel_pair()
    worker = DatapathWorker(engine, agent.pump, datapath_end, agent.local_floor_saves(), agent.local_reserve,
                            clock=lambda: clock.now)
    requests, notices = [], []
    link = ProcessDatapath(0, control_end, RemoteEngine(H1, {"snapshot": engine.snapshot(100.0), "counters": {}}),
                           requests.append, lambda *notice: notices.append(notice))
    agent.process = agent.driver = link
    agent.engine, agent.pump = link.view, None

    # A frame to h2 before its key: held in the datapath, its key request reaches the control side.
    tap.inbox.append(frame(H2, H1))
    worker.step(True, False, False, 100.0)
    link.on_readable()
    assert requests == [H2] and H2 in engine.holds.pending
    # The key server's answer, through the agent, crosses as one PairKey; the held frame leaves sealed.
    agent.on_key(H2, "h2", pair_key("h1", "h2"), 1)
    assert H2 not in engine.peers  # not yet: only the message went
    worker.step(False, False, True, 100.1)
    assert switch.carry() == 1 and MARKER not in switch.capture[0]
    assert peer_h2(100.1).open_from_wire(switch.capture[0], 100.1) == frame(H2, H1)
    # The welcome: cipher, key lifetime, a revocation, the multicast key, retries.
    agent.on_welcome(welcome())
    worker.step(False, False, True, 100.2)
    assert H3 in engine.revoked and engine.group.current.pw_id == 4 and engine.key_max_age_s == 3600
    # Stats: what status and metrics read in the control process.
    worker.send_stats(100.3)
    link.on_readable()
    assert agent.engine.counters["sealed"] == 1 and agent.stopped_fields()["sealed"] == 1
    assert agent.engine.snapshot(0)["multicast_pw_id"] == 4 and [p["mac"] for p in agent.engine.peers] == [
        "02:4c:32:00:00:12"]
    assert agent.readers() == [(control_end.fileno(), link.on_readable)] and agent.floor_saves() == []
    # The multicast key asked for by the datapath arrives as a KeyRequest for GROUP_MAC.
    worker._request_key(GROUP_MAC)
    link.on_readable()
    assert requests[-1] == GROUP_MAC
    # Stop, and a control process gone: the worker stops.
    link._send(msgs.Stop())
    worker.step(False, False, True, 100.4)
    assert worker.stopping
    worker.stopping = False
    control_end.close()
    worker.step(False, False, True, 100.5)
    assert worker.stopping


def test_a_message_the_other_way_is_refused(tmp_path):
    clock = SimpleNamespace(now=10.0)
    agent = new_agent(tmp_path, lambda: clock.now)
    agent.start(ChannelTap("l2c0", H1), lambda: (ChannelPort("wire"), "fake"), 10.0)
    _, datapath_end = channel_pair()
    worker = DatapathWorker(agent.engine, agent.pump, datapath_end, [], lambda: None, clock=lambda: clock.now)
    with pytest.raises(msgs.DatapathMessageError):
        worker.on_message(msgs.encode_message(msgs.KeyRequest(H2)), 10.0)


def forked(tmp_path):
    """A started agent on socketpair ports, its datapath process forked."""
    agent = new_agent(tmp_path, time.monotonic)
    tap, wire = SocketPort("l2c0", H1), SocketPort("wire")
    agent.start(tap, lambda: (wire, "fake"), time.monotonic())
    requests = []
    process = ProcessDatapath.start(agent)
    process.request_key = requests.append
    return agent, process, tap, wire, requests


def wait_stats(process, what, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.on_readable()
        if what(process.view):
            return
        time.sleep(0.02)
    raise AssertionError(f"no Stats showed it: {process.view.doc}")


def test_the_forked_datapath_seals_and_a_killed_one_fails_closed(tmp_path):
    agent, process, tap, wire, requests = forked(tmp_path)
    try:
        process.install_pair_key(H2, "h2", pair_key("h1", "h2"), 1, 0.0)
        tap.peer.send(frame(H2, H1))
        sealed = wire.peer.recv(65536)
        assert MARKER not in sealed and peer_h2(time.monotonic()).open_from_wire(sealed, time.monotonic()) == frame(H2, H1)
        wait_stats(process, lambda v: v.counters["sealed"] == 1)
        assert process.view.doc["pid"] == process.pid != os.getpid()
        process.tick(time.monotonic())  # alive: nothing raised
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process.died() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LocalError, match=r"datapath process \(pid \d+\) was killed by SIGKILL: the agent stops"):
            process.tick(time.monotonic())
        # Fail closed: a frame from the host goes nowhere, plain or sealed.
        tap.peer.send(frame(H2, H1))
        wire.peer.settimeout(0.3)
        with pytest.raises(TimeoutError):
            wire.peer.recv(65536)
    finally:
        process.stop()


def test_a_stopped_datapath_saves_its_floors_as_a_clean_stop(tmp_path):
    agent, process, tap, wire, requests = forked(tmp_path)
    tap.peer.send(frame(H2, H1))  # no key yet: held, and asked for
    wait_stats(process, lambda v: v.counters["key_requests"] == 1)
    process.on_readable()
    assert requests == [H2]
    os.kill(process.pid, signal.SIGTERM)  # reaches the whole group at a stop: only the control process acts
    time.sleep(0.2)
    assert process.died() is None
    process.stop()
    assert process.died() == "exited with code 0"
    bounds, stopped = decode_file(agent.floor_file.path.read_bytes())
    assert stopped
