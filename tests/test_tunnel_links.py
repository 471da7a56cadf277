"""The tunnel's links (issue 15, finding 8 and the tunnel's share of finding 1).

Segment A has gateway gA; segment B has gB and gC, both gA's tunnel peers.
Each gateway gets from its key server only the two keys of each link it is an
end of (``l2crypt.core.tunnel_keys``), never NETKEY.  The attacker in these tests
is a gateway that holds all its key server gave it (gC), or anyone on the WAN:
it must not get a datagram opened by gA as coming from gB, nor use up gA's
state, nor replay gB's datagrams after gA restarts.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway import tunnel_wire as W
from gateway import tunnel as T
from l2crypt.core import replay_floor as rf
from l2crypt.core import aead
from l2crypt.core.aead import PN_PER_SECOND
from l2crypt.core.tunnel_keys import Endpoint, link_key, link_keys, sender_tag

NETKEY = bytes(range(100, 132))
SEG_A, SEG_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64
SEGMENT = {"gA": SEG_A, "gB": SEG_B, "gC": SEG_B}
FRAME = b"\xff" * 6 + b"\x02\x4c\x50\x00\x00\x0a" + b"\x08\x06" + bytes(46)
T0 = 1000.0


def keys_of(me: str, peer: str, pw_id: int = 1) -> tuple[bytes, bytes]:
    """What ``me``'s key server hands ``me`` for its link to ``peer`` (netkey_req peer_id)."""
    return link_keys(NETKEY, pw_id, Endpoint(SEGMENT[me], me), Endpoint(SEGMENT[peer], peer))


def tunnel(me: str, peers: tuple[str, ...], pn_start: int = 1 << 40, floors=None, pw_ids=(1,)) -> T.Tunnel:
    tun = T.Tunnel(me, peers, pn_start=pn_start, floors=floors)
    for peer in peers:
        for pw_id in pw_ids:
            assert tun.install(peer, pw_id, *keys_of(me, peer, pw_id), T0)
    return tun


def seal_raw(key: bytes, tag: bytes, pw_id: int, pn: int, frame: bytes = FRAME) -> bytes:
    aad = W.encode_header(tag, pw_id, pn)
    return aad + aead.make_aead(aead.AES_256_GCM, key).encrypt(aead.nonce(pn), frame, aad)


def keys_a_gateway_holds(gw: str) -> list[bytes]:
    """Every key ``gw`` can get from its key server: both keys of every link it may
    ask about (any peer ID it names, local or remote)."""
    out = []
    for peer in ("gA", "gB", "gC"):
        if peer != gw:
            out += keys_of(gw, peer)
        # It may also name a gateway of its own segment as a "peer": the server still
        # derives the link under its own and the peer segment's fingerprints.
        out += link_keys(NETKEY, 1, Endpoint(SEGMENT[gw], gw), Endpoint(SEG_A if SEGMENT[gw] == SEG_B else SEG_B, peer))
    return out


# --- finding 8: who may speak as gB ----------------------------------------------------


def test_genuine_link_traffic_opens_both_ways():
    ga, gb = tunnel("gA", ("gB", "gC")), tunnel("gB", ("gA",))
    assert ga.open("gB", gb.seal("gA", FRAME, T0), T0) == FRAME
    assert gb.open("gA", ga.seal("gB", FRAME, T0), T0) == FRAME
    assert ga.seal("gC", FRAME, T0)[2:8] == sender_tag("gA")


def test_another_gateway_cannot_seal_as_gb():
    """gC holds every key its key server would give it; nothing it seals under gB's tag,
    even sent from gB's address, is opened by gA."""
    ga = tunnel("gA", ("gB", "gC"))
    forged = [seal_raw(key, sender_tag("gB"), 1, (1 << 41) + i) for i, key in enumerate(keys_a_gateway_holds("gC"))]
    assert all(ga.open("gB", d, T0) is None for d in forged)
    assert ga.drops == {T.BAD_TAG: len(forged)}
    # gC speaking as itself works, but only from its own address.
    gc = tunnel("gC", ("gA",))
    datagram = gc.seal("gA", FRAME, T0)
    assert ga.open("gB", datagram, T0) is None and ga.drops[T.TAG_ADDRESS] == 1
    assert ga.open("gC", datagram, T0) == FRAME
    assert ga.counters["tunnel_opened"] == 1


