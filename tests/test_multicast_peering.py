"""Peered key servers agree on one multicast key, over mutual TLS on 127.0.0.1:

    KS-A (CA A) <--- peering, ext "multicast" ---> KS-B (CA B)

The server with the smaller CA fingerprint leads; the other adopts its
versions (same PW_ID, same key) and announces each to its hosts, asks the
leader to rotate when it holds another key (its first one, or a rotation after
a revocation here), and never rotates on its own timer."""

import asyncio
import math
import time

import msgpack
import pytest

from keyserverd.peering import multicast as mp
from keyserverd.service import revoke_and_rotate
from test_peering import NOW, make_peering, pinned, run, sides  # noqa: F401  (sides is a fixture)

KEY = bytes(range(32))


# --- the body wire format ------------------------------------------------------

def test_requests_and_answers_round_trip():
    assert mp.decode_request(mp.encode_request("current")) == ("current", None)
    assert mp.decode_request(mp.encode_request("rotate", 7)) == ("rotate", 7)
    assert mp.decode_answer(mp.encode_answer(3, KEY)) == (3, KEY)


@pytest.mark.parametrize("body", [
    b"", b"\x81", msgpack.packb([1, 2]), msgpack.packb({"op": "rotate"}), msgpack.packb({"op": "current", "x": 1}),
    msgpack.packb({"op": "drop"}), msgpack.packb({"op": "rotate", "above": 0}),
    msgpack.packb({"op": "rotate", "above": 2**32}), msgpack.packb({"op": "rotate", "above": True}),
    msgpack.packb({"op": "rotate", "above": "3"}), b"\x00" * (mp.MAX_BODY + 1),
])
def test_malformed_requests_are_refused(body):
    with pytest.raises(ValueError):
        mp.decode_request(body)


@pytest.mark.parametrize("body", [
    mp.encode_answer(3, KEY)[:-1], msgpack.packb({"pw_id": 3, "key": KEY[:31]}),
    msgpack.packb({"pw_id": 3, "key": KEY + b"x"}), msgpack.packb({"pw_id": 0, "key": KEY}),
    msgpack.packb({"pw_id": 3}), msgpack.packb({"pw_id": 3, "key": KEY, "more": 1}),
    msgpack.packb({"pw_id": 3, "key": KEY.hex()}),
])
def test_malformed_answers_are_refused(body):
    with pytest.raises(ValueError):
        mp.decode_answer(body)


def test_we_never_send_what_we_would_refuse():
    with pytest.raises(ValueError):
        mp.encode_request("rotate", 0)
    with pytest.raises(ValueError):
        mp.encode_answer(1, b"short")


# --- agreement over TLS -----------------------------------------------------------

def leader_and_follower(a, b):
    return (a, b) if a.ca.ca_fingerprint() < b.ca.ca_fingerprint() else (b, a)


def pushed_multicast(side, since):
    """The multicast pushes the follower's server would send for its new events."""
    out = []
    for event in side.store.events_since(since):
        for target, msg in side.service.on_event(event):
            if msg.get("t") == "multicast":
                out.append((target, msg["pw_id"], msg["key"]))
    return out


def test_follower_adopts_the_leaders_versions_and_announces_them(sides):
    a, b = sides
    lead, follow = leader_and_follower(a, b)

    async def body():
        pl, pf = make_peering(lead, follow), make_peering(follow, lead)
        ml, mf = mp.MulticastAgreement(pl, lead.service), mp.MulticastAgreement(pf, follow.service)
        assert ml.is_leader and not mf.is_leader
        await pl.start()
        await pf.start()
        try:
            await pinned(pf)
            await pinned(pl)
            # Both start with their own PW_ID 1: different keys under one PW_ID.
            assert lead.store.current_multicast_key()[1] == follow.store.current_multicast_key()[1] == 1
            assert lead.store.current_multicast_key() != follow.store.current_multicast_key()
            seq = follow.store.last_event_seq()
            assert await mf.sync_once() is True
            agreed = lead.store.current_multicast_key()
            assert agreed[1] == 2 and follow.store.current_multicast_key() == agreed
            assert pushed_multicast(follow, seq) == [(("broadcast", None), 2, agreed[0])]
            assert mf.counters == {"adopted": 1, "rotations_asked": 1, "polls_failed": 0, "rotate_refused": 0}
            # In sync: nothing changes, nothing is announced.
            seq = follow.store.last_event_seq()
            assert await mf.sync_once() is True
            assert follow.store.current_multicast_key() == agreed and follow.store.events_since(seq) == []
            # The leader's timer rotates; the follower takes the new version as it is.
            assert lead.store.rotate_multicast_key(NOW + 10) == 3
            assert await mf.sync_once() is True
            assert follow.store.current_multicast_key() == lead.store.current_multicast_key()
            assert follow.store.current_multicast_key()[1] == 3
            assert mf.counters["rotations_asked"] == 1
        finally:
            await pf.close()
            await pl.close()

    run(body)


