"""The end-to-end scenarios of a gateway, written once, run in two worlds.

    h1, h2 (agents) --- switch --- gA (gateway) --plain0-- p1 (plain host)
                          |
                       intruder;      key server (TLS) for h1, h2 and gA

``world`` is ``fakes`` (``l2crypt.lab.fake_gateway_world``: the real agents,
gateway daemon and key server on in-memory ports, no root, seconds) or
``netns`` (segment A of the gateway lab, ``l2crypt.lab.gateway``, one for the
module, root).  tests/test_gateway_scenarios.py runs the fake world,
netns_tests/test_gateway_scenarios_netns.py the namespace world; each
scenario passes alone.  The frames are those of tests/scenarios.py: a local
experimental EtherType that no stack answers.
"""

from __future__ import annotations

import pytest

from l2crypt.core.constants import KEY_ID_PAIR
from l2crypt.core.frame_wire import format_mac
from l2crypt.lab.fake_gateway_world import FakeGatewayWorld
from l2crypt.lab.worlds import NetnsGatewayWorld
from scenarios import (BCAST, L2C_ETHERTYPE, MARKER, TEST_ETHERTYPE, assert_sealed_only, frames, marked, moved,
                       peer_entry, sealed_from)


@pytest.fixture(params=["fakes", "netns"])
def world(request, tmp_path):
    """The segment with its gateway (module docstring).  The namespace world skips
    (through the ``glab`` fixture) where the lab cannot run."""
    if request.param == "fakes":
        fake = FakeGatewayWorld(tmp_path).up()
        yield fake
        fake.down()
    else:
        yield NetnsGatewayWorld(request.getfixturevalue("glab"))


# --- helpers ------------------------------------------------------------------------------


def speaks_for_p1(world) -> bool:
    p1 = format_mac(world.mac(world.plain_host))
    return any(e["mac"] == p1 and e["state"] == "mapped" for e in world.status(world.gateway)["learned"])


def plain_host_known(world) -> None:
    """p1 has spoken on the plain side (as a host does when its link comes up), so
    gA has mapped its MAC at the key server and speaks for it on the segment."""
    if not speaks_for_p1(world):
        world.send(world.plain_host, frames(world, world.plain_host, BCAST, 1, b"hello"))
        world.wait("gA to speak for p1's MAC", lambda: speaks_for_p1(world))


