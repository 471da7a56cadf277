"""Every frame port implements the interface the frame pump and the gateway
use (``l2crypt.io.ports``): the Linux ones (checked on the class: opening
them needs root) and the in-memory fakes (checked on instances)."""

import inspect

from gateway.ports import PlainPort
from l2crypt.io.fakes import ChannelPort, ChannelTap, VnetChannelPort
from l2crypt.io.linux_tap import LinuxTap
from l2crypt.io.linux_wire import LinuxWire
from l2crypt.io.ports import FramePort, WirePort
from l2crypt.io.wire_ring import RingWire


def methods_of(protocol) -> set[str]:
    return {name for name, value in inspect.getmembers(protocol, inspect.isfunction) if not name.startswith("_")}


def missing(cls, protocol) -> set[str]:
    return {name for name in methods_of(protocol) if not callable(getattr(cls, name, None))}


def test_the_linux_ports_have_every_method_of_their_interface():
    assert methods_of(FramePort) == {"fileno", "read_frames", "write_frame", "close"}
    assert methods_of(WirePort) == methods_of(FramePort) | {"write_frames"}
    for cls in (LinuxWire, RingWire, PlainPort):
        assert missing(cls, WirePort) == set(), cls
    assert missing(LinuxTap, FramePort) == set()
    # The check sees a port that lacks a method.
    assert missing(LinuxTap, WirePort) == {"write_frames"}


def test_the_fakes_are_ports():
    for port in (ChannelPort("wire"), ChannelTap("tap", bytes(6)), VnetChannelPort("tap")):
        assert isinstance(port, WirePort) and isinstance(port, FramePort)
    assert not isinstance(object(), FramePort)
