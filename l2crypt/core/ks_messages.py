"""Wire format of the key-server protocol (client <-> keyserverd, over TLS 1.3).

Framing: every message is a 4-byte big-endian body length followed by the
body, a msgpack map.  Bodies larger than ``MAX_MESSAGE_BYTES`` are refused
before they are read.  Every map has ``t`` (the type).  Requests that expect
an answer carry ``rid`` (a positive int chosen by the client); the answer
echoes it.  Pushes from the server carry ``rid`` 0.

Types and fields (bytes fields are raw bytes, MACs are 6 bytes, keys 32):

client -> server
    ca        rid                                  fetch the CA certificate (no client cert needed)
    enroll    rid id token csr                     csr is PEM; no client cert needed
    auth_begin rid                                 (a host whose key is on a token, no client
                                                   cert) send me a challenge
    auth      rid id cert challenge nonce server_fp sig
                                                   the answer: cert PEM, the challenge answered,
                                                   the host's nonce (32 bytes), SHA-256 of the
                                                   server certificate seen (32), and the ECDSA
                                                   signature (DER, at most MAX_SIG_LEN) over
                                                   ``challenge_wire.encode_signed_challenge``
    hello     rid mac                              bind (certificate ID, mac) in the ID-MAC table
    key_req   rid peer_mac [my_mac]                pair key for (me, owner of peer_mac)
    rekey_req rid peer_mac pw_id                   rotate our pair key, now at pw_id (data volume)
    key_report rid peer_mac pw_id                  I hold pw_id but the peer still sends older
    mcast_req rid                                  the current multicast key
    ping      rid                                  liveness probe
    map_req   rid mac side                         (gateways) map a MAC learned on ``side`` to me
    map_release rid mac                            (gateways) I no longer speak for this MAC (aged out)
    map_list  rid                                  (gateways) every MAC mapped to me, as ``mapped``
    netkey_req rid peer_id [path]                  (gateways) the keys of my tunnel link to gateway
                                                   peer_id (of the NETKEY peer segment), for every
                                                   live NETKEY version, as ``netkey``; ``path``
                                                   (0-15, default 0): the keys of that path only
    l3_hello  rid                                  start a layer-3 session (l2crypt l3-agent)
    ip_bind   rid ip                               bind (certificate ID, ip) in the ID-IP table;
                                                   ip is an IPv4 (4 bytes) or IPv6 (16) address
    ip_key_req rid peer_ip                         pair key for (me, owner of peer_ip), 4 or 16 bytes
    id_key_req rid peer_id                         pair key for (me, peer_id): nat mode finds
                                                   the sender by the ID in the packet
    l3_rekey_req rid peer_id pw_id                 as rekey_req, for an L3 pair
    l3_key_report rid peer_id pw_id                as key_report, for an L3 pair
server -> client
    ca_cert   rid cert                             PEM of the CA
    enrolled  rid cert ca                          signed client certificate and CA, PEM
    challenge rid challenge                        32 fresh random bytes (answer to auth_begin)
    authenticated rid id                           the auth was accepted: this connection is host id
    welcome   rid id mac cipher multicast_key multicast_pw_id server [key_max_age_s] [revoked_macs]
                                                   key_max_age_s: the longest a pair key may be used
                                                   after it was received, seconds (agents use it if
                                                   lower than theirs); revoked_macs: the MACs of
                                                   recently revoked hosts, 6 bytes each (at most
                                                   MAX_REVOKED_MACS): forget them (as peer_revoked)
    key       rid peer_mac peer_id key pw_id [age_s] [older]
                                                   answer to key_req, or a push (rid 0); age_s:
                                                   seconds since the server made pw_id; older:
                                                   up to OLDER_VERSIONS_MAX older versions still
                                                   held, [[pw_id, key, age_s], ...], newest first
    unknown   rid peer_mac                         no host holds that MAC
    multicast rid key pw_id                        a multicast key (answer or push)
    peer_revoked rid peer_mac                      the host at peer_mac is revoked: forget it (push)
    mapped    rid mac side                         the MAC is mapped to the asking gateway
    unmapped  rid mac                              the MAC is not (or no longer) mapped to the asking
                                                   gateway (answer to map_release; or a push, rid 0:
                                                   an enrolled host said hello with it, stop speaking for it)
    netkey    rid peer_id pw_id send_key recv_key [path]
                                                   the keys of one path of one tunnel link under
                                                   one NETKEY version (answer or push, gateways
                                                   only; NETKEY itself never leaves the key server)
    pong      rid
    error     rid code msg                         request refused; code is a stable name
    l3_welcome rid id cipher server                answer to l3_hello
    ip_bound  rid ip                               answer to ip_bind
    l3_key    rid peer_id key pw_id peer_ips [peer_ips6]
                                                   L3 pair key (answer or push); peer_ips is
                                                   the peer's bound IPv4 addresses, 4 bytes each
                                                   (may be empty), peer_ips6 its IPv6 ones, 16
                                                   bytes each (only if it has any)
    l3_unknown rid [peer_ip] [peer_id]             no (unrevoked, L3) host holds that IP or ID
    l3_peer_revoked rid peer_id                    the host is revoked: forget it (push)

1. ``encode_message`` turns a dict into a framed message (raises LocalError
   on our own bad dict).
2. ``FrameReader.feed`` takes received bytes and returns whole decoded,
   validated messages; a bad one raises ``RemoteProtocolError`` and the
   caller closes that one connection.
"""

