"""The end-to-end scenarios of one encrypted segment, written once, run in two worlds.

    h1, h2, h3 (agents, TAPs) --- switch --- intruder;  key server (TLS) for all three

``world`` is ``fakes`` (``l2crypt.lab.fake_world``: the real agents and key
server on in-memory ports, no root, seconds) or ``netns`` (``l2crypt.lab``'s
namespace lab, one for the module, root).  tests/test_scenarios.py runs the
fake world (``pytest tests``), netns_tests/test_scenarios_netns.py the
namespace world (``pytest netns_tests``); each scenario passes alone.  The
scenarios of a gateway and its plain host are written the same way, in
tests/gateway_scenarios.py, with the helpers below.

The hosts send frames of a local experimental EtherType: their stacks ignore
them and nothing answers, so every frame a scenario counts is one it sent.
"""

from __future__ import annotations

import os

import pytest

from l2crypt.core.constants import KEY_ID_MULTICAST, KEY_ID_PAIR
from l2crypt.core.frame_wire import format_mac
from l2crypt.lab.fake_world import FakeWorld
from l2crypt.lab.worlds import NetnsWorld

MARKER = b"L2CRYPT-SCENARIO-5d1e"
TEST_ETHERTYPE = 0x88B6  # local experimental 2
L2C_ETHERTYPE = b"\x88\xb5"
BCAST = b"\xff" * 6
#: Drop reasons that mean a key was missing, old, wrong or reused.
KEY_DROPS = ("no_key", "stale_key", "unknown_sender", "hold_overflow", "hold_expired", "bad_tag", "replayed")


@pytest.fixture(params=["fakes", "netns"])
def world(request, tmp_path):
    """The segment a scenario runs in (module docstring).  The namespace world skips
    (through the ``lab`` fixture) where the lab cannot run: without root, or tools."""
    if request.param == "fakes":
        fake = FakeWorld(tmp_path).up()
        yield fake
        fake.down()
    else:
        yield NetnsWorld(request.getfixturevalue("lab"))


# --- helpers ------------------------------------------------------------------------------


def frames(world, src: str, dst_mac: bytes, count: int, tag: bytes = b"") -> list[bytes]:
    """``count`` frames from ``src``'s stack to ``dst_mac``, each with MARKER, ``tag`` and its index."""
    head = dst_mac + world.mac(src) + TEST_ETHERTYPE.to_bytes(2, "big")
    return [head + MARKER + tag + b"#%04d" % i + bytes(24) for i in range(count)]


def marked(frames_: list[bytes], tag: bytes = b"") -> list[bytes]:
    return [f for f in frames_ if MARKER + tag in f]


def sealed_from(world, seen_frames: list[bytes], src: str) -> list[bytes]:
    """The l2crypt frames ``src`` put on the switch."""
    return [f for f in seen_frames if f[12:14] == L2C_ETHERTYPE and f[6:12] == world.mac(src)]


def peer_entry(status: dict, mac: bytes) -> dict | None:
    return next((p for p in status["peers"] if p["mac"] == format_mac(mac)), None)


def moved(before: dict, after: dict, section: str, name: str) -> int:
    return after[section].get(name, 0) - before[section].get(name, 0)


def key_drops(before: dict, after: dict) -> dict[str, int]:
    return {r: n for r in KEY_DROPS if (n := moved(before, after, "drops", r))}


def keyed(world, a: str, b: str) -> None:
    """Make sure ``a`` and ``b`` hold their pair key (one frame each way)."""
    for src, dst in ((a, b), (b, a)):
        if peer_entry(world.status(src), world.mac(dst)) is None:
            with world.watching(dst) as seen:
                world.send(src, frames(world, src, world.mac(dst), 1, b"warm"))
                world.wait(f"{dst} to get a frame from {src}", lambda: marked(seen.tap(dst), b"warm"))


def assert_sealed_only(world, switch: list[bytes], src: str, at_least: int) -> None:
    """``src`` put at least ``at_least`` sealed frames on the switch, and no frame carried MARKER."""
    sealed = len(sealed_from(world, switch, src))
    assert sealed >= at_least, f"{src} put {sealed} sealed frames on the switch, want {at_least} or more"
    assert not [f for f in switch if MARKER in f]


# --- the scenarios ----------------------------------------------------------------------------


def test_key_miss_requests_once_then_traffic_flows_sealed(world):
    """h2 -> h3, a pair without a key: h2 holds the frames and asks once; they all
    arrive in order, and the switch carries only sealed frames."""
    a, b = "h2", "h3"
    if peer_entry(world.status(a), world.mac(b)) or peer_entry(world.status(b), world.mac(a)):
        world.restart(a)  # the namespace lab is shared by the module: make h2-h3 a pair without a key again
    before = {h: world.status(h) for h in (a, b)}
    batch = frames(world, a, world.mac(b), 5)
    with world.watching(b) as seen:
        world.send(a, batch)
        world.wait(f"{b} to get 5 frames", lambda: len(marked(seen.tap(b))) >= 5)
    after = {h: world.status(h) for h in (a, b)}
    assert marked(seen.tap(b)) == batch  # each once, in order, as sent
    # The first end to miss asks for the key, once; the other end asks at most once
    # (the server may push the new pair key to it instead).
    requests = [moved(before[h], after[h], "counters", "key_requests") for h in (a, b)]
    assert requests[0] == 1 and requests[1] in (0, 1), requests
    assert moved(before[a], after[a], "counters", "held") >= 1
    assert peer_entry(after[a], world.mac(b))["frames_out"] >= 5
    assert_sealed_only(world, seen.switch(), a, 5)
    assert key_drops(before[b], after[b]) == {}