def plain_frames(dst: bytes, src: bytes, payload: bytes) -> list[bytes]:
    """IPv4 UDP, IPv6 UDP, an ARP request (``payload`` as its padding) and a frame of
    the test EtherType from ``src`` to ``dst``; the IP headers are well formed (a
    Linux bridge that checks them, ``br_netfilter``, drops the others)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether

    eth = Ether(dst=format_mac(dst), src=format_mac(src))
    udp = UDP(sport=7311, dport=7311) / payload
    return [bytes(eth / IP(src="192.0.2.1", dst="192.0.2.2") / udp),
            bytes(eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / udp),
            bytes(eth / ARP(op=1, hwsrc=format_mac(src), psrc="192.0.2.1", pdst="192.0.2.2") / payload),
            dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + payload + bytes(24)]


def refused(gw_status: dict) -> int:
    """Plain frames gA refused on its encrypted port: the port guard's counter (the
    kernel's nftables), or, where no guard runs (fakes), the gateway's own drop."""
    return (gw_status.get("inbound_refused") or 0) + gw_status["drops"].get("not_l2crypt", 0)


# --- the scenarios ----------------------------------------------------------------------------


def test_encrypted_host_reaches_the_plain_host_through_the_gateway_and_back(world):
    """h1 -> p1 without a key: h1 holds its frames and asks once, gA opens them and
    p1 gets them in clear, in order; then a burst, and frames for h2 that p1 never
    sees; p1's reply reaches h1.  The switch carries only sealed frames (gA seals
    under p1's MAC with its pair key with h1)."""
    h1, p1, gw = "h1", world.plain_host, world.gateway
    plain_host_known(world)
    if peer_entry(world.status(h1), world.mac(p1)) is not None:
        world.restart(h1)  # the namespace lab is shared by the module: h1 has no key for p1 again
    before = {who: world.status(who) for who in (h1, gw)}
    first = frames(world, h1, world.mac(p1), 5, b"miss")
    burst = frames(world, h1, world.mac(p1), 100, b"burst")
    to_h2 = frames(world, h1, world.mac("h2"), 3, b"h2only")
    with world.watching(p1, "h2") as seen:
        world.send(h1, first)
        world.wait("p1 to get 5 frames", lambda: len(marked(seen.tap(p1), b"miss")) >= 5)
        keyed = world.status(h1)
        world.send(h1, burst + to_h2)
        world.wait("p1 to get the burst and h2 its frames", lambda: len(marked(seen.tap(p1), b"burst")) >= 100
                   and len(marked(seen.tap("h2"), b"h2only")) >= 3)
    after = {who: world.status(who) for who in (h1, gw)}
    assert marked(seen.tap(p1)) == first + burst  # each once, in order, in clear; nothing meant for h2
    assert marked(seen.tap("h2"), b"h2only") == to_h2
    assert not [f for f in seen.tap(p1) if f[12:14] == L2C_ETHERTYPE]  # no sealed frame on the plain side
    assert not [f for f in seen.tap(p1) if f[0:6] == world.mac("h2")]
    assert moved(before[h1], keyed, "counters", "key_requests") == 1  # for p1's MAC, once
    assert moved(before[h1], keyed, "counters", "held") >= 1
    assert peer_entry(after[h1], world.mac(p1))["frames_out"] >= 105
    # gA holds its pair key with h1 (asked for once, or pushed by the key server) and opened every frame.
    assert {"mac": format_mac(world.mac(h1)), "id": h1} in [{k: e[k] for k in ("mac", "id")} for e in after[gw]["hosts"]]
    assert moved(before[gw], after[gw], "counters", "key_requests") in (0, 1)
    assert moved(before[gw], after[gw], "counters", "to_plain") >= 105
    assert_sealed_only(world, seen.switch(), h1, 108)
    assert {f[12:14] for f in seen.switch()} == {L2C_ETHERTYPE}  # the segment carries sealed frames only

    reply = frames(world, p1, world.mac(h1), 5, b"reply")
    with world.watching(h1) as seen:
        world.send(p1, reply)
        world.wait("h1 to get p1's 5 replies", lambda: len(marked(seen.tap(h1), b"reply")) >= 5)
    assert marked(seen.tap(h1), b"reply") == reply
    sealed = [f for f in sealed_from(world, seen.switch(), p1) if f[0:6] == world.mac(h1)]
    assert len(sealed) >= 5 and all(f[15] == KEY_ID_PAIR for f in sealed)
    assert not [f for f in seen.switch() if MARKER in f]


def test_plain_frames_an_intruder_puts_on_the_switch_never_reach_the_plain_host(world):
    """Plain frames (IPv4, IPv6, ARP and the test EtherType) as if from h1, to gA's
    MAC, to p1's MAC (gA speaks for it) and to broadcast: each crosses the switch,
    gA refuses and counts every one, none reaches p1 or a host; h1 -> p1 still works."""
    h1, p1, gw = "h1", world.plain_host, world.gateway
    plain_host_known(world)
    tag = b"intruder"
    injected = [f for dst in (world.mac(gw), world.mac(p1), BCAST)
                for f in plain_frames(dst, world.mac(h1), MARKER + tag)]
    before = world.status(gw)
    with world.watching(p1, h1, "h2") as seen:
        world.inject(injected)
        after = world.wait("gA to count every injected frame", lambda: (lambda s: s if refused(s) - refused(before)
                                                                        >= len(injected) else None)(world.status(gw)))
        still = frames(world, h1, world.mac(p1), 2, b"after")
        world.send(h1, still)
        world.wait("p1 to get h1's frames after the attack", lambda: len(marked(seen.tap(p1), b"after")) >= 2)
    assert refused(after) - refused(before) == len(injected)
    assert all(f in seen.switch() for f in injected)  # the switch carried them toward gA
    for who in (p1, h1, "h2"):
        assert not marked(seen.tap(who), tag), who
    assert marked(seen.tap(p1), b"after") == still
