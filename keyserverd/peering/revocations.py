"""Revocations cross peering: a host revoked at key server X is dropped by the
hosts of peered server Y that hold pair keys with it.

Every server pulls each peer's list of revoked hosts over the peering channel
(``Peering.ask``, an ``ext`` request of kind ``revocations``).  Pulling, not
pushing, means a server that was down, or could not reach the peer, catches
up at its next poll after it is back; nothing is lost in between.

1. Every ``POLL_S`` (and as soon as a peer is pinned, ``FIRST_POLL_S``) ``RevocationSync`` asks
   each pinned peer ``{"since": V, "after": ""}`` where V is the version of
   that peer's list we last read in full (``RevocationBook.peer_version``).
2. The peer (``_answer``) lists its own revoked hosts that have a MAC, by ID:
   ``{"version": SHA-256 of the whole list, "hosts": [[id, mac], ...], "more": bool}``.
   When V is the current version the page is empty: nothing changed.  Pages
   hold at most ``PAGE`` hosts; the next one is asked with ``after`` = the
   last ID seen, up to ``MAX_PAGES`` pages a poll.
3. Each host of an answer is believed only if its ID is in that peer's
   namespace (``PeerSpec.owns``), is not one of our hosts, and its MAC is
   not a group address, not bound to one of our hosts and not mapped to one
   of our gateways: a peer can never make our hosts drop each other.  The
   rest is counted (``refused``) and logged.
4. ``service.apply_peer_revocations`` records the new ones in the
   ``RevocationBook`` (on disk, so welcomes name them after a restart too),
   stops answering for them (``peer_service``), and returns the
   ``peer_revoked`` pushes, which ``act`` sends to every connected host.

Body wire format (opaque bytes to ``peer_messages``), a msgpack map of at most
``MAX_BODY`` bytes; every field is checked (``decode_request``,
``decode_answer``), and a bad one is refused with a clear reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable

import msgpack

from l2crypt.core.errors import RemoteProtocolError
from l2crypt.core.frame_wire import format_mac, is_group_address
from l2crypt.core.ks_messages import valid_host_id
from l2crypt.ops.logs import RateLimiter, fields

from .channel import ASK_ERRORS, Peering, PeerSpec

log = logging.getLogger("keyserverd.revocation_peering")

KIND = "revocations"
POLL_S = 2.0
#: How soon to look again while a peer was never read (it is being pinned).
FIRST_POLL_S = 0.2
PAGE = 256
MAX_PAGES = 256
MAX_BODY = 32 * 1024
VERSION_BYTES = 32
MAC_BYTES = 6
WARN_EVERY_S = 10.0


# --- the body wire format ------------------------------------------------------

def _unpack(body: bytes, what: str) -> dict:
    if not isinstance(body, bytes) or len(body) > MAX_BODY:
        raise ValueError(f"revocations {what} is not bytes of at most {MAX_BODY}")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types for garbage
        raise ValueError(f"undecodable revocations {what}") from None
    if not isinstance(msg, dict):
        raise ValueError(f"revocations {what} is not a map")
    return msg


def encode_request(since: bytes, after: str) -> bytes:
    body = msgpack.packb({"since": since, "after": after}, use_bin_type=True)
    decode_request(body)  # never send what we would refuse
    return body


def decode_request(body: bytes) -> tuple[bytes, str]:
    """(since, after); ValueError for anything else."""
    msg = _unpack(body, "request")
    if set(msg) != {"since", "after"}:
        raise ValueError("revocations request wants exactly since and after")
    since, after = msg["since"], msg["after"]
    if not isinstance(since, bytes) or len(since) not in (0, VERSION_BYTES):
        raise ValueError(f"revocations since: want 0 or {VERSION_BYTES} bytes")
    if not isinstance(after, str) or (after and not valid_host_id(after)):
        raise ValueError("revocations after: want '' or a host ID")
    return since, after


def encode_answer(version: bytes, hosts: list[tuple[str, bytes]], more: bool) -> bytes:
    body = msgpack.packb({"version": version, "hosts": [[i, m] for i, m in hosts], "more": more},
                         use_bin_type=True)
    decode_answer(body, "")
    return body


def decode_answer(body: bytes, after: str) -> tuple[bytes, list[tuple[str, bytes]], bool]:
    """(version, hosts, more); ValueError for a malformed page (hosts must be
    valid IDs in ascending order after ``after``, with 6-byte MACs)."""
    msg = _unpack(body, "answer")
    if set(msg) != {"version", "hosts", "more"}:
        raise ValueError("revocations answer wants exactly version, hosts and more")
    version, hosts, more = msg["version"], msg["hosts"], msg["more"]
    if not isinstance(version, bytes) or len(version) != VERSION_BYTES:
        raise ValueError(f"revocations version: want {VERSION_BYTES} bytes")
    if not isinstance(more, bool):
        raise ValueError("revocations more: want true or false")
    if not isinstance(hosts, list) or len(hosts) > PAGE or (more and not hosts):
        raise ValueError(f"revocations hosts: want a list of at most {PAGE} (not empty when more)")
    out, last = [], after
    for entry in hosts:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], bytes) and len(entry[1]) == MAC_BYTES):
            raise ValueError("revocations host: want [host ID, 6-byte MAC]")
        host_id, mac = entry
        if not valid_host_id(host_id) or host_id <= last:
            raise ValueError(f"revocations host {host_id[:70]!r}: not a host ID in ascending order")
        out.append((host_id, mac))
        last = host_id
    return version, out, more


def list_version(hosts: list[tuple[str, bytes]]) -> bytes:
    """The version of a whole revoked list (sorted by ID)."""
    digest = hashlib.sha256()
    for host_id, mac in hosts:
        digest.update(host_id.encode() + b"\0" + mac)
    return digest.digest()


# --- both sides -------------------------------------------------------------------

class RevocationSync:
    """Answers the peers' polls and polls them (see the module docstring)."""

    def __init__(self, peering: Peering, service, act: Callable[[list], None], poll_s: float = POLL_S):
        self.peering = peering
        self.service = service
        self.act = act
        self.poll_s = poll_s
        self.counters = {"polls": 0, "polls_failed": 0, "learned": 0, "refused": 0}
        self._warn_limit = RateLimiter(WARN_EVERY_S)
        self._task: asyncio.Task | None = None
        peering.register_ext(KIND, self._answer)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)

    # --- answering (on the peering listener) --------------------------------------
    def _revoked_here(self) -> list[tuple[str, bytes]]:
        return [(h.id, h.mac) for h in self.service.store.list_hosts() if h.revoked and h.mac is not None]

    def _answer(self, msg: dict, peer: PeerSpec) -> dict:
        try:
            since, after = decode_request(msg["body"])
        except ValueError as exc:
            return {"t": "error", "code": "bad_request", "msg": str(exc)}
        hosts = self._revoked_here()  # list_hosts is ordered by ID
        version = list_version(hosts)
        if since == version and not after:
            return {"t": "ext_ok", "body": encode_answer(version, [], False)}
        rest = [(i, m) for i, m in hosts if i > after]
        return {"t": "ext_ok", "body": encode_answer(version, rest[:PAGE], len(rest) > PAGE)}

    # --- polling ----------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        polled: set[str] = set()  # peers read at least once since we started
        while True:
            for spec in self.peering.peers:
                if spec.ca_fingerprint not in self.peering.pinned:
                    continue
                try:
                    await self.sync_peer(spec)
                    polled.add(spec.ca_fingerprint)
                except (*ASK_ERRORS, ValueError) as exc:
                    self.counters["polls_failed"] += 1
                    self._warn("revocation_poll_failed", spec.address, peer=spec.address,
                               reason=str(exc) or type(exc).__name__)
                except Exception:  # a bug (or a store hiccup) must not stop the polling for good
                    self.counters["polls_failed"] += 1
                    log.exception("revocation_poll_failed")
            # Until every peer was read once (just started: pinning), look again soon.
            everyone = all(p.ca_fingerprint in polled for p in self.peering.peers)
            await asyncio.sleep(self.poll_s if everyone else min(self.poll_s, FIRST_POLL_S))

    async def _ask(self, spec: PeerSpec, since: bytes, after: str):
        answer = await self.peering.ask(spec, {"t": "ext", "rid": 1, "kind": KIND,
                                               "body": encode_request(since, after)})
        if answer.get("t") != "ext_ok":
            raise RemoteProtocolError(f"peer refused revocations: {answer.get('code')}: {answer.get('msg')}",
                                      answer.get("code", "refused"))
        return decode_answer(answer["body"], after)

    async def sync_peer(self, spec: PeerSpec) -> int:
        """One poll of one peer; the number of newly learned revocations."""
        self.counters["polls"] += 1
        book = self.service.welcome_revocations.book
        version, page, more = await self._ask(spec, book.peer_version(spec.ca_fingerprint), "")
        hosts = list(page)
        for _ in range(MAX_PAGES - 1):
            if not more:
                break
            _, page, more = await self._ask(spec, b"", hosts[-1][0])
            hosts += page
        # A list cut short keeps no version, so the next poll reads it again.
        pushes = self.service.apply_peer_revocations(spec, self._believed(spec, hosts),
                                                     b"" if more else version, time.time())
        self.counters["learned"] += len(pushes)  # one push per new revocation
        if pushes:
            self.act(pushes)
        return len(pushes)

    def _believed(self, spec: PeerSpec, hosts: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        out = []
        for host_id, mac in hosts:
            if not spec.owns(host_id):
                reason = "not one of the peer's host IDs"
            elif self.service.store.get_host(host_id) is not None:
                reason = "one of our hosts"
            elif is_group_address(mac):
                reason = "a group address"
            elif self.service._resolve(mac) is not None:
                reason = "the MAC is ours (a host or a gateway's)"
            else:
                out.append((host_id, mac))
                continue
            self.counters["refused"] += 1
            self._warn("peer_revocation_refused", (spec.address, host_id), peer=spec.address, host=host_id,
                       mac=format_mac(mac), reason=reason)
        return out

    def _warn(self, event: str, key, **kv) -> None:
        if self._warn_limit.allow((event, key)):
            log.warning(event, extra=fields(**kv, suppressed=self._warn_limit.take_suppressed((event, key))))
