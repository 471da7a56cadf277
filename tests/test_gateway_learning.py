"""MAC learning under a flood (issue 15, finding 7): learned MACs age out, refused
ones do not count toward the limit, and the key server's map follows the table.

The key server here is the real ``MacMap`` (with its per-gateway limit) over a
dict of enrolled hosts; hosts are ``FrameEngine``s.
"""

from __future__ import annotations

import random

from gateway import core as C
from keyserverd.mac_map import MacMap
from l2crypt.core.errors import RefusedError
from l2crypt.core.replay_floor import FloorBook
from test_gateway_core import GA, H1, MCAST_A, P1, arp, frame, gateway, host, pair_key, serve_keys

P2 = bytes.fromhex("024c50000002")


class KeyServer:
    """Answers the gateway's map requests and releases like keyserverd (``mac_map``)."""

    def __init__(self, limit: int = 4096, bound: set[bytes] = frozenset()):
        self.macs = MacMap(limit)
        self.bound = set(bound) | {H1}

    def host_by_mac(self, mac):
        return "a host" if mac in self.bound else None

    def is_revoked(self, host_id):
        return False

    def serve(self, gw, now) -> C.Output:
        out = C.Output()
        for mac in gw.take_map_releases():
            self.macs.unmap("gA", mac)
        for mac, side in gw.take_map_requests():
            try:
                self.macs.map(self, "gA", mac, side)
            except RefusedError:
                gw.on_map_refused(mac, now)
                continue
            got = gw.on_mapped(mac, side, now)
            out.to_enc += got.to_enc
            out.to_plain += got.to_plain
        return out


def new_gateway(**kw):
    gw = gateway(GA, **kw)
    gw.install_multicast_key(MCAST_A, 1, 0.0)
    return gw


