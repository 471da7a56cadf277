"""Wire format of the tunnel's path probes: the plaintext of ``PROBE`` and ``ECHO`` messages.

Both are sealed with the path's key like any tunnel message
(``tunnel_wire``, kinds ``PROBE`` and ``ECHO``), so a probe is as
authenticated as the data it measures.  Layout, 28 bytes each::

    PROBE  u32 probe number | f64 send time (sender's clock) | u64 frames sent  | u64 bytes sent
    ECHO   u32 probe number | f64 send time, echoed          | u64 frames received | u64 bytes received

The counts are of the path's data and parity datagrams only, from the start:
the sender's when the probe left, the receiver's when it arrived.  A probe
travels the path's queue behind the frames sent before it, so between two
echoes ``1 - received / sent`` is the path's loss.

``decode_*`` never raise: they return None for a message of the wrong
length or a send time that is not a finite number.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

PROBE = struct.Struct("!IdQQ")
ECHO = PROBE
LEN = PROBE.size  # 28


class Probe(NamedTuple):
    """A probe (or an echo: ``frames``/``bytes`` are then the receiver's)."""

    number: int
    sent_at: float
    frames: int
    bytes: int


def encode_probe(number: int, sent_at: float, frames: int, nbytes: int) -> bytes:
    return PROBE.pack(number & 0xFFFFFFFF, sent_at, frames, nbytes)


encode_echo = encode_probe


def decode_probe(message: bytes) -> Probe | None:
    if len(message) != LEN:
        return None
    probe = Probe(*PROBE.unpack(message))
    return probe if math.isfinite(probe.sent_at) else None


decode_echo = decode_probe
