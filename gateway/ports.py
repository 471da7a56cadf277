"""The gateway's plain port and tunnel socket (the encrypted port is ``l2crypt.linux_wire``).

* ``PlainPort``: an AF_PACKET socket for every EtherType on the full-decrypt
  uplink, promiscuous (it bridges for every MAC behind it), never seeing its
  own frames (PACKET_IGNORE_OUTGOING).  The port gets no IPv6 and no ARP, so
  the gateway's own stack never talks on it.
* ``TunnelSocket``: one UDP socket for every inter-subnet peer; datagrams
  from an address that is not a configured peer are counted and dropped.
  Fragmentation is allowed (a full-size inner frame plus the tunnel overhead
  exceeds a 1500-byte path).
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

from l2crypt.errors import LocalError
from l2crypt.linux_wire import PACKET_IGNORE_OUTGOING, SOL_PACKET, LinuxWire

ETH_P_ALL = 0x0003
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
MAX_FRAME = 65536
BUFFER_BYTES = 4 * 1024 * 1024


def quiet_port(port: str) -> None:
    """No IPv6, no ARP, no addresses, up: the host stack stays off the plain side."""
    if not Path(f"/sys/class/net/{port}").exists():
        raise LocalError(f"plain port {port!r} does not exist")
    ipv6 = Path(f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6")
    if ipv6.exists():
        ipv6.write_text("1\n")
    for argv in (["ip", "link", "set", "dev", port, "arp", "off"], ["ip", "addr", "flush", "dev", port],
                 ["ip", "link", "set", "dev", port, "up"]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise LocalError(f"cannot prepare plain port {port}: {res.stderr.strip()}")


class PlainPort(LinuxWire):
    """Every frame on the plain port, non-blocking.  Implements FramePort."""

    def __init__(self, port: str):
        self.name = port
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((port, ETH_P_ALL))
        except OSError as exc:
            raise LocalError(f"cannot open plain port {port!r}: {exc}") from None
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
            except OSError:
                pass
        ifindex = socket.if_nametoindex(port)
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            pass
        sock.setblocking(False)
        self._sock = sock
        self.write_errors = 0


class TunnelSocket:
    """UDP datagrams to and from the peer gateways."""

    def __init__(self, local: tuple[str, int], peers: dict[str, tuple[str, int]]):
        self.peers = {name: (socket.gethostbyname(h), p) for name, (h, p) in peers.items()}
        self.by_addr = {addr[0]: name for name, addr in self.peers.items()}  # by IP: a NAT may move the port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
            sock.bind(local)
        except OSError as exc:
            sock.close()
            raise LocalError(f"tunnel_listen: cannot bind {local[0]}:{local[1]}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self.unknown_sender = 0
        self.write_errors = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, limit: int) -> list[tuple[str, bytes]]:
        out = []
        for _ in range(limit):
            try:
                data, addr = self._sock.recvfrom(MAX_FRAME)
            except OSError:
                break
            name = self.by_addr.get(addr[0])
            if name is None:
                self.unknown_sender += 1
                continue
            out.append((name, data))
        return out

    def send(self, peer: str, datagram: bytes) -> bool:
        try:
            self._sock.sendto(datagram, self.peers[peer])
            return True
        except OSError:
            self.write_errors += 1
            return False

    def close(self) -> None:
        self._sock.close()
