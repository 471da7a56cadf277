"""The TAP keeps its MAC across agent restarts (issue 14, section 2).

The key server binds a host's first MAC for good: a host whose TAP came
back with a new MAC after a restart was refused with ``mac_conflict``.  The
agent now keeps the MAC in ``STATE_DIR/tap.mac``.  Here: the decision table,
the state file (missing, corrupt, written atomically) and ``attach_tap``
over a stand-in TAP; ``existing_tap`` over a stand-in /sys/class/net.  The
real TAP is in netns_tests/test_tap_restart.py.
"""

from __future__ import annotations

import logging

import pytest

from l2crypt.agent import agent as agent_mod
from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import parse_mac
from l2crypt.io import linux_tap
from l2crypt.io.tap_mac import choose_mac, mac_path, read_stored_mac, store_mac

CONFIGURED = parse_mac("02:00:00:00:00:c0")
STORED = parse_mac("02:00:00:00:00:5d")
ON_TAP = parse_mac("7a:00:00:00:00:7a")
KERNEL = parse_mac("6e:00:00:00:00:6e")


@pytest.mark.parametrize("configured, stored, existing, want", [
    (CONFIGURED, STORED, ON_TAP, (CONFIGURED, "config")),
    (None, STORED, ON_TAP, (STORED, "state")),
    (None, STORED, None, (STORED, "state")),
    (None, None, ON_TAP, (ON_TAP, "tap")),
    (None, None, None, (None, "kernel")),
])
def test_choose_mac(configured, stored, existing, want):
    assert choose_mac(configured, stored, existing) == want