from __future__ import annotations

from .constants import MAX_MESSAGE_BYTES
from .errors import RemoteProtocolError
from .msg_codec import LENGTH, MAX_STR_LEN, U32_MAX, MessageCodec  # noqa: F401  (re-exported)
from .msg_codec import FrameReader as _FrameReader

_B = bytes
# field -> (type, exact length or None)
_FIELDS: dict[str, tuple[type, int | None]] = {
    "rid": (int, None),
    "id": (str, None),
    "token": (str, None),
    "csr": (_B, None),
    "cert": (_B, None),
    "ca": (_B, None),
    "mac": (_B, 6),
    "my_mac": (_B, 6),
    "peer_mac": (_B, 6),
    "peer_id": (str, None),
    "key": (_B, 32),
    "send_key": (_B, 32),
    "recv_key": (_B, 32),
    "pw_id": (int, None),
    "path": (int, None),  # 0..MAX_TUNNEL_PATH, checked in validate
    "cipher": (str, None),
    "multicast_key": (_B, 32),
    "multicast_pw_id": (int, None),
    "server": (str, None),
    "code": (str, None),
    "msg": (str, None),
    "side": (str, None),
    "ip": (_B, None),  # 4 or 16 bytes, checked in validate
    "peer_ip": (_B, None),  # 4 or 16 bytes, checked in validate
    "peer_ips": (_B, None),  # with peer_ips6: 1..MAX_PEER_IPS addresses, checked in validate
    "peer_ips6": (_B, None),
    "age_s": (int, None),
    "older": (list, None),  # [[pw_id, key, age_s], ...], checked in _check_older
    "key_max_age_s": (int, None),
    "revoked_macs": (_B, None),  # 0..MAX_REVOKED_MACS MACs of 6 bytes, checked in validate
    "challenge": (_B, 32),  # challenge_wire.CHALLENGE_LEN
    "nonce": (_B, 32),  # challenge_wire.NONCE_LEN
    "server_fp": (_B, 32),  # challenge_wire.FINGERPRINT_LEN
    "sig": (_B, None),  # 1..MAX_SIG_LEN, checked in validate
}

