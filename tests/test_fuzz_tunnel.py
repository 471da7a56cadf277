"""Fuzzing the gateway's inter-subnet receive path: ``tunnel_wire.decode_header``,
``Tunnel.open`` and ``GatewayCore.from_tunnel``.

Whatever arrives, nothing raises; a datagram is accepted only if the peer
gateway sealed exactly those bytes with its link key (and only once); everything
else is counted under a named drop reason.  For the core the books balance
too: every datagram is either one frame delivered to the plain side or one
counted drop.  Bounded examples keep CI fast.  The scapy corpus in
``corpus_tunnel`` is run through the tunnel and the core with the reason each
datagram must get.

Every drop reason of the tunnel's receive path must be reached:
``TUNNEL_RX_REASONS`` is checked against what the tunnel's source can count,
the fuzz tests record their reasons with ``hypothesis.event``, and a seeded
fuzz loop of real sealed datagrams, mutated, asserts it reached every one.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

from corpus_tunnel import HELD_PW_ID, INNER_SRC, OTHER_PEER_GW, PEER_GW, RX_GW, crafted
from drop_reasons import counted, returned
from mutations import mutation
from gateway import tunnel_wire as W
from gateway import core as C
from gateway import tunnel as T
from gateway.core import GatewayCore
from l2crypt.core.engine import EngineSettings
from l2crypt.core.frame_wire import parse_mac
from l2crypt.core.replay_floor import FloorBook
from l2crypt.core.tunnel_keys import Endpoint, link_keys, sender_tag

RX = parse_mac("02:4c:47:00:00:b1")  # gB's MAC
PEER = sender_tag(PEER_GW)
INNER = parse_mac(INNER_SRC)
NETKEY = bytes(range(200, 232))
MCAST_KEY = bytes(range(32))
BCAST = b"\xff" * 6
SEGMENT = {PEER_GW: "sha256:" + "a" * 64, RX_GW: "sha256:" + "b" * 64, OTHER_PEER_GW: "sha256:" + "a" * 64}
TUNNEL_REASONS = {W.TRUNCATED, W.OVERSIZED, W.UNKNOWN_VERSION, W.UNKNOWN_KIND, T.NO_NETKEY, T.STALE_NETKEY,
                  T.REPLAYED, T.BAD_TAG, T.UNKNOWN_TAG, T.TAG_ADDRESS, T.UNKNOWN_PATH, T.PATH_ADDRESS}
#: The receive path's reasons, and those only sealing counts.
TUNNEL_RX_REASONS = TUNNEL_REASONS | {T.FLOORS_UNSAVED}
TUNNEL_TX_REASONS = {T.PN_EXHAUSTED, T.PN_UNRESERVED}
CORE_REASONS = TUNNEL_REASONS | {C.UNKNOWN_PEER, C.RUNT, C.GROUP_SOURCE, C.OWN_SOURCE, C.SPOOFED_SOURCE,
                                 C.MAC_MOVED, C.TABLE_FULL, C.LEARN_HOLD_OVERFLOW, C.LEARN_HOLD_EXPIRED}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_reason_lists_are_what_the_tunnel_can_count():
    assert TUNNEL_RX_REASONS | TUNNEL_TX_REASONS == counted(T) | returned(W.decode_header)
    assert CORE_REASONS - TUNNEL_REASONS <= counted(C)


def _events(kind: str, drops) -> None:
    if currently_in_test_context():
        for reason in +drops:
            event(f"{kind} drop: {reason}")


def arp_from(src: bytes, i: int) -> bytes:
    """A unique ARP broadcast (it crosses under group_crossing basic)."""
    return BCAST + src + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01" + src + i.to_bytes(4, "big") + bytes(32)


def keys(me: str, peer: str, netkey: bytes = NETKEY, pw_id: int = HELD_PW_ID) -> tuple[bytes, bytes]:
    """What ``me``'s key server hands it for its link to ``peer``."""
    return link_keys(netkey, pw_id, Endpoint(SEGMENT[me], me), Endpoint(SEGMENT[peer], peer))


