"""One mutation of a genuine sealed blob (frame or datagram), drawn by hypothesis.

Shared by the frame and tunnel fuzz tests: flip a byte, truncate, extend,
overwrite one header field, or splice another genuine blob's body under this
header.
"""

from __future__ import annotations

from hypothesis import strategies as st


def mutation(blob: bytes, data, genuine: list[bytes], header_len: int,
             fields: list[tuple[int, int]]) -> bytes:
    """``blob`` changed one way; ``fields`` are the header's (offset, size)."""
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "field", "splice"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        return blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255))]) + blob[pos + 1:]
    if kind == "truncate":
        return blob[:data.draw(st.integers(0, len(blob) - 1))]
    if kind == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=20))
    if kind == "splice":
        other = data.draw(st.sampled_from(genuine))
        return blob[:header_len] + other[header_len:]
    offset, size = data.draw(st.sampled_from(fields))
    value = data.draw(st.integers(0, 2 ** (8 * size) - 1))
    return blob[:offset] + value.to_bytes(size, "big") + blob[offset + size:]