# type -> (required fields, optional fields)
SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ca": (frozenset({"rid"}), frozenset()),
    "enroll": (frozenset({"rid", "id", "token", "csr"}), frozenset()),
    "auth_begin": (frozenset({"rid"}), frozenset()),
    "auth": (frozenset({"rid", "id", "cert", "challenge", "nonce", "server_fp", "sig"}), frozenset()),
    "challenge": (frozenset({"rid", "challenge"}), frozenset()),
    "authenticated": (frozenset({"rid", "id"}), frozenset()),
    "hello": (frozenset({"rid", "mac"}), frozenset()),
    "key_req": (frozenset({"rid", "peer_mac"}), frozenset({"my_mac"})),
    "rekey_req": (frozenset({"rid", "peer_mac", "pw_id"}), frozenset()),
    "key_report": (frozenset({"rid", "peer_mac", "pw_id"}), frozenset()),
    "mcast_req": (frozenset({"rid"}), frozenset()),
    "ping": (frozenset({"rid"}), frozenset()),
    "map_req": (frozenset({"rid", "mac", "side"}), frozenset()),
    "map_release": (frozenset({"rid", "mac"}), frozenset()),
    "map_list": (frozenset({"rid"}), frozenset()),
    "netkey_req": (frozenset({"rid"}), frozenset({"peer_id", "path"})),
    "mapped": (frozenset({"rid", "mac", "side"}), frozenset()),
    "unmapped": (frozenset({"rid", "mac"}), frozenset()),
    "netkey": (frozenset({"rid", "peer_id", "pw_id", "send_key", "recv_key"}), frozenset({"path"})),
    "ca_cert": (frozenset({"rid", "cert"}), frozenset()),
    "enrolled": (frozenset({"rid", "cert", "ca"}), frozenset()),
    "welcome": (
        frozenset({"rid", "id", "mac", "cipher", "multicast_key", "multicast_pw_id", "server"}),
        frozenset({"key_max_age_s", "revoked_macs"}),
    ),
    "key": (frozenset({"rid", "peer_mac", "peer_id", "key", "pw_id"}), frozenset({"age_s", "older"})),
    "unknown": (frozenset({"rid", "peer_mac"}), frozenset()),
    "multicast": (frozenset({"rid", "key", "pw_id"}), frozenset()),
    "peer_revoked": (frozenset({"rid", "peer_mac"}), frozenset()),
    "pong": (frozenset({"rid"}), frozenset()),
    "error": (frozenset({"rid", "code", "msg"}), frozenset()),
    # layer 3 (l2crypt l3-agent)
    "l3_hello": (frozenset({"rid"}), frozenset()),
    "ip_bind": (frozenset({"rid", "ip"}), frozenset()),
    "ip_key_req": (frozenset({"rid", "peer_ip"}), frozenset()),
    "id_key_req": (frozenset({"rid", "peer_id"}), frozenset()),
    "l3_rekey_req": (frozenset({"rid", "peer_id", "pw_id"}), frozenset()),
    "l3_key_report": (frozenset({"rid", "peer_id", "pw_id"}), frozenset()),
    "l3_welcome": (frozenset({"rid", "id", "cipher", "server"}), frozenset()),
    "ip_bound": (frozenset({"rid", "ip"}), frozenset()),
    "l3_key": (frozenset({"rid", "peer_id", "key", "pw_id", "peer_ips"}), frozenset({"peer_ips6"})),
    "l3_unknown": (frozenset({"rid"}), frozenset({"peer_ip", "peer_id"})),
    "l3_peer_revoked": (frozenset({"rid", "peer_id"}), frozenset()),
}

MAX_ID_LEN = 64
#: Most IP addresses (IPv4 and IPv6 together) one host may bind (and one ``l3_key`` may carry).
MAX_PEER_IPS = 16
#: Most older versions a ``key`` message carries: an agent's key ring holds
#: three versions (previous, current, next).
OLDER_VERSIONS_MAX = 2
#: Longest signature an ``auth`` may carry (DER ECDSA P-256 is at most 72 bytes).
MAX_SIG_LEN = 160