def test_revocation_at_a_follower_makes_the_leader_rotate(sides):
    a, b = sides
    lead, follow = leader_and_follower(a, b)
    victim = "a1" if follow is a else "b1"

    async def body():
        pl, pf = make_peering(lead, follow), make_peering(follow, lead)
        mp.MulticastAgreement(pl, lead.service)
        mf = mp.MulticastAgreement(pf, follow.service)
        await pl.start()
        await pf.start()
        try:
            await pinned(pf)
            await pinned(pl)
            assert await mf.sync_once()
            before = lead.store.current_multicast_key()
            # `keyserverd host revoke` at the follower rotates its multicast key locally...
            revoke_and_rotate(follow.store, victim, NOW + 20)
            assert follow.store.current_multicast_key()[1] == before[1] + 1
            # ...and the next poll makes the leader rotate above it, for everyone.
            assert await mf.sync_once()
            after = lead.store.current_multicast_key()
            assert after[1] == before[1] + 2 and after[0] != before[0]
            assert follow.store.current_multicast_key() == after
            assert lead.service.rotations["multicast_peer"] == 2  # first sync, then the revocation
        finally:
            await pf.close()
            await pl.close()

    run(body)


def test_follower_polls_in_the_background_and_never_rotates_on_its_timer(sides):
    a, b = sides
    lead, follow = leader_and_follower(a, b)

    async def body():
        pl, pf = make_peering(lead, follow), make_peering(follow, lead)
        ml = mp.MulticastAgreement(pl, lead.service, poll_s=0.1)
        mf = mp.MulticastAgreement(pf, follow.service, poll_s=0.1)
        await pl.start()
        await pf.start()
        ml.start()
        mf.start()
        try:
            assert follow.service.multicast_rekey_after_s == math.inf
            assert lead.service.multicast_rekey_after_s != math.inf
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while follow.store.current_multicast_key() != lead.store.current_multicast_key():
                assert loop.time() < deadline, "the follower did not adopt the leader's key in time"
                await asyncio.sleep(0.05)
            agreed = follow.store.current_multicast_key()
            follow.service.periodic(time.time() + 10 * 86400)  # long past any rotation time
            assert follow.store.current_multicast_key() == agreed
            lead.service.periodic(time.time() + 10 * 86400)  # the leader's timer rotates for everyone
            assert lead.store.current_multicast_key()[1] == agreed[1] + 1
            while follow.store.current_multicast_key() != lead.store.current_multicast_key():
                assert loop.time() < deadline, "the follower did not follow the leader's rotation"
                await asyncio.sleep(0.05)
        finally:
            await mf.close()
            await ml.close()
            await pf.close()
            await pl.close()

    run(body)


def test_only_the_leader_rotates_and_bad_bodies_are_refused(sides):
    a, b = sides
    lead, follow = leader_and_follower(a, b)

    async def body():
        pl, pf = make_peering(lead, follow), make_peering(follow, lead)
        mp.MulticastAgreement(pl, lead.service)
        mp.MulticastAgreement(pf, follow.service)
        await pl.start()
        await pf.start()
        try:
            await pinned(pl)
            await pinned(pf)
            spec = pl.peers[0]
            before = follow.store.current_multicast_key()
            rotate = {"t": "ext", "rid": 4, "kind": "multicast", "body": mp.encode_request("rotate", 1)}
            answer = await pl.ask(spec, rotate)
            assert (answer["t"], answer["code"]) == ("error", "not_leader")
            assert follow.store.current_multicast_key() == before
            current = await pl.ask(spec, dict(rotate, body=mp.encode_request("current")))
            assert mp.decode_answer(current["body"]) == (before[1], before[0])
            bad = await pl.ask(spec, dict(rotate, body=b"\xc1"))
            assert (bad["t"], bad["code"]) == ("error", "bad_request")
        finally:
            await pf.close()
            await pl.close()

    run(body)


def test_a_peer_cannot_use_up_the_pw_id_space_or_make_the_leader_rotate_without_end(sides):
    a, b = sides
    lead, follow = leader_and_follower(a, b)

    async def body():
        pl, pf = make_peering(lead, follow), make_peering(follow, lead)
        ml = mp.MulticastAgreement(pl, lead.service)
        mp.MulticastAgreement(pf, follow.service)
        await pl.start()
        await pf.start()
        try:
            await pinned(pf)
            await pinned(pl)
            spec = pf.peers[0]
            newest = lead.store.current_multicast_key()[1]

            def rotate(above):
                return pf.ask(spec, {"t": "ext", "rid": 1, "kind": "multicast",
                                     "body": mp.encode_request("rotate", above)})
            far = await rotate(mp.PW_ID_MAX)
            assert (far["t"], far["code"]) == ("error", "bad_request")
            assert lead.store.current_multicast_key()[1] == newest
            # Within reach: rotations, until the peer's budget is spent (then the current version).
            answers = [mp.decode_answer((await rotate(newest))["body"])[0] for _ in range(mp.ROTATION_BURST + 3)]
            assert answers[:mp.ROTATION_BURST] == list(range(newest + 1, newest + 1 + mp.ROTATION_BURST))
            assert set(answers[mp.ROTATION_BURST:]) == {newest + mp.ROTATION_BURST}
            assert ml.counters["rotate_refused"] == 4  # the far one and three over the budget
        finally:
            await pf.close()
            await pl.close()

    run(body)
