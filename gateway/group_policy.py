"""Which broadcast and multicast frames cross between a gateway's sides (``group_crossing``).

* ``basic`` (default): ARP, DHCPv4 (UDP 67/68), DHCPv6 (UDP 546/547) and IPv6
  router/neighbour discovery and redirects (ICMPv6 133-137);
* ``all``: every group frame;
* ``none``: no group frame.

Sans-I/O: a frame in, a yes or no out.
"""

from __future__ import annotations

GROUP_CROSSING = ("basic", "all", "none")


def group_frame_allowed(frame: bytes, policy: str) -> bool:
    """May this group frame cross between the sides?  (see the module docstring)"""
    if policy == "all":
        return True
    if policy == "none" or len(frame) < 14:
        return False
    et = int.from_bytes(frame[12:14], "big")
    if et == 0x0806:  # ARP
        return True
    if et == 0x0800 and len(frame) >= 14 + 20 + 4:
        ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] == 17 and len(frame) >= 14 + ihl + 4:
            dport = int.from_bytes(frame[14 + ihl + 2:14 + ihl + 4], "big")
            return dport in (67, 68)
        return False
    if et == 0x86DD and len(frame) >= 14 + 40 + 4:
        nh = frame[14 + 6]
        if nh == 58:  # ICMPv6: router/neighbour solicitation and advertisement, redirect
            return 133 <= frame[14 + 40] <= 137
        if nh == 17:
            return int.from_bytes(frame[14 + 40 + 2:14 + 40 + 4], "big") in (546, 547)
    return False