def peer_tunnel(pn_start: int = 5000) -> T.Tunnel:
    """The peer gateway's tunnel, with its link to the receiver."""
    sender = T.Tunnel(PEER_GW, (RX_GW,), pn_start=pn_start)
    sender.install(RX_GW, HELD_PW_ID, *keys(PEER_GW, RX_GW), 0.0)
    return sender


def data_message(seq: int, frame: bytes) -> bytes:
    """What a gateway seals for a frame: the link's sequence number, then the frame (``multipath``)."""
    return seq.to_bytes(8, "big") + frame


def _genuine() -> dict[bytes, bytes]:
    """Datagrams the peer gateway sealed -> their inner frame."""
    sender = peer_tunnel()
    out = {}
    for i in range(8):
        frame = arp_from(INNER, i) + bytes(40 * i)
        out[sender.seal(RX_GW, data_message(5000 + i, frame), 0.0)] = frame
    return out


GENUINE = _genuine()
GENUINE_LIST = list(GENUINE)


def rx_tunnel() -> T.Tunnel:
    tun = T.Tunnel(RX_GW, (PEER_GW, OTHER_PEER_GW), paths={PEER_GW: (0, 1)})  # everything arrives on path 0
    for peer in (PEER_GW, OTHER_PEER_GW):
        tun.install(peer, HELD_PW_ID, *keys(RX_GW, peer), 0.0)
    return tun


def rx_core() -> GatewayCore:
    """Gateway gB: tunnel peers gA (the real one) and gC; INNER is mapped to it on tunnel:gA."""
    pn = iter(range(1, 1 << 40, 1 << 20))
    gw = GatewayCore(RX, lambda: next(pn), tunnel_peers=(PEER_GW, OTHER_PEER_GW), has_plain=True,
                     engine_settings=EngineSettings(), gw_id=RX_GW)
    for peer in (PEER_GW, OTHER_PEER_GW):
        gw.install_tunnel_keys(peer, HELD_PW_ID, *keys(RX_GW, peer), 0.0)
    gw.install_multicast_key(MCAST_KEY, 1, 0.0)
    gw.on_mapped(INNER, "tunnel:gA", 0.0)
    assert gw.table[INNER].state == C.MAPPED
    return gw


def run_tunnel(tun: T.Tunnel, datagrams: list[bytes], peer: str = PEER_GW) -> list[bytes]:
    """Feed datagrams from ``peer``'s address."""
    drops_before, opened_before = sum(tun.drops.values()), tun.counters["tunnel_opened"]
    accepted = []
    for i, d in enumerate(datagrams):
        got = tun.open(peer, d, 1.0 + i * 1e-3)
        if got is not None:
            assert got == data_message(5000 + GENUINE_LIST.index(d), GENUINE[d])  # genuine, its own frame
            accepted.append(d)
    _events("tunnel", tun.drops)
    if currently_in_test_context():
        event(f"tunnel opened: {len(accepted) > 0}")
    assert set(+tun.drops) <= TUNNEL_RX_REASONS, tun.drops
    assert len(accepted) + sum(tun.drops.values()) - drops_before == len(datagrams), (len(accepted), tun.drops)
    assert tun.counters["tunnel_opened"] - opened_before == len(accepted)
    return accepted


def run_core(gw: GatewayCore, arrivals: list[tuple[str, bytes]]) -> list[bytes]:
    """Feed (peer, datagram); no key server answers; learning holds age out."""
    delivered = []
    for i, (peer, d) in enumerate(arrivals):
        out = gw.from_tunnel(peer, d, 1.0 + i * 1e-3)
        assert out.to_tunnel == []  # split horizon: nothing goes back into a tunnel
        delivered += out.to_plain
        gw.take_map_requests()
        gw.take_key_requests(1.0 + i * 1e-3)
    gw.on_timer(1e6)
    drops = gw.all_drops()
    _events("core", drops)
    assert set(+drops) <= CORE_REASONS, drops
    assert len(delivered) + sum(drops.values()) == len(arrivals), (len(delivered), drops)
    inner = set(GENUINE.values())
    assert all(f in inner for f in delivered)  # only frames the peer sealed reach the plain side
    return delivered