def random_macs(n: int, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    return list({bytes([0x02 | (rnd.randrange(256) & 0xFC)]) + rnd.randbytes(5) for _ in range(n)})


def flood(gw, ks, macs, start: float, per_s: float = 1000.0, serve_every: int = 100) -> float:
    """Frames from ``macs`` on the plain side (an ARP each), the key server and the
    timer every ``serve_every`` frames; returns the end time."""
    now = start
    for i, mac in enumerate(macs):
        now = start + i / per_s
        gw.from_plain(arp(mac), now)
        if i % serve_every == serve_every - 1:
            ks.serve(gw, now)
            gw.on_timer(now)
    ks.serve(gw, now)
    return now


def reachable(gw, ks, h1, new_mac: bytes, now: float) -> bool:
    """A new plain host speaks (an ARP), then h1 sends it a frame: does it get through both ways?"""
    gw.from_plain(arp(new_mac), now)
    sealed = ks.serve(gw, now).to_enc
    if not any(f[6:12] == new_mac for f in sealed):
        return False
    h1.install_pair_key(new_mac, "gA", pair_key("h1", "gA"), 1, now)
    out = gw.from_encrypted(h1.seal_from_tap(frame(new_mac, H1, payload=b"to-the-new-host"), now), now)
    out.to_plain += serve_keys(gw, "gA", {H1: "h1"}, now).to_plain
    return any(b"to-the-new-host" in f for f in out.to_plain)


def test_a_flood_of_random_source_macs_does_not_stop_learning():
    """10,000 made-up source MACs on the plain side fill the table (4096) and the key
    server's map; a new plain host is reachable from h1 once they aged out."""
    gw, ks, h1 = new_gateway(), KeyServer(), host(H1)
    end = flood(gw, ks, random_macs(10_000), 1.0)
    assert len(gw.table) == 4096 and len(ks.macs) == 4096
    assert gw.all_drops()[C.TABLE_FULL] > 5000
    assert not reachable(gw, ks, h1, P2, end + 1)  # during the flood's life: full, counted
    t = end + 1
    while t < end + gw.settings.mac_ageing_s + 2:
        t += 1.0
        gw.on_timer(t)
        ks.serve(gw, t)
    assert len(gw.table) == 0 and len(ks.macs) == 0  # forgotten here and released there
    assert gw.counters["macs_aged_out"] >= 4096
    assert reachable(gw, ks, h1, P2, t)


def test_refused_macs_do_not_use_up_the_table():
    """MACs the key server refuses (bound to enrolled hosts) are remembered apart: a
    new plain host is learned at once."""
    spoofed = random_macs(200, seed=3)
    gw, ks, h1 = new_gateway(max_learned_macs=16), KeyServer(bound=set(spoofed)), host(H1)
    flood(gw, ks, spoofed, 1.0, serve_every=1)
    assert gw.counters["maps_refused"] == 200 and len(gw.table) == 0
    assert len(gw.refused) == 200
    assert gw.from_plain(arp(spoofed[0]), 2.0).to_enc == [] and gw.take_map_requests() == []  # still refused
    assert reachable(gw, ks, h1, P2, 2.0)


def test_the_refused_list_is_bounded_least_recently_refused_first():
    spoofed = random_macs(C.MAX_REFUSED_MACS + 50, seed=5)
    gw, ks = new_gateway(), KeyServer(bound=set(spoofed))
    flood(gw, ks, spoofed, 1.0, per_s=100_000.0, serve_every=1)
    assert len(gw.refused) == C.MAX_REFUSED_MACS
    assert spoofed[0] not in gw.refused and spoofed[-1] in gw.refused


def test_mapped_macs_in_use_do_not_age_out():
    """p1 speaks now and then; p2 never speaks but h1 keeps sending to it: both stay
    mapped for 20 minutes of ageing time 300 s.  A silent, unused MAC goes."""
    gw, ks, h1 = new_gateway(), KeyServer(), host(H1)
    silent = bytes.fromhex("024c500000ff")
    for mac in (P1, P2, silent):
        gw.from_plain(arp(mac), 1.0)
    ks.serve(gw, 1.0)
    h1.install_pair_key(P2, "gA", pair_key("h1", "gA"), 1, 1.0)
    gw.from_encrypted(h1.seal_from_tap(frame(P2, H1), 1.0), 1.0)
    assert len(serve_keys(gw, "gA", {H1: "h1"}, 1.0).to_plain) == 1
    delivered = 0
    for minute in range(1, 21):
        t = 1.0 + 60 * minute
        gw.from_plain(frame(H1, P1, payload=b"p1-speaks"), t)
        delivered += len(gw.from_encrypted(h1.seal_from_tap(frame(P2, H1, payload=b"to-p2"), t), t).to_plain)
        gw.on_timer(t)
        ks.serve(gw, t)
    assert delivered == 20
    assert {m: e.state for m, e in gw.table.items()} == {P1: C.MAPPED, P2: C.MAPPED}
    assert ks.macs.owner(P1) == ks.macs.owner(P2) == "gA" and ks.macs.owner(silent) is None


def test_an_aged_out_mac_is_released_and_learned_again_when_a_host_talks_to_it():
    gw, ks, h1 = new_gateway(mac_ageing_s=30.0), KeyServer(), host(H1)
    assert reachable(gw, ks, h1, P1, 1.0)
    gw.on_timer(40.0)
    assert P1 not in gw.table and P1 not in gw.virtual and gw.take_map_releases() == [P1]
    ks.macs.unmap("gA", P1)
    # h1 still holds KEY(h1, gA) under p1's MAC: its frame is dropped, p1 is asked for again ...
    out = gw.from_encrypted(h1.seal_from_tap(frame(P1, H1, payload=b"after-idle-1"), 41.0), 41.0)
    assert out.to_plain == [] and gw.all_drops()[C.DST_AGED_OUT] == 1
    assert gw.counters["macs_relearned"] == 1
    ks.serve(gw, 41.1)
    # ... and the next one gets through.
    out = gw.from_encrypted(h1.seal_from_tap(frame(P1, H1, payload=b"after-idle-2"), 41.2), 41.2)
    out.to_plain += serve_keys(gw, "gA", {H1: "h1"}, 41.2).to_plain
    assert any(b"after-idle-2" in f for f in out.to_plain)
    # A MAC nobody talked to is not learned again by a frame addressed to it.
    gw.from_plain(arp(P2), 42.0)
    ks.serve(gw, 42.0)
    gw.on_timer(80.0)
    h1.install_pair_key(P2, "gA", pair_key("h1", "gA"), 1, 80.0)
    gw.from_encrypted(h1.seal_from_tap(frame(P2, H1), 80.0), 80.0)
    assert P2 not in gw.table and gw.take_map_requests() == []


def test_a_mapped_answer_the_gateway_cannot_keep_is_released():
    gw, ks = new_gateway(max_learned_macs=1), KeyServer()
    flood(gw, ks, [P1], 1.0)
    gw.on_mapped(P2, C.PLAIN, 2.0)  # a restore (map_list) beyond the limit
    assert P2 not in gw.table and gw.take_map_releases() == [P2]


def test_map_requests_do_not_pile_up_while_the_key_server_is_away():
    gw = new_gateway()
    macs = random_macs(100, seed=11)
    for i, mac in enumerate(macs):
        gw.from_plain(arp(mac), 1.0 + i * 1e-3)
    for i in range(600):
        gw.on_timer(2.0 + i * 0.1)
    assert len(gw.take_map_requests()) == 100


def test_a_dropped_virtual_engine_leaves_its_replay_tops_as_floors():
    """A MAC that ages out and comes back gets a new virtual engine; the windows of the
    old one are noted in the engines' floors, so frames recorded before stay refused."""
    gw, ks, h1 = new_gateway(mac_ageing_s=30.0), KeyServer(), host(H1)
    gw.floors = FloorBook(save_interval_s=1e6)  # never stale within the test
    gw.floors.save([], 0.0)
    assert reachable(gw, ks, h1, P1, 1.0)
    top = gw.virtual[P1].peers[H1].keys.current.replay.highest
    assert top > 0
    gw.on_timer(40.0)
    assert gw.floors.floor(H1) == top


def test_totals_never_go_back_when_a_mapped_mac_ages_out():
    """The sealed/opened counts and the drops of a virtual engine stay in the
    gateway's totals (status, metrics) after its MAC aged out and the engine went."""
    gw, ks, h1 = new_gateway(), KeyServer(), host(H1)
    assert reachable(gw, ks, h1, P2, 1.0)
    gw.virtual[P2].drops["bad_tag"] += 2  # as if two forged frames had come for P2
    before, drops_before = gw.snapshot(1.0)["counters"], gw.all_drops()
    assert before["opened"] >= 1 and before["sealed"] >= 1
    t = 1.0
    while P2 in gw.virtual and t < 1.0 + gw.settings.mac_ageing_s + 5:
        t += 1.0
        gw.on_timer(t)
        ks.serve(gw, t)
    assert P2 not in gw.virtual  # the engine went with the MAC
    after, drops_after = gw.snapshot(t)["counters"], gw.all_drops()
    assert all(after[k] >= before[k] for k in C.ENGINE_COUNTERS), (before, after)
    assert drops_after["bad_tag"] >= drops_before["bad_tag"] == 2
