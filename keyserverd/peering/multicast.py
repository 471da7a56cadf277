"""One multicast key for peered key servers, so ARP and ND work across cascaded switches.

Hosts of peered key servers share one broadcast domain: a broadcast sealed by
a host of KS-A must open at a host of KS-B, so all peered servers hand out the
same multicast key versions (same PW_ID, same key).

1. The *leader* is the key server with the smallest CA fingerprint among
   itself and its configured peers; every other one is a *follower*.  Every
   server must be peered with the leader (a full mesh, or a star around it).
2. A follower polls the leader every ``POLL_S`` over the peering channel
   (``Peering.ask``, an ``ext`` request of kind ``multicast``):
   - ``current`` -> the leader's newest (pw_id, key);
   - leader's PW_ID newer than every version we hold: store it as ours
     (``store.adopt_multicast_key``, a ``multicast`` event: the server pushes
     it to its hosts like one of its own rotations);
   - the same PW_ID and key: in sync, nothing to do;
   - we are ahead or hold another key under that PW_ID (our own first key, or a
     rotation made here by ``keyserverd host revoke`` / ``rekey --multicast``):
     ``rotate above N`` -> the leader stores a fresh version above both and
     answers with it, and we adopt it.  So a revocation at a follower makes the
     leader rotate for everyone, one poll later.
3. A follower never rotates the multicast key on its own timer
   (``service.multicast_rekey_after_s`` is set to infinity); the leader's timer
   rotates for every server.  A follower that cannot reach the leader keeps its
   current key and tries again at the next poll (counted in ``counters``).
4. A follower answers ``current`` too (its adopted key), but refuses
   ``rotate`` with ``not_leader``: it never forwards.
5. The leader rotates for a peer's ``rotate above N`` only when N is at most
   ``MAX_AHEAD`` above its newest version (a peer cannot use up the 32-bit
   PW_ID space) and within a per-peer budget (``ROTATIONS_PER_S``, burst
   ``ROTATION_BURST``); otherwise it answers with its current version and
   counts ``rotate_refused`` (the follower asks again at its next poll).

Body of the ``ext`` request and answer (opaque bytes to ``peer_messages``): a
msgpack map, at most ``MAX_BODY`` bytes:
    request  {"op": "current"}  or  {"op": "rotate", "above": N}
    answer   {"pw_id": N, "key": 32 bytes}
Key bytes never reach a log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import ssl
import time

import msgpack

from keyserverd.ratelimit import HostBuckets
from l2crypt.core.errors import RemoteProtocolError
from l2crypt.ops.logs import fields

from .channel import Peering, PeerSpec

log = logging.getLogger("keyserverd.multicast_peering")

KIND = "multicast"
POLL_S = 2.0
MAX_BODY = 256
KEY_BYTES = 32
PW_ID_MAX = 2**32 - 2  # "above" leaves room for one more version in 32 bits
#: How far above the leader's newest version a follower may be (its own rotations).
MAX_AHEAD = 1024
#: Rotations one peer may make the leader do, per second and at once.
ROTATIONS_PER_S = 0.5
ROTATION_BURST = 5


# --- the body wire format ------------------------------------------------------

def _unpack(body: bytes) -> dict:
    if not isinstance(body, bytes) or len(body) > MAX_BODY:
        raise ValueError(f"multicast body is not bytes of at most {MAX_BODY}")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types for garbage
        raise ValueError("undecodable multicast body") from None
    if not isinstance(msg, dict):
        raise ValueError("multicast body is not a map")
    return msg


def _pw_id(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= PW_ID_MAX:
        raise ValueError(f"multicast pw_id out of range: {value!r}")
    return value


def encode_request(op: str, above: int | None = None) -> bytes:
    msg = {"op": op} if above is None else {"op": op, "above": above}
    body = msgpack.packb(msg, use_bin_type=True)
    decode_request(body)  # never send what we would refuse
    return body


def decode_request(body: bytes) -> tuple[str, int | None]:
    """(op, above); ValueError for anything but ``current`` or ``rotate above N``."""
    msg = _unpack(body)
    if msg == {"op": "current"}:
        return "current", None
    if set(msg) == {"op", "above"} and msg["op"] == "rotate":
        return "rotate", _pw_id(msg["above"])
    raise ValueError("multicast request is neither current nor rotate above N")


def encode_answer(pw_id: int, key: bytes) -> bytes:
    body = msgpack.packb({"pw_id": pw_id, "key": key}, use_bin_type=True)
    decode_answer(body)
    return body


def decode_answer(body: bytes) -> tuple[int, bytes]:
    """(pw_id, key); ValueError for a malformed answer."""
    msg = _unpack(body)
    if set(msg) != {"pw_id", "key"}:
        raise ValueError("multicast answer wants exactly pw_id and key")
    key = msg["key"]
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"multicast key is not {KEY_BYTES} bytes")
    return _pw_id(msg["pw_id"]), key


# --- agreement -------------------------------------------------------------------

class MulticastAgreement:
    """Leader or follower of the multicast key (see the module docstring)."""

    def __init__(self, peering: Peering, service, poll_s: float = POLL_S):
        self.peering = peering
        self.service = service
        self.poll_s = poll_s
        mine = peering.name
        self.leader: PeerSpec | None = min(peering.peers, key=lambda p: p.ca_fingerprint, default=None)
        if self.leader is not None and self.leader.ca_fingerprint >= mine:
            self.leader = None  # we have the smallest fingerprint: we lead
        self.counters = {"adopted": 0, "rotations_asked": 0, "polls_failed": 0, "rotate_refused": 0}
        self._rotations = HostBuckets(ROTATIONS_PER_S, ROTATION_BURST)  # by peer CA; owned by _answer
        self.synced = False
        self._failing = False  # warned about an unreachable leader; owned by _follow
        self._task: asyncio.Task | None = None
        peering.register_ext(KIND, self._answer)

    @property
    def is_leader(self) -> bool:
        return self.leader is None

    def start(self) -> None:
        """Follow the leader in the background (a leader only answers)."""
        if self.is_leader:
            log.info("multicast_leader", extra=fields(peers=len(self.peering.peers)))
            return
        self.service.multicast_rekey_after_s = math.inf  # the leader's timer rotates for everyone
        log.info("multicast_follower", extra=fields(leader=self.leader.address))
        self._task = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    # --- answering (on the peering listener) --------------------------------------
    def _answer(self, msg: dict, peer: PeerSpec) -> dict:
        try:
            op, above = decode_request(msg["body"])
        except ValueError as exc:
            return {"t": "error", "code": "bad_request", "msg": str(exc)}
        store = self.service.store
        if op == "rotate":
            if not self.is_leader:
                return {"t": "error", "code": "not_leader", "msg": "this key server follows another one"}
            _, newest = store.current_multicast_key()
            if above > newest + MAX_AHEAD:
                self.counters["rotate_refused"] += 1
                return {"t": "error", "code": "bad_request",
                        "msg": f"rotate above {above}: more than {MAX_AHEAD} above the newest version {newest}"}
            now = time.time()
            pw_id = max(newest, above) + 1
            if not self._rotations.take(peer.ca_fingerprint, now):
                self.counters["rotate_refused"] += 1
            elif pw_id <= PW_ID_MAX and store.adopt_multicast_key(pw_id, secrets.token_bytes(KEY_BYTES), now):
                self.service.rotations["multicast_peer"] += 1
                log.info("multicast_key_rotated", extra=fields(pw_id=pw_id, cause="peer", peer=peer.address))
        key, pw_id = store.current_multicast_key()
        return {"t": "ext_ok", "body": encode_answer(pw_id, key)}

    # --- following ------------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            try:
                await self.sync_once()
                if self._failing:
                    log.info("multicast_leader_reachable", extra=fields(leader=self.leader.address))
                self._failing = False
            except (OSError, asyncio.TimeoutError, ssl.SSLError, RemoteProtocolError, EOFError,
                    ValueError) as exc:
                self.counters["polls_failed"] += 1
                # Once per outage at WARNING (the first polls fail until both sides pinned each other).
                level = logging.WARNING if not self._failing and self.counters["polls_failed"] > 3 else logging.DEBUG
                self._failing = self._failing or level == logging.WARNING
                log.log(level, "multicast_leader_unreachable",
                        extra=fields(leader=self.leader.address, reason=str(exc) or type(exc).__name__))
            except Exception:  # a bug (or a store hiccup) must not stop the polling for good
                self.counters["polls_failed"] += 1
                log.exception("multicast_sync_failed")
            await asyncio.sleep(self.poll_s)

    async def _ask(self, op: str, above: int | None = None) -> tuple[int, bytes]:
        answer = await self.peering.ask(self.leader, {"t": "ext", "rid": 1, "kind": KIND,
                                                      "body": encode_request(op, above)})
        if answer.get("t") != "ext_ok":
            raise RemoteProtocolError(f"leader refused {op}: {answer.get('code')}: {answer.get('msg')}",
                                      answer.get("code", "refused"))
        return decode_answer(answer["body"])

    async def sync_once(self) -> bool:
        """One poll of the leader; True when we hold its newest version afterwards."""
        store = self.service.store
        pw_id, key = await self._ask("current")
        mine, my_pw_id = store.current_multicast_key()
        if pw_id == my_pw_id and key == mine:
            self.synced = True
            return True
        if pw_id <= my_pw_id:  # we are ahead, or hold another key under its PW_ID
            self.counters["rotations_asked"] += 1
            pw_id, key = await self._ask("rotate", above=my_pw_id)
        self.synced = store.adopt_multicast_key(pw_id, key, time.time())
        if self.synced:
            self.counters["adopted"] += 1
            self.service.rotations["multicast_from_leader"] += 1
            log.info("multicast_key_adopted", extra=fields(pw_id=pw_id, leader=self.leader.address))
        return self.synced