def test_a_valid_tag_from_another_peers_address_is_dropped():
    ga, gb = tunnel("gA", ("gB", "gC")), tunnel("gB", ("gA",))
    datagram = gb.seal("gA", FRAME, T0)
    assert ga.open("gC", datagram, T0) is None
    assert dict(ga.drops) == {T.TAG_ADDRESS: 1}
    assert ga.open("gB", datagram, T0) == FRAME  # the same datagram from gB's address


def test_three_hundred_forged_tags_do_not_lock_out_the_real_peer():
    """Tags that are no configured peer's, each sealed with a real key an attacker
    holds, arrive from gB's address: dropped before any state, and gB's first
    datagram afterwards still opens."""
    ga, gb = tunnel("gA", ("gB",)), tunnel("gB", ("gA",))
    key = keys_a_gateway_holds("gC")[0]
    forged = [seal_raw(key, (0x024C47200000 + i).to_bytes(6, "big"), 1, (1 << 41) + i) for i in range(300)]
    assert all(ga.open("gB", d, T0) is None for d in forged)
    assert dict(ga.drops) == {T.UNKNOWN_TAG: 300}
    assert all(slot.replay.highest == -1 for link in ga.links.values() for slot in [link.keys.current])
    assert ga.open("gB", gb.seal("gA", FRAME, T0), T0) == FRAME


def test_the_link_keys_name_the_cipher_the_version_and_both_ends():
    """The Low item of issue 15: a cipher change must not reuse derived keys."""
    a, b = Endpoint(SEG_A, "gA"), Endpoint(SEG_B, "gB")
    base = link_key(NETKEY, 1, a, b)
    assert link_key(NETKEY, 1, a, b, cipher=aead.CHACHA20_POLY1305) != base
    others = {link_key(NETKEY, 2, a, b), link_key(NETKEY, 1, b, a), link_key(NETKEY, 1, Endpoint(SEG_B, "gA"), b),
              link_key(NETKEY, 1, a, Endpoint(SEG_A, "gB")), link_key(bytes(32), 1, a, b)}
    assert base not in others and len(others) == 5
    # A fixed vector: HKDF-SHA256 over NETKEY with the info laid out as the module says.
    info = (b"l2crypt v2 tunnel" + bytes([11]) + b"aes-256-gcm" + (1).to_bytes(4, "big")
            + bytes([len(SEG_A)]) + SEG_A.encode() + b"\x02gA" + bytes([len(SEG_B)]) + SEG_B.encode() + b"\x02gB")
    assert base == HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(NETKEY)


def test_unknown_peer_keys_and_repeated_versions_are_ignored():
    ga = tunnel("gA", ("gB",))
    assert not ga.install("gZ", 1, *keys_of("gA", "gB"), T0)
    slot = ga.links["gB"].keys.current
    slot.replay.update(1 << 41)
    assert not ga.install("gB", 1, *keys_of("gA", "gB"), T0 + 1)  # never a fresh window under a held version
    assert ga.links["gB"].keys.current is slot and slot.replay.highest == 1 << 41


def test_two_peers_with_one_tag_are_refused():
    with pytest.raises(ValueError, match="sender tag"):
        T.Tunnel("gA", ("gB", "gB"))


# --- finding 1: a restarted gateway refuses what was recorded before ---------------------


class Receiver:
    """gA's tunnel with its floors file, as the daemon runs it (saves every half second)."""

    def __init__(self, saved: bytes | None, now: float):
        self.book = rf.FloorBook()
        if saved is not None:
            self.book.restore(rf.decode(saved), now)
        self.tun = tunnel("gA", ("gB",), floors=self.book)
        self.next_save = now

    def tick(self, now: float) -> bytes:
        self.tun.on_timer(now)
        if now >= self.next_save:
            self.book.save(self.tun.highest(), now)
            self.next_save = now + rf.SAVE_INTERVAL_S
        return self.book.encode()