@FUZZ
@given(st.binary(max_size=W.MAX_DATAGRAM + 64))
def test_decode_header_never_raises(data):
    out = W.decode_header(data)
    event(out if isinstance(out, str) else "header")
    assert isinstance(out, W.TunnelHeader) or out in TUNNEL_REASONS


def _any_bytes():
    """Mostly past the length check; sometimes short, sometimes over the limit."""
    oversized = st.integers(W.MAX_DATAGRAM + 1, W.MAX_DATAGRAM + 64).map(lambda n: W.HEADER.pack(
        W.TUNNEL_VERSION, W.KIND_DATA, PEER, HELD_PW_ID, 1) + bytes(n - W.HEADER_LEN))
    return st.one_of(st.binary(min_size=W.MIN_DATAGRAM, max_size=300), st.binary(max_size=W.MIN_DATAGRAM - 1),
                     oversized)


@FUZZ
@given(st.lists(_any_bytes(), max_size=30))
def test_arbitrary_bytes_are_dropped_and_counted(datagrams):
    assert run_tunnel(rx_tunnel(), datagrams) == []
    assert run_core(rx_core(), [("gA", d) for d in datagrams]) == []


def _tunnel_shaped():
    senders = st.sampled_from([PEER, PEER, sender_tag(RX_GW), sender_tag(OTHER_PEER_GW), RX, INNER, BCAST, bytes(6)])
    return st.builds(
        lambda ver, kind, sender, pw, pn, body: W.HEADER.pack(ver, kind, sender, pw, pn) + body,
        st.sampled_from([2, 2, 0, 1, 255]), st.sampled_from([1, 1, 0, 2]), senders,
        st.sampled_from([0, HELD_PW_ID - 1, HELD_PW_ID, HELD_PW_ID, HELD_PW_ID + 1, 0xFFFFFFFF]),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 5000, 2**63, 2**64 - 1])),
        st.binary(min_size=W.MIN_DATAGRAM - W.HEADER_LEN, max_size=200),
    )


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([PEER_GW, OTHER_PEER_GW, "nobody"]), _tunnel_shaped()), max_size=30))
def test_tunnel_shaped_garbage_is_dropped_and_counted(arrivals):
    assert run_tunnel(rx_tunnel(), [d for _, d in arrivals]) == []
    gw = rx_core()
    assert run_core(gw, arrivals) == []
    assert gw.all_drops()[C.UNKNOWN_PEER] == sum(1 for p, _ in arrivals if p == "nobody")


def _mutation(datagram: bytes, data) -> bytes:
    return mutation(datagram, data, GENUINE_LIST, W.HEADER_LEN, [(0, 1), (1, 1), (2, 6), (8, 4), (12, 8)])


@FUZZ
@given(st.data())
def test_mutated_real_datagrams_only_genuine_ones_get_through_once(data):
    arrivals = []
    for _ in range(data.draw(st.integers(1, 25))):
        d = data.draw(st.sampled_from(GENUINE_LIST))
        if data.draw(st.booleans()):
            d = _mutation(d, data)
        arrivals.append((data.draw(st.sampled_from([PEER_GW, PEER_GW, OTHER_PEER_GW])), d))
    from_peer = [d for p, d in arrivals if p == PEER_GW]
    accepted = run_tunnel(rx_tunnel(), from_peer)
    assert len(accepted) == len(set(accepted))  # a replay never gets through
    assert set(accepted) == {d for d in from_peer if d in GENUINE}  # every genuine datagram once
    # From gC's address gA's datagrams are refused (its tag is bound to gA's address).
    tun = rx_tunnel()
    assert run_tunnel(tun, [d for p, d in arrivals if p == OTHER_PEER_GW], peer=OTHER_PEER_GW) == []
    # Through the core: a genuine datagram's frame reaches the plain side once, if it came from gA.
    delivered = run_core(rx_core(), arrivals)
    assert sorted(delivered) == sorted(GENUINE[d] for d in set(from_peer) if d in GENUINE)


