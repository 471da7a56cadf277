"""Hypothesis strategies for the msgpack protocols (``l2crypt.core.ks_messages``,
``keyserverd.peering.messages``): schema-valid messages of every type, framed by
the product's own encoder, then (sometimes) mutated.

A fuzzer fed only random maps never gets past the schema check; these give
the decoder whole valid messages, and valid messages with one thing wrong.
``decoder_codes`` lists the codes a codec's errors can carry, from its source.
"""

from __future__ import annotations

import msgpack
from hypothesis import strategies as st

import l2crypt.core.msg_codec as msg_codec
from drop_reasons import refusal_codes

_HOST_IDS = st.sampled_from(["h1", "gw-2", "a.b_c", "x" * 64])
_NAMES = st.sampled_from(["forbidden", "bad_request", "revocations", "multicast"])
#: Valid values for fields whose type and length in ``_FIELDS`` do not say enough.
_SPECIAL = {
    "id": _HOST_IDS, "peer_id": _HOST_IDS, "from_id": _HOST_IDS,
    "code": _NAMES, "kind": _NAMES,
    "ip": st.sampled_from([bytes(4), bytes(range(16))]),
    "peer_ip": st.sampled_from([bytes([10, 0, 0, 1]), bytes(16)]),
    "peer_ips": st.integers(1, 3).map(lambda n: bytes(4 * n)),
    "peer_ips6": st.integers(0, 2).map(lambda n: bytes(16 * n)),
    "revoked_macs": st.integers(0, 3).map(lambda n: bytes(range(6)) * n),
    "older": st.just([]),
    "origin": st.lists(st.sampled_from(["ks1", "ks2"]), max_size=2),
    "pw_id": st.integers(1, 2**32 - 1),
    "side": st.sampled_from(["plain", "tunnel:gA"]),
}


def _value(name: str, kind: type, length: int | None):
    if name in _SPECIAL:
        return _SPECIAL[name]
    if kind is int:
        return st.integers(0, 2**32 - 1)
    if kind is str:
        return st.text(max_size=20)
    if kind is bytes:
        return st.binary(min_size=length, max_size=length) if length else st.binary(max_size=40)
    return st.just([])


def valid_messages(module):
    """Messages of every type of ``module`` (with ``SCHEMA``, ``_FIELDS``, ``validate``)."""
    def one(t: str):
        required, optional = module.SCHEMA[t]
        fields = {n: _value(n, *module._FIELDS[n]) for n in required}
        extra = {n: _value(n, *module._FIELDS[n]) for n in optional}
        return st.builds(lambda base, more: {"t": t, **base, **more},
                         st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=extra))

    def valid(msg: dict) -> bool:
        try:
            module.validate(msg)
        except ValueError:
            return False
        return True

    return st.sampled_from(sorted(module.SCHEMA)).flatmap(one).filter(valid)


def mutated(framed: bytes):
    """A framed message as sent, or with one change: a byte flipped, cut short,
    extended, a wrong length prefix, the body re-packed with one field dropped, wrong or added."""
    body = msgpack.unpackb(framed[4:], raw=False)

    def repack(msg) -> bytes:
        packed = msgpack.packb(msg, use_bin_type=True)
        return msg_codec.LENGTH.pack(len(packed)) + packed

    def flip(pos, bit):
        pos %= len(framed)
        return framed[:pos] + bytes([framed[pos] ^ (1 << bit)]) + framed[pos + 1:]

    names = sorted(body)
    return st.one_of(
        st.just(framed),
        st.builds(flip, st.integers(0, 2**16), st.integers(0, 7)),
        st.integers(0, len(framed) - 1).map(lambda n: framed[:n]),
        st.binary(min_size=1, max_size=8).map(lambda extra: framed + extra),
        st.sampled_from(names).map(lambda n: repack({k: v for k, v in body.items() if k != n})),
        st.tuples(st.sampled_from(names), st.one_of(st.none(), st.integers(-1, 2**33), st.binary(max_size=7),
                                                     st.text(max_size=5), st.booleans()))
        .map(lambda nv: repack({**body, nv[0]: nv[1]})),
        st.just(repack({**body, "x": 1})),
        st.integers(0, 2**32 - 1).map(lambda n: msg_codec.LENGTH.pack(n) + framed[4:]),  # a wrong length
    )


def framed_then_mutated(module):
    """Encoded by ``module.encode_message``, then ``mutated``."""
    return valid_messages(module).map(module.encode_message).flatmap(mutated)


def decoder_codes() -> set[str]:
    """The codes a ``RemoteProtocolError`` of the message codec can carry."""
    return refusal_codes(msg_codec, "RemoteProtocolError")