def test_state_file_round_trip(tmp_path):
    assert read_stored_mac(tmp_path) is None
    store_mac(tmp_path, STORED)
    assert read_stored_mac(tmp_path) == STORED
    assert mac_path(tmp_path).read_text() == "02:00:00:00:00:5d\n"
    assert oct(mac_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tap.mac"]  # no temporary file left


@pytest.mark.parametrize("text", ["", "garbage\n", "02:00:00:00:00\n", "01:00:5e:00:00:01\n",
                                  "00:00:00:00:00:00\n", "02:00:00:00:00:zz\n"])
def test_corrupt_state_file_is_a_clear_error(tmp_path, text):
    mac_path(tmp_path).write_text(text)
    with pytest.raises(LocalError) as info:
        read_stored_mac(tmp_path)
    message = str(info.value)
    assert str(mac_path(tmp_path)) in message and "not a unicast MAC" in message
    assert "\n" not in message


def test_unreadable_state_file_is_a_clear_error(tmp_path):
    mac_path(tmp_path).mkdir()  # a directory where the file should be
    with pytest.raises(LocalError, match="cannot read the stored TAP MAC"):
        read_stored_mac(tmp_path)


# --- attach_tap over a stand-in TAP ---------------------------------------------------


class StandInTap:
    """Records what the agent asked of the TAP; a new TAP gets ``KERNEL``."""

    opened: list["StandInTap"] = []

    def __init__(self, name, mtu, mac, offload=False):
        self.name, self.mtu, self.asked_mac = name, mtu, mac
        self.vnet_hdr_len = 0
        self.existing = EXISTING.get(name)
        self.created = self.existing is None
        self.old_mac = self.existing.mac if self.existing else None
        self.old_mtu = self.existing.mtu if self.existing else None
        self.mac = mac or (self.existing.mac if self.existing else KERNEL)
        self.closed = False
        StandInTap.opened.append(self)

    def close(self):
        self.closed = True


EXISTING: dict[str, linux_tap.ExistingTap] = {}


@pytest.fixture
def stand_in(monkeypatch):
    EXISTING.clear()
    StandInTap.opened.clear()
    monkeypatch.setattr(agent_mod, "LinuxTap", StandInTap)
    monkeypatch.setattr(agent_mod, "existing_tap", lambda name: EXISTING.get(name))
    return StandInTap.opened


def test_first_start_keeps_the_mac_the_kernel_gave_the_new_tap(tmp_path, stand_in):
    tap = agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert tap.created and tap.asked_mac is None and tap.mac == KERNEL
    assert read_stored_mac(tmp_path) == KERNEL
    # The restart: the TAP is still there, the agent asks for the same MAC.
    EXISTING["l2c0"] = linux_tap.ExistingTap("l2c0", KERNEL, 1468, 0x1802)
    again = agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert not again.created and again.asked_mac == KERNEL


def test_first_start_on_a_tap_the_network_manager_made_keeps_its_mac(tmp_path, stand_in):
    EXISTING["l2c0"] = linux_tap.ExistingTap("l2c0", ON_TAP, 1500, 0x1802)
    tap = agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert not tap.created and tap.asked_mac == ON_TAP and tap.mtu == 1468
    assert read_stored_mac(tmp_path) == ON_TAP


def test_a_tap_made_again_with_another_mac_gets_the_stored_one(tmp_path, stand_in):
    """After a reboot networkd or ifupdown make the TAP with a fresh random MAC."""
    store_mac(tmp_path, STORED)
    EXISTING["l2c0"] = linux_tap.ExistingTap("l2c0", ON_TAP, 1500, 0x1802)
    tap = agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert tap.asked_mac == STORED and tap.mac == STORED
    assert read_stored_mac(tmp_path) == STORED


def test_a_configured_mac_wins_over_the_stored_one_and_replaces_it(tmp_path, stand_in, caplog):
    store_mac(tmp_path, STORED)
    with caplog.at_level(logging.WARNING, logger="l2crypt.agent"):
        tap = agent_mod.attach_tap("l2c0", 1468, tmp_path, "02:00:00:00:00:c0")
    assert tap.asked_mac == CONFIGURED
    assert read_stored_mac(tmp_path) == CONFIGURED
    assert [r.getMessage() for r in caplog.records] == ["tap_mac_replaced"]


def test_a_corrupt_state_file_stops_the_start_before_the_tap_is_touched(tmp_path, stand_in):
    mac_path(tmp_path).write_text("not a mac\n")
    with pytest.raises(LocalError, match="tap.mac: not a unicast MAC"):
        agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert stand_in == []
    assert mac_path(tmp_path).read_text() == "not a mac\n"  # left for the operator to look at


def test_a_state_dir_that_cannot_keep_the_mac_is_an_error_and_closes_the_tap(tmp_path, stand_in):
    (tmp_path / "tap.mac.tmp").mkdir()  # the file cannot be written (as root too)
    with pytest.raises(LocalError, match="tap.mac: cannot store the TAP MAC"):
        agent_mod.attach_tap("l2c0", 1468, tmp_path, None)
    assert stand_in[0].closed
    assert read_stored_mac(tmp_path) is None


# --- existing_tap over a stand-in /sys/class/net ------------------------------------------


def _dev(sys_net, name, flags=None, mac="7a:00:00:00:00:7a", mtu=1500):
    d = sys_net / name
    d.mkdir(parents=True)
    if flags is not None:
        (d / "tun_flags").write_text(f"0x{flags:x}\n")
    (d / "address").write_text(mac + "\n")
    (d / "mtu").write_text(f"{mtu}\n")


def test_existing_tap_reads_a_persistent_single_queue_tap(tmp_path):
    assert linux_tap.existing_tap("l2c0", tmp_path) is None
    _dev(tmp_path, "l2c0", 0x1802)  # what `ip tuntap add dev l2c0 mode tap` makes
    _dev(tmp_path, "vnet0", 0x5802)  # ... with vnet_hdr: fine, the agent's own flags replace it
    assert linux_tap.existing_tap("l2c0", tmp_path) == linux_tap.ExistingTap("l2c0", ON_TAP, 1500, 0x1802)
    assert linux_tap.existing_tap("vnet0", tmp_path).tun_flags == 0x5802


@pytest.mark.parametrize("flags, words", [
    (None, "is not a TUN/TAP device"),  # a veth, a dummy, a bridge ...
    (0x1801, "is a TUN device"),
    (0x1902, "multi_queue"),
    (0x1002, "not persistent"),
])
def test_existing_device_that_cannot_be_the_tap_is_a_clear_error(tmp_path, flags, words):
    _dev(tmp_path, "l2c0", flags)
    with pytest.raises(LocalError) as info:
        linux_tap.existing_tap("l2c0", tmp_path)
    assert words in str(info.value) and "'l2c0'" in str(info.value)