def _fuzzed(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """(peer address, datagram): real sealed datagrams, resent or mutated in one place each."""
    tags = [PEER, PEER, sender_tag(OTHER_PEER_GW), sender_tag(RX_GW)]
    arrivals = []
    for _ in range(count):
        d = rng.choice(GENUINE_LIST)
        kind = rng.choice(["resend", "flip", "truncate", "extend", "oversize", "splice", "field", "field", "field"])
        if kind == "flip":
            pos = rng.randrange(len(d))
            d = d[:pos] + bytes([d[pos] ^ rng.randrange(1, 256)]) + d[pos + 1:]
        elif kind == "truncate":
            d = d[:rng.randrange(len(d))]
        elif kind == "extend":
            d += rng.randbytes(rng.randrange(1, 20))
        elif kind == "oversize":
            d += bytes(W.MAX_DATAGRAM + 1 - len(d) + rng.randrange(64))
        elif kind == "splice":
            d = d[:W.HEADER_LEN] + rng.choice(GENUINE_LIST)[W.HEADER_LEN:]
        elif kind == "field":
            offset, value = rng.choice([
                (0, bytes([rng.choice([0, 1, 2, 255])])),                      # version
                (1, bytes([rng.choice([0, 5, 255, 0x11, 0x21])])),             # path and kind
                (2, rng.choice(tags + [rng.randbytes(6)])),                    # sender tag
                (8, rng.choice([0, 1, HELD_PW_ID + 1, 2**32 - 1]).to_bytes(4, "big")),  # PW_ID
                (12, rng.randrange(2**64).to_bytes(8, "big")),                 # packet number
            ])
            d = d[:offset] + value + d[offset + len(value):]
        arrivals.append((rng.choice([PEER_GW, PEER_GW, PEER_GW, OTHER_PEER_GW]), d))
    return arrivals


def test_fuzz_loop_reaches_every_tunnel_drop_reason():
    """A seeded loop (it runs the same alone or in any order): real datagrams,
    mutated, reach every reason in ``TUNNEL_RX_REASONS``; the books balance."""
    arrivals = _fuzzed(random.Random(0x7E1), 1200)
    tun = rx_tunnel()
    from_peer = [d for p, d in arrivals if p == PEER_GW]
    assert set(run_tunnel(tun, from_peer)) == {d for d in from_peer if d in GENUINE} != set()
    assert run_tunnel(tun, [d for p, d in arrivals if p == OTHER_PEER_GW], peer=OTHER_PEER_GW) == []
    # Genuine datagrams once the replay floors went unsaved too long: all refused.
    late = T.Tunnel(RX_GW, (PEER_GW,), floors=FloorBook())
    late.install(PEER_GW, HELD_PW_ID, *keys(RX_GW, PEER_GW), 0.0)
    assert [late.open(PEER_GW, d, 1.0) for d in GENUINE_LIST] == [None] * len(GENUINE_LIST)
    assert +late.drops == {T.FLOORS_UNSAVED: len(GENUINE_LIST)}
    reached = set(+tun.drops) | set(+late.drops)
    assert reached == TUNNEL_RX_REASONS, sorted(TUNNEL_RX_REASONS - reached)
    # The same arrivals through the core: only genuine frames come out, the books balance.
    delivered = run_core(rx_core(), arrivals)
    assert sorted(delivered) == sorted(GENUINE[d] for d in set(from_peer) if d in GENUINE)


def test_replay_storm_is_counted_and_genuine_traffic_still_opens():
    tun = rx_tunnel()
    first, later = GENUINE_LIST[:4], GENUINE_LIST[4:]
    storm = first + first * 200
    assert run_tunnel(tun, storm) == first
    assert +tun.drops == {T.REPLAYED: 800}
    assert run_tunnel(tun, later) == later  # newer datagrams of the same sender still open


def test_forged_huge_packet_numbers_do_not_poison_the_window():
    tun = rx_tunnel()
    forged = [d[:12] + (2**64 - 1 - i).to_bytes(8, "big") + d[20:] for i, d in enumerate(GENUINE_LIST * 50)]
    assert run_tunnel(tun, forged) == []
    assert +tun.drops == {T.BAD_TAG: len(forged)}
    assert run_tunnel(tun, GENUINE_LIST) == GENUINE_LIST  # PN ~5000: the window never moved


def test_made_up_sender_tags_are_dropped_before_any_state():
    """Datagrams under tags that are no configured peer's are counted and use
    up nothing: the real peer's datagrams still open, its replays are still refused."""
    tun = rx_tunnel()
    body = GENUINE_LIST[0][W.HEADER_LEN:]
    forged = [W.encode_header(i.to_bytes(6, "big"), HELD_PW_ID, 1) + body for i in range(1, 300)]
    assert run_tunnel(tun, forged) == []
    assert +tun.drops == {T.UNKNOWN_TAG: len(forged)}
    assert run_tunnel(tun, GENUINE_LIST[:1] * 3) == GENUINE_LIST[:1]
    assert tun.drops[T.REPLAYED] == 2


@pytest.mark.parametrize("name,datagram,reason", crafted(), ids=[c[0] for c in crafted()])
def test_crafted_corpus(name, datagram, reason):
    tun = rx_tunnel()
    assert tun.open(PEER_GW, datagram, 1.0) is None
    assert dict(tun.drops) == {reason: 1}, name
    assert tun.wants_key == (reason == T.NO_NETKEY)  # a newer NETKEY is asked for, nothing else
    gw = rx_core()
    out = gw.from_tunnel("gA", datagram, 1.0)
    assert (out.to_enc, out.to_plain, out.to_tunnel) == ([], [], [])
    assert dict(gw.all_drops()) == {reason: 1}, name


def test_crafted_corpus_mixed_with_real_traffic():
    """The whole corpus between genuine datagrams: every genuine one is delivered."""
    arrivals = []
    for (_, d, _), good in zip(crafted(), GENUINE_LIST * 4):
        arrivals += [("gA", d), ("gA", good)]
    delivered = run_core(rx_core(), arrivals)
    assert sorted(delivered) == sorted(GENUINE.values())


def _sealed_by_peer(frames: list[bytes]) -> list[bytes]:
    sender = peer_tunnel(pn_start=9000)
    return [sender.seal(RX_GW, data_message(9000 + i, f), 0.0) for i, f in enumerate(frames)]


HOSTILE_INNER = {
    # Genuine tags (a peer gateway sealed them), hostile inner frames.
    "group_source": (BCAST + BCAST + b"\x08\x06" + bytes(46), C.GROUP_SOURCE),
    "own_source": (BCAST + RX + b"\x08\x06" + bytes(46), C.OWN_SOURCE),
    "encrypted_hosts_mac": (BCAST + parse_mac("02:4c:32:00:00:11") + b"\x08\x06" + bytes(46), C.SPOOFED_SOURCE),
    "unmapped_source_held_then_expired": (BCAST + parse_mac("02:4c:50:00:00:77") + b"\x08\x06" + bytes(46),
                                          C.LEARN_HOLD_EXPIRED),
}


@pytest.mark.parametrize("name", HOSTILE_INNER)
def test_genuine_datagrams_with_hostile_inner_frames(name):
    frame, reason = HOSTILE_INNER[name]
    gw = rx_core()
    gw._note_host(parse_mac("02:4c:32:00:00:11"))  # seen sealing on the encrypted segment
    (datagram,) = _sealed_by_peer([frame])
    out = gw.from_tunnel("gA", datagram, 1.0)
    assert (out.to_enc, out.to_plain) == ([], [])
    gw.on_timer(1e6)
    assert dict(gw.all_drops()) == {reason: 1}
    assert gw.tunnel.counters["tunnel_opened"] == 1
