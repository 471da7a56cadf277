"""The gateway's plain port and tunnel socket (the encrypted port is ``l2crypt.io.linux_wire``).

* ``quiet_port``: the plain port carries clear frames by design, but the
  gateway's own IP stack must stay off it (with the weak host model it would
  otherwise take a datagram for the gateway's WAN or management address
  from any plain host).  Its guard (``l2crypt.io.port_guard``) has an ingress
  chain that drops every frame, counted as ``inbound_refused``, and no egress
  chain (the gateway writes clear frames there); the kernel hands frames to
  ETH_P_ALL packet sockets, ``PlainPort`` among them, before that hook, so the
  gateway still reads every EtherType.  The host stack is turned off the port
  as on the wire port (no address, no IPv6, no ARP, strict rp_filter).
* ``receive_offloads_off``: GRO and LRO off on the plain port (``datapath
  = "simple"``).  A NIC
  merges a plain host's TCP segments into one large frame (GRO is on by
  default); sealed, it would not fit the encrypted port.  The gateway must
  see the frames as they were on the wire, so it turns both off at start.
* ``PlainPort``: an AF_PACKET socket for every EtherType on the full-decrypt
  uplink, promiscuous (it bridges for every MAC behind it), never seeing its
  own frames (PACKET_IGNORE_OUTGOING).  With ``datapath = "batched"`` it
  has PACKET_VNET_HDR and GRO on (``set_receive_offloads``; the gateway cuts the super-frames it
  reads into segments that fit the encrypted port, ``tap_path.cut_buffer``)
  and the segments it sends are joined into GSO super-frames
  (``tap_path.write_coalesced``) that the kernel cuts, checksums included.
* ``TunnelSocket``: one UDP socket on one local address, for every path of
  every inter-subnet peer that leaves from it (``TunnelPorts``: one socket
  per local address of ``tunnel_listen`` and ``tunnel_paths``); a datagram
  names its path by the address it came from, and datagrams from an address
  that is no configured path's are counted and dropped.
  With ``tunnel_offload`` it sends the datagrams of a batch with UDP GSO and
  receives with UDP GRO (``gso_runs``, ``split_gro``).
  Fragmentation is allowed (a full-size inner frame plus the tunnel overhead
  exceeds a 1500-byte path).
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct

from l2crypt.core.errors import LocalError
from l2crypt.core.gso import ETH_HEADER_LEN as ETH_HEADER_BYTES  # DA, SA, EtherType
from l2crypt.core.vnet_hdr import VNET_HDR_LEN
from l2crypt.io.linux_wire import PACKET_IGNORE_OUTGOING, SOL_PACKET, LinuxWire
from l2crypt.io.port_guard import PortGuard, take_over

ETH_P_ALL = 0x0003
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
MAX_FRAME = 65536
BUFFER_BYTES = 4 * 1024 * 1024
SIOCETHTOOL = 0x8946
SIOCGIFMTU = 0x8921
ETHTOOL_GFLAGS, ETHTOOL_SFLAGS = 0x25, 0x26
ETHTOOL_GGRO, ETHTOOL_SGRO = 0x2B, 0x2C
ETH_FLAG_LRO = 1 << 15
IFREQ_BYTES = 40
PACKET_VNET_HDR = 15  # linux/if_packet.h
SOL_UDP = 17
UDP_SEGMENT, UDP_GRO = 103, 104  # linux/udp.h
GSO_MAX_BYTES = 65000     # payload bytes of one UDP GSO send (the kernel allows 65,507)
GSO_MAX_SEGMENTS = 64     # datagrams of one UDP GSO send (the kernel allows 128)
U16, INT = struct.Struct("=H"), struct.Struct("=i")
GRO_CMSG_SPACE = socket.CMSG_SPACE(INT.size)
NO_VNET_HDR = bytes(VNET_HDR_LEN)  # a frame as it is: no offload asked


def quiet_port(port: str) -> PortGuard:
    """Keep the gateway's own stack off the plain ``port``, then bring it up (see
    the module docstring).  Returns its guard (for ``read``).  Raises LocalError."""
    return take_over(PortGuard(port, None, egress=False), "plain port")


def _ethtool(sock: socket.socket, port: str, cmd: int, data: int = 0) -> int:
    """One ``struct ethtool_value`` command (get or set) on ``port``; returns its data."""
    value = array.array("I", [cmd, data])
    ifreq = struct.pack("16sP", port.encode(), value.buffer_info()[0])
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq.ljust(IFREQ_BYTES, b"\0"))
    return value[1]


def receive_offloads_off(port: str) -> list[str]:
    """Turn GRO and LRO off on ``port`` (see the module docstring); returns the
    names of those that were on.  Raises LocalError if the kernel refuses."""
    return [name.split()[0] for name in set_receive_offloads(port, gro=False)]


def set_receive_offloads(port: str, gro: bool) -> list[str]:
    """GRO on or off (``gro``) and LRO off on ``port``; returns what changed
    (``"gro off"``, ``"lro off"``, ``"gro on"``).  Raises LocalError if the kernel refuses."""
    changed = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            if bool(_ethtool(sock, port, ETHTOOL_GGRO)) != gro:
                _ethtool(sock, port, ETHTOOL_SGRO, int(gro))
                changed.append("gro on" if gro else "gro off")
            flags = _ethtool(sock, port, ETHTOOL_GFLAGS)
            if flags & ETH_FLAG_LRO:
                _ethtool(sock, port, ETHTOOL_SFLAGS, flags & ~ETH_FLAG_LRO)
                changed.append("lro off")
            if bool(_ethtool(sock, port, ETHTOOL_GGRO)) != gro or _ethtool(sock, port, ETHTOOL_GFLAGS) & ETH_FLAG_LRO:
                raise OSError(f"the port keeps GRO {'off' if gro else 'on'} or LRO on")
        except OSError as exc:
            raise LocalError(f"plain port {port}: cannot turn GRO {'on' if gro else 'off'} and LRO off: "
                             f"{exc.strerror or exc}") from None
    return changed


def port_mtu(port: str) -> int:
    """The MTU of ``port`` (SIOCGIFMTU).  Raises LocalError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, struct.pack("16si", port.encode(), 0).ljust(IFREQ_BYTES, b"\0"))
        except OSError as exc:
            raise LocalError(f"cannot read the MTU of {port!r}: {exc.strerror or exc}") from None
    return struct.unpack_from("i", ifreq, 16)[0]


