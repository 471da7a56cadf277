r"""Wire format of the virtio-net header a TAP opened with ``IFF_VNET_HDR``
puts before every frame it hands out and expects before every frame written
to it (``struct virtio_net_hdr``, linux/virtio_net.h and the virtio spec
5.1.6).

Layout (offsets in bytes; the 16-bit fields are little-endian, which is what
the TAP uses on every little-endian host and on any host after
``TUNSETVNETLE``)::

     0       1          2         4          6            8             10             12
    +-------+----------+---------+----------+------------+-------------+--------------+
    | flags | gso_type | hdr_len | gso_size | csum_start | csum_offset | num_buffers  |
    | u8    | u8       | u16 LE  | u16 LE   | u16 LE     | u16 LE      | u16 LE (v1)  |
    +-------+----------+---------+----------+------------+-------------+--------------+
    \_____________________ VNET_HDR_LEN = 10 ______________/
    \_____________________________ VNET_HDR_V1_LEN = 12 _________________/

* ``flags``: ``NEEDS_CSUM`` -- the L4 checksum is partial: the 16-bit field at
  ``csum_start + csum_offset`` holds the pseudo-header sum and the sum over
  ``frame[csum_start:]`` is still to be added (the kernel's
  ``CHECKSUM_PARTIAL``); ``DATA_VALID`` -- the kernel already checked the
  checksum (set only on frames read from the TAP).
* ``gso_type``: ``GSO_NONE``, ``GSO_TCPV4``, ``GSO_UDP`` (UFO, legacy),
  ``GSO_TCPV6``, ``GSO_UDP_L4`` (USO), optionally or-ed with ``GSO_ECN``
  (the super-frame's first segment carries CWR).
* ``hdr_len``: length of the headers (Ethernet to L4); a hint for the kernel's
  allocation, never trusted for parsing.
* ``gso_size``: payload bytes per segment (the MSS).
* ``csum_start``/``csum_offset``: counted from the first byte of the Ethernet
  header (an 802.1Q tag included).
* ``num_buffers``: exists only when the header size is set to 12 with
  ``TUNSETVNETHDRSZ`` (virtio 1.0 / mergeable buffers). The TAP ignores it on
  write and does not fill it on read, so it decodes as whatever was there; the
  datapath may keep the 10-byte size.

1. ``decode_vnet_hdr`` parses the header of a frame read from the TAP; bad
   input raises ``VnetHdrError`` (its ``code`` is the drop reason to count),
   never another exception type. ``split_vnet_frame`` does the same for a whole
   read buffer and returns the drop reason instead of raising (packet path).
2. ``encode_vnet_hdr`` builds the header of a frame to write to the TAP.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import L2cryptError

# --- wire constants -----------------------------------------------------------

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
VNET_HDR_V1_LEN = VNET_HDR_LEN + 2  # 12: num_buffers follows
NUM_BUFFERS = struct.Struct("<H")
assert VNET_HDR_LEN == 10

# flags
NEEDS_CSUM = 0x01
DATA_VALID = 0x02
RSC_INFO = 0x04  # never set by the TAP; decoded and ignored

# gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
#: The gso_type values (ECN bit cleared) the kernel defines.
KNOWN_GSO_TYPES = frozenset({GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4})

# Drop reasons produced here.
VNET_TRUNCATED = "vnet_truncated"
VNET_BAD_SIZE = "vnet_bad_size"
VNET_BAD_FIELD = "vnet_bad_field"


class VnetHdrError(L2cryptError):
    """A virtio-net header that cannot be decoded or encoded; ``code`` is the
    drop reason (``vnet_truncated``, ``vnet_bad_size``, ``vnet_bad_field``)."""

    code = VNET_BAD_FIELD


class VnetHdr(NamedTuple):
    """The decoded fields of ``struct virtio_net_hdr`` (see the module docstring)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0


#: The header of a finished frame: no offload, nothing to do.
ZERO_VNET_HDR = VnetHdr()


def encode_vnet_hdr(hdr: VnetHdr, size: int = VNET_HDR_LEN) -> bytes:
    """The ``size``-byte (10 or 12) wire form of ``hdr``; a field out of its
    range raises ``VnetHdrError``."""
    if size not in (VNET_HDR_LEN, VNET_HDR_V1_LEN):
        raise VnetHdrError(f"virtio-net header size {size} (want 10 or 12)", VNET_BAD_SIZE)
    try:
        data = VNET_HDR.pack(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset)
        if size == VNET_HDR_V1_LEN:
            data += NUM_BUFFERS.pack(hdr.num_buffers)
    except (struct.error, TypeError, AttributeError) as exc:
        raise VnetHdrError(f"virtio-net header field out of range: {hdr!r} ({exc})", VNET_BAD_FIELD) from None
    return data


def decode_vnet_hdr(data: bytes, size: int = VNET_HDR_LEN) -> VnetHdr:
    """Parse the first ``size`` (10 or 12) bytes of ``data``.

    The values are not judged here (an unknown ``gso_type`` decodes; the
    segmenter refuses it). Raises ``VnetHdrError`` for a wrong size, input
    shorter than ``size`` or input that is not bytes-like.
    """
    if size not in (VNET_HDR_LEN, VNET_HDR_V1_LEN):
        raise VnetHdrError(f"virtio-net header size {size} (want 10 or 12)", VNET_BAD_SIZE)
    try:
        length = len(data)
        if length < size:
            raise VnetHdrError(f"virtio-net header truncated: {length} of {size} bytes", VNET_TRUNCATED)
        fields = VNET_HDR.unpack_from(data)
        num_buffers = NUM_BUFFERS.unpack_from(data, VNET_HDR_LEN)[0] if size == VNET_HDR_V1_LEN else 0
    except (TypeError, BufferError, struct.error) as exc:
        raise VnetHdrError(f"virtio-net header unreadable: {exc}", VNET_BAD_FIELD) from None
    return VnetHdr(*fields, num_buffers)


def split_vnet_frame(buffer: bytes, size: int = VNET_HDR_LEN) -> tuple[VnetHdr, bytes] | str:
    """One read from the TAP, as (header, Ethernet frame), or the drop reason;
    never raises."""
    try:
        hdr = decode_vnet_hdr(buffer, size)
    except VnetHdrError as exc:
        return exc.code
    return hdr, buffer[size:]