def test_tunnel_datagrams_recorded_before_a_restart_are_refused_after_it():
    gb = tunnel("gB", ("gA",), pn_start=int(T0 * PN_PER_SECOND))
    rx = Receiver(None, T0)
    recorded, saved = [], rx.tick(T0)
    now = T0
    for i in range(300):  # 3 s of traffic, a datagram every 10 ms, ticks every 100 ms
        now = round(T0 + i * 0.01, 3)
        if i % 10 == 0:
            gb.on_timer(now)
            saved = rx.tick(now)
        d = gb.seal("gA", FRAME, now)
        assert rx.tun.open("gB", d, now) == FRAME
        recorded.append(d)
    # kill -9 between two saves, restart: the same link keys come back from the key server.
    now += 0.8
    rx = Receiver(saved, now)
    rx.tick(now)
    assert [rx.tun.open("gB", d, now) for d in recorded] == [None] * len(recorded)
    assert dict(rx.tun.drops) == {T.REPLAYED: len(recorded)}
    # gB's genuine datagrams pass again once its clock has moved past the floor (bounded).
    opened_at = None
    while now < T0 + 10:
        now = round(now + 0.1, 3)
        gb.on_timer(now)
        rx.tick(now)
        if rx.tun.open("gB", gb.seal("gA", FRAME, now), now) is not None:
            opened_at = now
            break
    assert opened_at is not None and opened_at - (T0 + 2.99) <= 2 * rf.SAVE_INTERVAL_S + rf.SLACK_S + 0.8 + 0.2


def test_the_send_counter_follows_the_clock():
    gb = tunnel("gB", ("gA",), pn_start=5 * PN_PER_SECOND)
    gb.on_timer(100.0)
    gb.on_timer(101.5)
    assert gb.send_pn == 5 * PN_PER_SECOND + int(1.5 * PN_PER_SECOND)
    assert W.decode_header(gb.seal("gA", FRAME, 101.5)).packet_number == 5 * PN_PER_SECOND + int(1.5 * PN_PER_SECOND)


def test_nothing_is_accepted_while_the_floors_are_unsaved():
    gb = tunnel("gB", ("gA",))
    rx = Receiver(None, T0)
    d = gb.seal("gA", FRAME, T0)
    assert rx.tun.open("gB", d, T0) is None and rx.tun.drops == {T.FLOORS_UNSAVED: 1}  # never saved yet
    rx.tick(T0)
    assert rx.tun.open("gB", d, T0) == FRAME
    assert rx.tun.open("gB", gb.seal("gA", FRAME, T0 + 5), T0 + 5) is None  # last save 5 s ago
    assert rx.tun.drops[T.FLOORS_UNSAVED] == 2


def test_a_retired_version_leaves_its_top_as_the_floor():
    book = rf.FloorBook()
    ga = T.Tunnel("gA", ("gB",), floors=book, retire_after_s=1.0, switch_after_s=0.0)
    gb = T.Tunnel("gB", ("gA",), pn_start=1 << 40)
    for tun, me, peer in ((ga, "gA", "gB"), (gb, "gB", "gA")):
        tun.install(peer, 1, *keys_of(me, peer, 1), T0)
    d1 = gb.seal("gA", FRAME, T0)
    assert ga.open("gB", d1, T0) is None  # floors never saved: refused
    book.save([], T0)
    assert ga.open("gB", d1, T0) == FRAME
    for tun, me, peer in ((ga, "gA", "gB"), (gb, "gB", "gA")):
        tun.install(peer, 2, *keys_of(me, peer, 2), T0 + 1)
    ga.on_timer(T0 + 1)  # switch to version 2 at once
    book.save(ga.highest(), T0 + 1)
    ga.on_timer(T0 + 3)  # version 1 retired
    assert ga.links["gB"].keys.lookup(1) is None
    assert book.floor(sender_tag("gB")) == W.decode_header(d1).packet_number


def test_datagrams_under_a_newer_version_ask_the_key_server_at_most_once_a_second():
    """gB's tag from gB's address, under made-up newer versions: a request a second, not one per datagram."""
    ga = tunnel("gA", ("gB",))
    asked = 0
    for i in range(1000):  # 10 s of forged datagrams, 100 a second
        now = T0 + i * 0.01
        assert ga.open("gB", seal_raw(bytes(32), sender_tag("gB"), 2 + i, 1 << 41), now) is None
        asked += ga.wants_key
        ga.wants_key = False
    assert ga.drops == {T.NO_NETKEY: 1000} and 10 <= asked <= 11