class PlainPort(LinuxWire):
    """Every frame on the plain port, non-blocking.  Implements WirePort.

    ``vnet=True`` (``datapath = "batched"``) asks for PACKET_VNET_HDR: every frame read
    then starts with a virtio-net header and may be a GRO super-frame of up to 64 KiB,
    and ``write_vnet`` sends one with its header (a GSO super-frame the kernel cuts);
    ``vnet_hdr_len`` is 0 if the kernel refused it, and ``offload_refused`` says why.
    """

    def __init__(self, port: str, vnet: bool = False):
        self.name = port
        self.vnet_hdr_len = 0
        self.offload_refused = "" if vnet else "configured"
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
        if vnet:
            try:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            except OSError as exc:
                self.offload_refused = f"the kernel refused PACKET_VNET_HDR on {port!r}: {exc.strerror or exc}"
            else:
                self.vnet_hdr_len = VNET_HDR_LEN
                self.read_size = MAX_FRAME + VNET_HDR_LEN + ETH_HEADER_BYTES
        sock.setblocking(False)
        self._sock = sock

    def write_vnet(self, header: bytes, frame: bytes) -> bool:
        """One frame (or GSO super-frame) with its virtio-net header, in one ``sendmsg``."""
        try:
            self._sock.sendmsg((header, frame))
            return True
        except OSError:
            return False

    def write_frame(self, frame: bytes) -> bool:
        if not self.vnet_hdr_len:
            return super().write_frame(frame)
        return self.write_vnet(NO_VNET_HDR, frame)


def gso_runs(datagrams, max_bytes: int = GSO_MAX_BYTES, max_segments: int = GSO_MAX_SEGMENTS) -> list[list]:
    """``datagrams`` in order, cut into runs one UDP GSO send can carry: each as long as the
    run's first, except the last one, which may be shorter; at most ``max_segments`` and
    ``max_bytes`` in all."""
    runs: list[list] = []
    run: list = []
    size = total = 0
    for datagram in datagrams:
        n = len(datagram)
        if run and n <= size and len(run[-1]) == size and len(run) < max_segments and total + n <= max_bytes:
            run.append(datagram)
            total += n
            continue
        if run:
            runs.append(run)
        run, size, total = [datagram], n, n
    if run:
        runs.append(run)
    return runs


