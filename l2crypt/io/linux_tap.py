"""The host side of the agent: a persistent Linux TAP device (python-pytun).

The host's IP stack sends plain frames into the TAP; the agent reads them,
and writes opened frames back for the stack to receive.

The TAP outlives the agent, so the host keeps its addresses and routes
(they belong to the host's network manager) across a restart or a crash:

1. If a device of the TAP's name exists, it must be a single-queue TAP
   (``existing_tap``; anything else is one clear error).  The agent attaches
   to it.  Else the agent creates it and makes it persistent (TUNSETPERSIST).
2. The agent's own flags (IFF_TAP | IFF_NO_PI) replace the per-open flags
   the TAP was made with (IFF_NO_PI, IFF_VNET_HDR), so ``ip tuntap add dev
   l2c0 mode tap`` and networkd's ``Kind=tap`` both do, with or without
   ``vnet_hdr``.  What cannot be used: a TUN device, a ``multi_queue`` TAP,
   a TAP someone else holds open.
3. It sets the MAC (``tap_mac``) if the TAP has another one, the MTU (wire
   MTU - overhead) if it differs, and brings the TAP up.
   ``IFF_VNET_HDR`` is a per-open flag too, so any TAP of the right kind can
   be attached with it, whoever made it.
4. With ``offload=True`` (``--datapath batched``) it opens with
   ``IFF_VNET_HDR``, sets the header size (``TUNSETVNETHDRSZ``, 10) and turns
   on checksum and TCP segmentation offload (``TUNSETOFFLOAD`` ``TUN_F_CSUM |
   TUN_F_TSO4 | TUN_F_TSO6``; never UFO/USO): the host's stack then hands
   it TCP super-frames with a virtio-net header (``core.vnet_hdr``).  If the
   kernel refuses either, it reopens the TAP without them and says why in
   ``offload_refused``.  Without offloads it turns them off
   (``TUNSETOFFLOAD`` 0): they belong to the device and outlive a batched
   agent, and a reader without headers must never get a super-frame.
5. On stop, SIGKILL or a crash the descriptor closes; the TAP stays with
   its addresses but loses carrier: what the stack sends into it is dropped
   by the kernel (no reader) and never reaches the wire.
   ``remove_tap`` (``l2crypt remove-tap``) deletes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytun

from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import format_mac, parse_mac
from l2crypt.core.vnet_hdr import VNET_HDR_LEN, ZERO_VNET_HDR, encode_vnet_hdr

MAX_FRAME = 65536 + 64  # a 64 KB IP super-frame with its Ethernet, VLAN and virtio-net headers
SYS_NET = Path("/sys/class/net")
# Bits of /sys/class/net/NAME/tun_flags (linux/if_tun.h).
TUN_IFF_TUN = 0x0001
TUN_IFF_TAP = 0x0002
TUN_IFF_MULTI_QUEUE = 0x0100
TUN_IFF_PERSIST = 0x0800
OPEN_FLAGS = pytun.IFF_TAP | pytun.IFF_NO_PI
# linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
_ZERO_HDR = encode_vnet_hdr(ZERO_VNET_HDR)
MAKE_ONE = "make one with `ip tuntap add dev {name} mode tap`, or let the agent make it"


@dataclass(frozen=True)
class ExistingTap:
    """A TAP device that is already there when the agent starts."""

    name: str
    mac: bytes
    mtu: int
    tun_flags: int


def existing_tap(name: str, sys_net: Path = SYS_NET) -> ExistingTap | None:
    """The TAP called ``name``, None if no device has that name; LocalError
    if the device cannot be the agent's TAP (not a TAP, multi-queue, held open)."""
    base = sys_net / name
    if not base.exists():
        return None
    try:
        flags = int((base / "tun_flags").read_text().strip(), 16)
    except FileNotFoundError:
        raise LocalError(f"tap: {name!r} exists and is not a TUN/TAP device; remove it or choose another tap "
                         f"name ({MAKE_ONE.format(name=name)})") from None
    except (OSError, ValueError) as exc:
        raise LocalError(f"tap: cannot read the flags of {name!r}: {exc}") from None
    if flags & TUN_IFF_TUN or not flags & TUN_IFF_TAP:
        raise LocalError(f"tap: {name!r} is a TUN device (layer 3); l2crypt needs a TAP: delete it "
                         f"(`ip tuntap del dev {name} mode tun`) and {MAKE_ONE.format(name=name)}")
    if flags & TUN_IFF_MULTI_QUEUE:
        raise LocalError(f"tap: {name!r} is a multi_queue TAP; the agent needs a single-queue one: delete it "
                         f"(`ip tuntap del dev {name} mode tap multi_queue`) and {MAKE_ONE.format(name=name)}")
    if not flags & TUN_IFF_PERSIST:
        raise LocalError(f"tap: {name!r} is not persistent, so another process holds it open (an agent of an "
                         f"older version, or another program); stop that process first")
    try:
        mac = parse_mac((base / "address").read_text().strip())
        mtu = int((base / "mtu").read_text())
    except (OSError, ValueError) as exc:
        raise LocalError(f"tap: cannot read {name!r}: {exc}") from None
    return ExistingTap(name, mac, mtu, flags)


