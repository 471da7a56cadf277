"""The key events, applied to the frame engine where it runs.

The agent's key client hears keys, revocations and the cipher from the key
server; this is what they do to the engine and the frame pump.  It runs in
the agent's own process (``datapath_process = false``: the agent calls it
directly) or in the datapath process (``datapath_proc.DatapathWorker`` calls
it for each message of ``core.datapath_msgs``), the same code either way.

1. ``use_cipher``, ``set_key_max_age``: from the key server's welcome.
2. ``install_pair_key``, ``install_multicast_key``: a key answer or push;
   the frames the key released from the hold queue leave at once
   (``FramePump.deliver``).
3. ``revoke_peer``, ``mark_unknown``: the server revoked a host, or knows no
   host at a MAC.
4. ``retry_pending``: a new key-server connection asks again for every key
   still pending.
5. ``tick(now)``: every tick of the loop: the key requests the engine raised
   go out (``request_key``), its timers run, its notices go out
   (``send_notice``).
"""

from __future__ import annotations

import logging
from typing import Callable

from l2crypt.core import engine as engine_mod
from l2crypt.core.engine import FrameEngine
from l2crypt.core.frame_wire import format_mac
from l2crypt.ops.logs import fields

from .frame_pump import FramePump

log = logging.getLogger("l2crypt.agent")


class EngineDriver:
    """Applies key events to one engine and its pump (see the module docstring).

    ``request_key(mac)`` sends one key request (``GROUP_MAC``: the multicast
    key); ``send_notice(kind, mac, pw_id)`` one notice.  Owned by the loop
    that owns the engine."""

    def __init__(self, engine: FrameEngine, pump: FramePump, request_key: Callable[[bytes], None],
                 send_notice: Callable[[str, bytes, int], None]):
        self.engine = engine
        self.pump = pump
        self.request_key = request_key
        self.send_notice = send_notice

    # 1
    def use_cipher(self, cipher: str) -> None:
        if engine_mod.use_cipher(self.engine, cipher):
            log.info("cipher_selected", extra=fields(cipher=cipher))

    def set_key_max_age(self, seconds: float) -> None:
        if seconds != self.engine.key_max_age_s:
            self.engine.set_key_max_age(seconds)
            log.info("key_max_age", extra=fields(seconds=seconds))

    # 2
    def install_pair_key(self, peer_mac: bytes, peer_id: str, key: bytes, pw_id: int, now: float,
                         age_s: float = 0, older=()) -> None:
        engine = self.engine
        peer = engine.peers.get(peer_mac)
        held = peer.keys.newest_pw_id() if peer is not None else 0
        if peer is not None and peer.peer_id != peer_id:
            log.warning("peer_replaced", extra=fields(peer_mac=format_mac(peer_mac), was=peer.peer_id, now=peer_id))
            held = 0
        delivered = engine.install_pair_key(peer_mac, peer_id, key, pw_id, now, age_s=age_s, older=older)
        if pw_id > held:
            now_held = engine.peers.get(peer_mac)
            log.info("key_installed", extra=fields(
                peer_mac=format_mac(peer_mac), peer_id=peer_id, pw_id=pw_id, age_s=age_s,
                held=",".join(str(s.pw_id) for s in now_held.keys.slots()) if now_held else "-",
                released=len(delivered.to_wire) + len(delivered.to_tap)))
        self.pump.deliver(delivered)

    def install_multicast_key(self, key: bytes, pw_id: int, now: float) -> None:
        held = self.engine.group.newest_pw_id()
        self.pump.deliver(self.engine.install_multicast_key(key, pw_id, now))
        if pw_id > held:
            log.info("multicast_key_installed", extra=fields(pw_id=pw_id))

    # 3
    def revoke_peer(self, mac: bytes) -> None:
        if mac != self.engine.my_mac and mac not in self.engine.revoked:
            log.warning("peer_revoked", extra=fields(peer_mac=format_mac(mac)))
            self.engine.revoke_peer(mac)

    def mark_unknown(self, mac: bytes, now: float) -> None:
        self.engine.mark_unknown(mac, now)

    # 4
    def retry_pending(self, now: float) -> None:
        for entry in self.engine.holds.pending.values():
            entry.next_request_at = 0.0
        self.send_key_requests(now)

    # 5
    def send_key_requests(self, now: float) -> None:
        """Send every key request the engine raised (also the pump's ``on_keys_wanted``)."""
        for mac in self.engine.take_key_requests(now):
            self.request_key(mac)

    def tick(self, now: float) -> None:
        self.send_key_requests(now)
        self.engine.on_timer(now)
        if self.engine.notices:
            for kind, mac, pw_id in self.engine.take_notices():
                log.info("key_notice", extra=fields(kind=kind, peer_mac=format_mac(mac), pw_id=pw_id))
                self.send_notice(kind, mac, pw_id)