def test_broadcast_goes_under_the_multicast_key_to_every_host(world):
    batch = frames(world, "h1", BCAST, 3, b"bcast")
    before = world.status("h1")
    with world.watching("h2", "h3") as seen:
        world.send("h1", batch)
        world.wait("h2 and h3 to get 3 broadcasts",
                   lambda: all(len(marked(seen.tap(h), b"bcast")) >= 3 for h in ("h2", "h3")))
    for host in ("h2", "h3"):
        assert marked(seen.tap(host), b"bcast") == batch
    sealed = [f for f in sealed_from(world, seen.switch(), "h1") if f[0:6] == BCAST]
    assert len(sealed) >= 3 and all(f[15] == KEY_ID_MULTICAST for f in sealed)
    assert not [f for f in seen.switch() if MARKER in f]
    assert moved(before, world.status("h1"), "counters", "key_requests") == 0  # the multicast key was there


def test_replayed_frame_is_dropped_and_counted(world):
    keyed(world, "h1", "h2")
    with world.watching("h2") as seen:
        world.send("h1", frames(world, "h1", world.mac("h2"), 1, b"once"))
        world.wait("h2 to get the frame", lambda: marked(seen.tap("h2"), b"once"))
    (real,) = [f for f in sealed_from(world, seen.switch(), "h1") if f[0:6] == world.mac("h2")]
    assert real[15] == KEY_ID_PAIR
    before = world.status("h2")
    with world.watching("h2") as seen:
        world.inject([real])
        after = world.wait("h2 to count the replay",
                           lambda: (lambda s: s if moved(before, s, "drops", "replayed") else None)(world.status("h2")))
    assert moved(before, after, "drops", "replayed") == 1
    assert sum(after["drops"].values()) - sum(before["drops"].values()) == 1
    assert seen.switch().count(real) == 1  # the replay crossed the switch ...
    assert not marked(seen.tap("h2"))  # ... and never reached h2's stack


def test_frames_to_an_unknown_mac_are_dropped_with_one_key_request(world):
    stranger = b"\x02" + os.urandom(5)
    before = world.status("h1")
    with world.watching() as seen:
        world.send("h1", frames(world, "h1", stranger, 1, b"first"))
        world.wait("h1 to drop the first frame",
                   lambda: moved(before, world.status("h1"), "drops", "no_key") >= 1)
        world.send("h1", frames(world, "h1", stranger, 2, b"again"))
        after = world.wait("h1 to drop all three",
                           lambda: (lambda s: s if moved(before, s, "drops", "no_key") >= 3 else None)(world.status("h1")))
    assert moved(before, after, "drops", "no_key") == 3
    assert moved(before, after, "counters", "key_requests") == 1  # not asked again while it is unknown
    assert peer_entry(after, stranger) is None
    assert not [f for f in seen.switch() if f[0:6] == stranger]  # nothing left toward it


def test_rekey_during_traffic_loses_nothing(world):
    """Traffic both ways between h1 and h2 and broadcasts from h1, while the key
    server rotates their pair key and the multicast key twice: every frame
    arrives once, no key drop, and both ends end on the newest versions."""
    keyed(world, "h1", "h2")
    before = {h: world.status(h) for h in ("h1", "h2", "h3")}
    pw_before = peer_entry(before["h1"], world.mac("h2"))["pw_id"]
    sent = {"h1": [], "h2": [], "h3": []}  # host -> what its stack should get
    rotations = []
    with world.watching("h1", "h2", "h3") as seen:
        for round_ in range(6):
            if round_ in (1, 3):
                rotations.append((world.rekey_pair("h1", "h2"), world.rekey_multicast()))
            tag = b"r%d" % round_
            to_h2 = frames(world, "h1", world.mac("h2"), 3, tag)
            to_h1 = frames(world, "h2", world.mac("h1"), 3, tag)
            bcast = frames(world, "h1", BCAST, 1, tag)
            world.send("h1", to_h2 + bcast)
            world.send("h2", to_h1)
            sent["h2"] += to_h2 + bcast
            sent["h1"] += to_h1
            sent["h3"] += bcast
            world.pause(0.5)
        world.wait("every frame to arrive",
                   lambda: all(len(marked(seen.tap(h))) >= len(sent[h]) for h in sent), timeout_s=15)
    for host, want in sent.items():
        assert sorted(marked(seen.tap(host))) == sorted(want), host
    last_pair, last_mcast = rotations[-1]
    assert last_pair == pw_before + 2
    for src, dst in (("h1", "h2"), ("h2", "h1")):
        world.wait(f"{src} to send to {dst} with pw_id {last_pair}",
                   lambda s=src, d=dst: peer_entry(world.status(s), world.mac(d))["pw_id"] == last_pair
                   or world.pause(0.5), timeout_s=15)
    for host in ("h1", "h2", "h3"):
        world.wait(f"{host} to hold multicast pw_id {last_mcast}",
                   lambda h=host: world.status(h)["multicast_pw_id"] == last_mcast or world.pause(0.5))
    after = {h: world.status(h) for h in ("h1", "h2", "h3")}
    assert {h: key_drops(before[h], after[h]) for h in after} == {h: {} for h in after}
    assert_sealed_only(world, seen.switch(), "h1", 24)
