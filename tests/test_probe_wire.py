"""The PROBE/ECHO plaintext (gateway/probe_wire.py): a fixed vector, round trips, junk."""

from __future__ import annotations

import struct

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway import probe_wire as P

# Worked out by hand from the layout in the module docstring (network byte order):
# probe 1, sent at 0.5 s (IEEE 754 double 0x3FE0000000000000), 2 frames, 3 bytes.
VECTOR = bytes.fromhex("00000001" "3fe0000000000000" "0000000000000002" "0000000000000003")

u64 = st.integers(0, (1 << 64) - 1)


def test_the_fixed_vector():
    assert P.encode_probe(1, 0.5, 2, 3) == VECTOR == P.encode_echo(1, 0.5, 2, 3)
    assert P.decode_probe(VECTOR) == P.Probe(number=1, sent_at=0.5, frames=2, bytes=3) == P.decode_echo(VECTOR)
    for bad_time in ("7ff0000000000000", "fff0000000000000", "7ff8000000000001"):  # +inf, -inf, NaN
        assert P.decode_probe(VECTOR[:4] + bytes.fromhex(bad_time) + VECTOR[12:]) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 40)), st.floats(allow_nan=False, allow_infinity=False), u64, u64)
def test_round_trip(number, sent_at, frames, nbytes):
    assert P.decode_probe(P.encode_probe(number, sent_at, frames, nbytes)) == (
        number & 0xFFFFFFFF, sent_at, frames, nbytes)  # the probe number wraps at 32 bits


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.binary(min_size=P.LEN, max_size=P.LEN)))
def test_junk_is_refused_or_read_never_raised(message):
    probe = P.decode_probe(message)
    if len(message) != P.LEN:
        assert probe is None
        event("wrong length")
    else:
        sent_at = struct.unpack_from("!d", message, 4)[0]
        assert (probe is None) == (sent_at != sent_at or abs(sent_at) == float("inf"))
        event("refused: not a finite time" if probe is None else "read")