def split_gro(data: bytes, gso_size: int) -> list[bytes]:
    """The datagrams of one UDP GRO receive: ``gso_size`` bytes each, the last one possibly shorter."""
    if gso_size <= 0 or len(data) <= gso_size:
        return [data]
    return [data[i:i + gso_size] for i in range(0, len(data), gso_size)]


class TunnelSocket:
    """UDP datagrams to and from the peer gateways.

    ``offload`` (``tunnel_offload``): the datagrams of one batch to one peer leave in one
    ``sendmsg`` with UDP_SEGMENT (UDP GSO: the kernel cuts them; the wire carries the same
    datagrams), and one ``recvmsg`` may return many datagrams of one sender joined by UDP
    GRO; ``path`` says whether that runs, and why not if it was asked for.  A GSO send the
    kernel refuses (a datagram over the path MTU, no support) is sent again one datagram
    per call.
    """

    def __init__(self, local: tuple[str, int], peers: dict, offload: bool = False):
        """``peers``: route name (a peer, or a (peer, path) pair) -> its remote address."""
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
        self.offload = False
        self.path = "simple: not asked for"
        if offload:
            try:
                sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)  # a kernel without UDP GSO refuses the option
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
            except OSError as exc:
                self.path = f"simple: the kernel refused UDP GSO/GRO: {exc.strerror or exc}"
            else:
                self.offload, self.path = True, "batched: UDP GSO and GRO"
        sock.setblocking(False)
        self._sock = sock
        self.unknown_sender = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, limit: int) -> list[tuple[str, bytes]]:
        out = []
        for _ in range(limit):
            try:
                if self.offload:
                    data, ancillary, _, addr = self._sock.recvmsg(MAX_FRAME, GRO_CMSG_SPACE)
                else:
                    data, addr = self._sock.recvfrom(MAX_FRAME)
                    ancillary = ()
            except OSError:
                break
            name = self.by_addr.get(addr[0])
            if name is None:
                self.unknown_sender += 1
                continue
            gso_size = next((INT.unpack_from(d)[0] for level, kind, d in ancillary
                             if level == SOL_UDP and kind == UDP_GRO and len(d) >= INT.size), 0)
            if gso_size:
                out += [(name, datagram) for datagram in split_gro(data, gso_size)]
            else:
                out.append((name, data))
        return out

    def send(self, peer: str, datagram: bytes) -> bool:
        try:
            self._sock.sendto(datagram, self.peers[peer])
            return True
        except OSError:
            return False  # the caller counts it (tunnel_tx_error)

    def send_batch(self, peer: str, datagrams: list[bytes]) -> int:
        """Every datagram to ``peer`` (one GSO send per run with ``offload``); how many left."""
        if not self.offload:
            return sum(self.send(peer, d) for d in datagrams)
        sent, addr = 0, self.peers[peer]
        for run in gso_runs(datagrams):
            if len(run) > 1:
                try:
                    self._sock.sendmsg([b"".join(run)], [(SOL_UDP, UDP_SEGMENT, U16.pack(len(run[0])))], 0, addr)
                    sent += len(run)
                    continue
                except OSError:
                    pass  # one by one below
            sent += sum(self.send(peer, d) for d in run)
        return sent

    def close(self) -> None:
        self._sock.close()


class TunnelPorts:
    """The tunnel's sockets: one per local address of the configured paths (``PathSpec``s).
    ``read`` of a socket gives ((peer, path), datagram)."""

    def __init__(self, specs, offload: bool = False):
        by_local: dict[tuple[str, int], dict] = {}
        for spec in specs:
            by_local.setdefault(spec.local, {})[(spec.peer, spec.path)] = spec.remote
        self.sockets: list[TunnelSocket] = []
        self.route: dict[tuple[str, int], TunnelSocket] = {}
        try:
            for local, routes in by_local.items():
                sock = TunnelSocket(local, routes, offload)
                self.sockets.append(sock)
                self.route.update((name, sock) for name in routes)
        except BaseException:
            self.close()
            raise
        self.path = self.sockets[0].path if self.sockets else "simple: not asked for"

    @property
    def unknown_sender(self) -> int:
        return sum(sock.unknown_sender for sock in self.sockets)

    def send_batch(self, peer: str, path: int, datagrams: list[bytes]) -> int:
        """Every datagram to ``peer`` on ``path``; how many left (0 for a path not configured)."""
        sock = self.route.get((peer, path))
        return sock.send_batch((peer, path), datagrams) if sock is not None else 0

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