def _open_error(name: str, exc: Exception) -> str:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else getattr(exc, "errno", None)
    if code == errno.EBUSY:
        return (f"tap: {name!r} is open in another process (another agent on this TAP, or a network manager "
                f"keeping it open, e.g. networkd's KeepCarrier=yes)")
    if code == errno.EPERM:
        return (f"tap: not allowed to open {name!r} (it belongs to another user, see `ip -d link show {name}`); "
                f"the agent needs CAP_NET_ADMIN")
    if code == errno.EINVAL:
        return f"tap: {name!r} cannot be opened as a single-queue TAP ({MAKE_ONE.format(name=name)})"
    return f"tap: cannot open {name!r}: {exc}"


def _set_offloads(fd: int, vnet: bool) -> None:
    """Step 4: header size and offloads on (``vnet``) or offloads off; OSError if refused."""
    if vnet:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS if vnet else 0)


class LinuxTap:
    """The agent's persistent TAP, opened IFF_TAP | IFF_NO_PI (| IFF_VNET_HDR), non-blocking.

    Implements FramePort; with ``vnet_hdr_len`` 10 every buffer ``read_frames``
    returns starts with the virtio-net header, ``write_frame`` adds a zero
    header and ``write_vnet`` writes a header of the caller's.
    ``created`` says whether this start made the TAP; ``old_mac`` and
    ``old_mtu`` are what an existing TAP had before the agent set its own;
    ``offload_refused`` is why offloads were asked for and are off ("" if not).
    """

    def __init__(self, name: str, mtu: int, mac: bytes | None = None, offload: bool = False):
        before = existing_tap(name)
        self.offload_refused = ""
        self._dev = None
        if offload:
            try:
                self._dev = pytun.TunTapDevice(name=name, flags=OPEN_FLAGS | pytun.IFF_VNET_HDR)
            except (pytun.Error, OSError) as exc:
                self.offload_refused = f"the kernel refused IFF_VNET_HDR: {exc}"
            else:
                try:
                    _set_offloads(self._dev.fileno(), True)
                except OSError as exc:
                    self.offload_refused = f"the kernel refused TUNSETOFFLOAD: {exc.strerror or exc}"
                    self._dev.close()  # not persistent yet: a TAP made just now goes away
                    self._dev = None
        self.vnet_hdr_len = VNET_HDR_LEN if self._dev is not None else 0
        if self._dev is None:
            try:
                self._dev = pytun.TunTapDevice(name=name, flags=OPEN_FLAGS)
            except (pytun.Error, OSError) as exc:
                raise LocalError(_open_error(name, exc)) from None
            try:
                _set_offloads(self._dev.fileno(), False)
            except OSError:
                pass  # a kernel without TUNSETOFFLOAD has no offloads to turn off
        self.name = self._dev.name
        self.created = before is None
        self.old_mac = before.mac if before else None
        self.old_mtu = before.mtu if before else None
        try:
            if self.created:
                self._dev.persist(True)
            if mac is not None and bytes(self._dev.hwaddr) != mac:
                self._dev.hwaddr = mac
            if self._dev.mtu != mtu:
                self._dev.mtu = mtu
            self._dev.up()
        except (pytun.Error, OSError) as exc:
            if self.created:
                self._dev.persist(False)  # leave nothing half made behind
            self._dev.close()
            raise LocalError(f"tap: cannot set up {name!r} (MAC {format_mac(mac) if mac else 'as is'}, "
                             f"MTU {mtu}): {exc}") from None
        self.mac = bytes(self._dev.hwaddr)
        self.mtu = mtu
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        return self._fd

    def live_mtu(self) -> int:
        """The TAP's MTU now (someone may have changed it since the start)."""
        try:
            return int((SYS_NET / self.name / "mtu").read_text())
        except (OSError, ValueError):
            return self.mtu

    def read_frames(self, limit: int) -> list[bytes]:
        frames = []
        read = os.read
        fd = self._fd
        for _ in range(limit):
            try:
                frames.append(read(fd, MAX_FRAME))
            except OSError:
                break  # EAGAIN ends the batch; anything else is transient for a TAP
        return frames

    def write_frame(self, frame: bytes) -> bool:
        try:
            if self.vnet_hdr_len:
                os.writev(self._fd, (_ZERO_HDR, frame))
            else:
                os.write(self._fd, frame)
            return True
        except OSError:
            return False  # the caller counts it (tap_write_error)

    def write_vnet(self, vnet_hdr: bytes, frame) -> bool:
        """Write ``frame`` with its encoded virtio-net header (offload mode only)."""
        try:
            os.writev(self._fd, (vnet_hdr, frame))
            return True
        except OSError:
            return False  # the caller counts it (tap_write_error)

    def close(self) -> None:
        """Close the descriptor; the persistent TAP stays (without carrier)."""
        if self._fd >= 0:
            self._dev.close()
            self._fd = -1


def remove_tap(name: str) -> None:
    """Delete the persistent TAP ``name``; LocalError if there is none or it is in use."""
    if existing_tap(name) is None:
        raise LocalError(f"tap: there is no TAP named {name!r}")
    try:
        dev = pytun.TunTapDevice(name=name, flags=OPEN_FLAGS)
    except (pytun.Error, OSError) as exc:
        raise LocalError(_open_error(name, exc) + "; stop the agent first") from None
    try:
        dev.persist(False)
    except (pytun.Error, OSError) as exc:
        raise LocalError(f"tap: cannot remove {name!r}: {exc}") from None
    finally:
        dev.close()