def test_a_version_pushed_out_by_quick_rotations_leaves_its_floor():
    """Drift (issue 12, step 2): the tunnel noted a version's top only when
    it retired on time, not when a newer push promoted over it."""
    book = rf.FloorBook()
    book.save([], T0)
    ga = T.Tunnel("gA", ("gB",), floors=book, switch_after_s=60.0)
    gb = T.Tunnel("gB", ("gA",), pn_start=1 << 40)
    for tun, me, peer in ((ga, "gA", "gB"), (gb, "gB", "gA")):
        tun.install(peer, 1, *keys_of(me, peer, 1), T0)
    d1 = gb.seal("gA", FRAME, T0)
    assert ga.open("gB", d1, T0) == FRAME
    for pw_id in (2, 3, 4):  # 3 promotes 2, 4 promotes 3: version 1 leaves
        ga.install("gB", pw_id, *keys_of("gA", "gB", pw_id), T0 + 0.1 * pw_id)
    assert [s.pw_id for s in ga.links["gB"].keys.slots()] == [2, 3, 4]
    assert book.floor(sender_tag("gB")) == W.decode_header(d1).packet_number


# --- issue 17: a key per path ---------------------------------------------------------


def path_keys(me: str, peer: str, path: int, pw_id: int = 1) -> tuple[bytes, bytes]:
    """What the key server hands ``me`` for ``path`` of its link to ``peer`` (netkey_req path)."""
    return link_keys(NETKEY, pw_id, Endpoint(SEGMENT[me], me), Endpoint(SEGMENT[peer], peer), path=path)


def multipath_pair(paths=(1, 2, 3)) -> tuple[T.Tunnel, T.Tunnel]:
    ga = T.Tunnel("gA", ("gB",), pn_start=1 << 40, paths={"gB": paths})
    gb = T.Tunnel("gB", ("gA",), pn_start=1 << 40, paths={"gA": paths})
    for path in paths:
        assert ga.install("gB", 1, *path_keys("gA", "gB", path), T0, path)
        assert gb.install("gA", 1, *path_keys("gB", "gA", path), T0, path)
    return ga, gb


def test_each_path_has_its_own_key_and_says_its_path_in_the_clear():
    ga, gb = multipath_pair()
    for path in (1, 2, 3):
        datagram = gb.seal("gA", FRAME, T0, path)
        header = W.decode_header(datagram)
        assert (header.path, header.kind, header.pw_id) == (path, W.KIND_DATA, 1)
        assert ga.open("gB", datagram, T0, path) == FRAME
    assert len({k for p in (1, 2, 3) for k in path_keys("gA", "gB", p)}) == 6
    assert path_keys("gA", "gB", 0) == keys_of("gA", "gB")  # path 0 keeps the one-path key


def test_one_paths_key_opens_none_of_the_other_paths_datagrams():
    """Issue 17: who holds path 1's key (a relay operator given it, say) opens path 1's
    share and nothing else; a datagram moved to another path's address is refused."""
    _, gb = multipath_pair()
    send_1, _ = path_keys("gB", "gA", 1)
    opener = aead.make_aead(aead.AES_256_GCM, send_1)
    opened = {}
    for path in (1, 2, 3):
        datagram = gb.seal("gA", FRAME, T0, path)
        header = W.decode_header(datagram)
        try:
            opened[path] = opener.decrypt(aead.nonce(header.packet_number), W.body_of(datagram), W.aad_of(datagram))
        except Exception:
            opened[path] = None
    assert opened == {1: FRAME, 2: None, 3: None}
    ga, gb = multipath_pair()
    datagram = gb.seal("gA", FRAME, T0, 2)
    assert ga.open("gB", datagram, T0, 1) is None and ga.drops[T.PATH_ADDRESS] == 1
    relabelled = bytearray(datagram)
    relabelled[1] = 1 << 4 | W.KIND_DATA  # claims path 1, sealed under path 2's key
    assert ga.open("gB", bytes(relabelled), T0, 1) is None and ga.drops[T.BAD_TAG] == 1
    relabelled[1] = 9 << 4 | W.KIND_DATA
    assert ga.open("gB", bytes(relabelled), T0, 9) is None and ga.drops[T.UNKNOWN_PATH] == 1
    assert ga.open("gB", datagram, T0, 2) == FRAME


def test_paths_keep_replay_floors_of_their_own():
    ga, gb = multipath_pair((0, 1))
    ga.open("gB", gb.seal("gA", FRAME, T0, 0), T0, 0)
    ga.open("gB", gb.seal("gA", FRAME, T0, 1), T0, 1)
    names = {name for name, _ in ga.highest()}
    assert names == {sender_tag("gB"), sender_tag("gB") + b"\x01"}