def _check_older(msg: dict) -> None:
    older, t = msg["older"], msg["t"]
    if len(older) > OLDER_VERSIONS_MAX:
        raise ValueError(f"{t}.older: {len(older)} versions, at most {OLDER_VERSIONS_MAX}")
    below = msg["pw_id"]
    for item in older:
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"{t}.older: want [pw_id, key, age_s] items")
        pw_id, key, age_s = item
        for name, value in (("pw_id", pw_id), ("age_s", age_s)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
                raise ValueError(f"{t}.older.{name}: not an unsigned 32-bit integer")
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError(f"{t}.older.key: want 32 bytes")
        if pw_id >= below:
            raise ValueError(f"{t}.older: versions must be older than pw_id, newest first")
        below = pw_id


#: The highest tunnel path ID (``netkey_req path``, ``l2crypt.core.tunnel_keys``).
MAX_TUNNEL_PATH = 15

#: Most MACs one ``welcome`` names as revoked (24 KiB of the message limit).
MAX_REVOKED_MACS = 4096


#: Address length by field: the IPv4 list, the IPv6 list.
_IP_LIST_WIDTH = {"peer_ips": 4, "peer_ips6": 16}


def _check_across_fields(msg: dict) -> None:
    t = msg["t"]
    if "id" in msg and not valid_host_id(msg["id"]):
        raise ValueError(f"{t}.id: not a valid host ID")
    if "peer_id" in msg and t.startswith(("l3_", "id_", "netkey")) and not valid_host_id(msg["peer_id"]):
        raise ValueError(f"{t}.peer_id: not a valid host ID")
    if "older" in msg:
        _check_older(msg)
    if "path" in msg and not 0 <= msg["path"] <= MAX_TUNNEL_PATH:
        raise ValueError(f"{t}.path: {msg['path']}, want 0-{MAX_TUNNEL_PATH}")
    if "sig" in msg and not 1 <= len(msg["sig"]) <= MAX_SIG_LEN:
        raise ValueError(f"{t}.sig: length {len(msg['sig'])}, want 1-{MAX_SIG_LEN}")
    for name in ("ip", "peer_ip"):
        if name in msg and len(msg[name]) not in (4, 16):
            raise ValueError(f"{t}.{name}: length {len(msg[name])}, want 4 (IPv4) or 16 (IPv6)")
    if "peer_ips" in msg:
        count = 0
        for name, width in _IP_LIST_WIDTH.items():
            n = len(msg.get(name, b""))
            if n % width:
                raise ValueError(f"{t}.{name}: length {n}, not a list of {width}-byte addresses")
            count += n // width
        if not 1 <= count <= MAX_PEER_IPS:
            raise ValueError(f"{t}: {count} peer addresses, want 1-{MAX_PEER_IPS}")
    if "revoked_macs" in msg:
        n = len(msg["revoked_macs"])
        if n % 6 or n > 6 * MAX_REVOKED_MACS:
            raise ValueError(f"{t}.revoked_macs: length {n}, want 0-{MAX_REVOKED_MACS} MACs of 6 bytes")


def revoked_macs(welcome: dict) -> list[bytes]:
    """The MACs a (validated) ``welcome`` names as revoked; [] from an older server."""
    data = welcome.get("revoked_macs", b"")
    return [data[i:i + 6] for i in range(0, len(data), 6)]


def pack_peer_ips(ips) -> dict:
    """The ``peer_ips`` (and, if any, ``peer_ips6``) fields of an ``l3_key`` for
    a list of 4- and 16-byte addresses."""
    fields = {"peer_ips": b"".join(ip for ip in ips if len(ip) == 4)}
    v6 = b"".join(ip for ip in ips if len(ip) == 16)
    if v6:
        fields["peer_ips6"] = v6
    return fields


def unpack_peer_ips(msg: dict) -> list[bytes]:
    """The addresses of a validated ``l3_key``: IPv4 ones first, then IPv6."""
    out = []
    for name, width in _IP_LIST_WIDTH.items():
        raw = msg.get(name, b"")
        out += [raw[i:i + width] for i in range(0, len(raw), width)]
    return out


def valid_host_id(host_id: str) -> bool:
    """Host IDs: 1-64 chars of letters, digits, '.', '-', '_'; not starting with '.' or '-'."""
    if not 1 <= len(host_id) <= MAX_ID_LEN or host_id[0] in ".-":
        return False
    return all(c.isascii() and (c.isalnum() or c in ".-_") for c in host_id)


CODEC = MessageCodec(_FIELDS, SCHEMA, MAX_MESSAGE_BYTES, "message", _check_across_fields)
validate = CODEC.validate            # ValueError with the reason
encode_body = CODEC.encode_body      # validate and pack (no length prefix)
encode_message = CODEC.encode        # validate, pack and frame
decode_body = CODEC.decode_body      # unpack and validate; RemoteProtocolError


def decode_message(data: bytes) -> dict:
    """Decode exactly one framed message (length prefix included)."""
    reader = FrameReader()
    msgs = reader.feed(data)
    if len(msgs) != 1 or reader.buffered:
        raise RemoteProtocolError("not exactly one whole message", "malformed")
    return msgs[0]


class FrameReader(_FrameReader):
    """Incremental deframer of key-server messages (see ``msg_codec.FrameReader``)."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES):
        super().__init__(CODEC, max_bytes)
