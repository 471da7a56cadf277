# An agent restart keeps the host on the network (issue 14, section 2).
#
#          l2c-ks-<s>: keyserverd 10.67.0.1:7788
#      +------------------+          +------------------+
#      | h1               |          | h2               |
#      | l2c0 (TAP, made  |          | l2c0 (TAP: the   |
#      |  once by the lab |          |  lab's, or made  |
#      |  as ifupdown     |          |  by networkd or  |
#      |  would) 10.66.0.11          |  ifupdown here)  |
#      | eth0             |          | eth0             |
#      +----|-------------+          +----|-------------+
#      +----p1-<s> (captured: what h1 sends) ---- p2-<s> ---- br0 (l2c-sw-<s>)
#
# Hosts are added without --mac and agents started without --tap-mac, as the
# README does it.  The agent is killed (SIGKILL, a crash) or stopped (SIGTERM,
# systemctl restart) while h1 keeps pinging, then started with the same
# command: ping answers again within 3 s, the TAP kept its addresses and MAC,
# the lab added nothing, and h1 put nothing but sealed frames on the switch.
# The host network set-up examples (systemd-networkd's l2c0.netdev and
# l2c0.network, ifupdown's interfaces file) are run for real on h2.

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import time
from pathlib import Path

import pytest

from helpers import ping, skip_reason, wait_for
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

RESUME_S = 3.0
DOWN_S = 1.5
MARKER = "4c3243525354415254"  # "L2CRSTART", repeated by ping -p through the payload
ROOT = Path(__file__).resolve().parent.parent
IFUPDOWN_EXAMPLE = ROOT / "docs" / "examples" / "ifupdown-l2c0"


@pytest.fixture(scope="module")
def rlab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    L.install_signal_cleanup()
    the_lab = L.Lab(state_dir=tmp_path_factory.mktemp("rlab"), hosts=("h1", "h2"))
    try:
        the_lab.up(timeout_s=90)
        yield the_lab
    finally:
        the_lab.down()


def _addresses(lab, host) -> list[tuple]:
    """Every address on the host's TAP (family, address, prefix length, scope)."""
    res = lab.exec(host, ["ip", "-j", "addr", "show", "dev", L.TAP_IFNAME], check=True)
    return sorted((a["family"], a["local"], a["prefixlen"], a["scope"]) for a in json.loads(res.stdout)[0]["addr_info"])


def _tap_file(lab, host, name) -> str:
    return lab.exec(host, ["cat", f"/sys/class/net/{L.TAP_IFNAME}/{name}"], check=True).stdout.strip()


def _ping_replies(lab, name) -> list[tuple[float, int]]:
    """(time, icmp_seq) of each answer a ``ping -D`` started as ``name`` printed."""
    return [(float(t), int(seq)) for t, seq in
            re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", lab.log_text(name), re.M)]


def _no_lab_configuration(lab, monkeypatch) -> list[list[str]]:
    """Make every lab step that configures a host raise; return the list that
    records every command the lab runs from now on."""
    def refuse(*args, **kw):
        raise AssertionError(f"the lab configured the host during a restart: {args}")

    for name in ("_addr", "_make_tap", "_addr_test_addresses", "_link"):
        monkeypatch.setattr(lab, name, refuse, raising=False)
    commands: list[list[str]] = []
    for name in ("exec", "popen"):
        real = getattr(lab, name)

        def record(ns, argv, *args, _real=real, **kw):
            commands.append([str(a) for a in argv])
            return _real(ns, argv, *args, **kw)
        monkeypatch.setattr(lab, name, record)
    return commands


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_agent_restart_keeps_the_host_on_the_network(rlab, monkeypatch, sig):
    lab = rlab
    agent = lab.proc("agent-h1")
    argv = list(agent.argv)
    mac = lab.status("h1")["mac"]
    addresses = _addresses(lab, "h1")
    assert ("inet", L.tap_ipv4("h1"), 24, "global") in addresses
    cap = lab.capture(lab.port_name("h1"), direction="in", name=f"tcpdump-restart-h1-{sig.name}")
    pinger = lab.popen("h1", ["ping", "-4", "-D", "-O", "-i", "0.1", "-W", "1", "-p", MARKER, "-c", "300",
                              L.tap_ipv4("h2")], name=f"ping-restart-{sig.name}")
    try:
        wait_for("h1 -> h2 before the restart", lambda: len(_ping_replies(lab, pinger.name)) >= 5, timeout_s=15)
        commands = _no_lab_configuration(lab, monkeypatch)
        t_kill = time.time()
        lab.stop(agent, sig)
        t_down = time.time()
        # The agent is gone: the TAP stays, with its addresses, and without carrier.
        dropped = int(_tap_file(lab, "h1", "statistics/tx_dropped"))
        assert _addresses(lab, "h1") == addresses
        assert _tap_file(lab, "h1", "carrier") == "0" and _tap_file(lab, "h1", "operstate") == "down"
        time.sleep(DOWN_S)
        # h1 kept sending into the TAP all that time; the kernel dropped it (no reader).
        assert int(_tap_file(lab, "h1", "statistics/tx_dropped")) > dropped
        commands.clear()  # from here on: only what the lab runs to restart the agent
        t_start = time.time()
        again = lab.start_agent("h1")  # the same command, as Restart=on-failure runs it
        wait_for("a ping answer after the restart",
                 lambda: [t for t, _ in _ping_replies(lab, pinger.name) if t > t_start], timeout_s=15, every_s=0.1)
        first = min(t for t, _ in _ping_replies(lab, pinger.name) if t > t_start)
        st = lab.wait_connected("h1")
        commands = list(commands)
        monkeypatch.undo()
    finally:
        lab.stop(pinger, signal.SIGINT)
        records = L.read_pcap_records(cap.stop())
    print(f"{sig.name}: ping answered {first - t_start:.2f} s after the restart; the agent was down "
          f"{t_start - t_kill:.2f} s; {len(records)} frames from h1 on the switch")
    assert first - t_start <= RESUME_S, f"ping answered {first - t_start:.2f} s after the restart"
    assert again.argv == argv and "--tap-mac" not in argv
    assert [Path(c[0]).name for c in commands] == ["l2crypt"] * len(commands), commands  # agent, status
    assert _addresses(lab, "h1") == addresses
    assert st["mac"] == mac and st["mtu"] == st["wire_mtu"] - 32
    assert "mac_conflict" not in lab.log_text("agent-h1") and "mac_conflict" not in lab.log_text("keyserverd")
    # What h1 put on the switch: only sealed frames, before, during and after the downtime ...
    ethertypes = {int.from_bytes(f[12:14], "big") for _, f in records}
    assert ethertypes == {L.L2C_ETHERTYPE}, {hex(e) for e in ethertypes}
    assert not [f for _, f in records if bytes.fromhex(MARKER) in f]
    during = [f for t, f in records if t_down < t < t_start]
    assert all(f[12:14] == L.L2C_ETHERTYPE.to_bytes(2, "big") for f in during)
    # ... and the capture did see h1's sealed traffic on both sides of it.
    sealed = bytes.fromhex(mac.replace(":", ""))
    before = [f for t, f in records if t < t_kill and f[6:12] == sealed]
    after = [f for t, f in records if t > t_start and f[6:12] == sealed]
    assert len(before) >= 5 and len(after) >= 5, (len(before), len(after))
    # The key server still has h1 on the MAC the agent keeps in its state directory.
    listing = {h["id"]: h for h in json.loads(lab.keyserverd("host", "list", "--json").stdout)}
    assert listing["h1"]["mac"].lower() == mac
    assert (lab.host_dir("h1") / "tap.mac").read_text().strip() == mac


# --- the host's network manager makes the TAP ---------------------------------------------

NETWORKD = Path("/lib/systemd/systemd-networkd")
# systemd-networkd run by hand in the host's namespace, in a mount namespace of
# its own: it sees only our files, keeps its state in our directory, and finds
# /sys read-only, which tells it not to wait for udev (there is none here);
# /dev/net/tun is mode 0666 on a stock host (udev), so we give it such a node.
NETWORKD_SH = """set -e
mount -o remount,ro /sys
mount --bind {d}/etc /etc/systemd/network
mount --bind {d}/empty /usr/lib/systemd/network
mount --bind {d}/empty /run/systemd/network 2>/dev/null || true
mount --bind {d}/netif /run/systemd/netif
mount --bind {d}/networkd.conf /etc/systemd/networkd.conf
mount --bind {d}/tun /dev/net/tun
exec {networkd}
"""


def _start_networkd(lab, host, tmp_path, files: Path) -> L.Proc:
    d = tmp_path / "networkd"
    for sub in ("empty", "netif"):
        (d / sub).mkdir(parents=True)
    (d / "etc").symlink_to(files)
    user = pwd.getpwnam("systemd-network")
    os.chown(d / "netif", user.pw_uid, user.pw_gid)
    # Leave other links' routes alone (the namespace has a management network).
    (d / "networkd.conf").write_text("[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n")
    os.mknod(d / "tun", 0o666 | 0o020000, os.makedev(10, 200))
    os.chmod(d / "tun", 0o666)
    return lab.popen(host, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                            NETWORKD_SH.format(d=d, networkd=NETWORKD)], name=f"networkd-{host}")


def _networkd(lab, host, tmp_path) -> L.Proc | None:
    """``l2crypt install-units --networkd`` for the host's addresses, then networkd on those files."""
    prefix = tmp_path / "root"
    res = lab.exec(host, [lab.cmd("l2crypt"), "install-units", "--prefix", prefix, "--bin-dir", lab.bin_dir,
                          "--networkd", "--address", f"{L.tap_ipv4(host)}/24", "--address", f"{L.tap_ipv6(host)}/64"])
    assert res.returncode == 0, res.stderr
    return _start_networkd(lab, host, tmp_path, prefix / "etc" / "systemd" / "network")


def _ifupdown(lab, host, tmp_path) -> L.Proc | None:
    """The README's ifupdown file for the host's addresses, brought up with ifup."""
    text = IFUPDOWN_EXAMPLE.read_text().replace("192.0.2.11/24", f"{L.tap_ipv4(host)}/24")
    text = text.replace("2001:db8::11/64", f"{L.tap_ipv6(host)}/64")
    interfaces = tmp_path / "interfaces"
    interfaces.write_text(text)
    (tmp_path / "ifstate").mkdir()
    # --no-scripts: this machine's if-up.d hooks (resolved, ...) are not under test.
    res = lab.exec(host, ["ifup", "--no-scripts", "-i", interfaces, "--state-dir", tmp_path / "ifstate", L.TAP_IFNAME],
                   timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return None


def _one_line_error(res, *words) -> str:
    lines = (res.stderr or "").strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("manager", [_networkd, _ifupdown], ids=["networkd", "ifupdown"])
def test_the_network_manager_makes_the_tap_and_the_agent_restarts_under_it(rlab, tmp_path, manager):
    lab, host = rlab, "h2"
    if manager is _networkd and not NETWORKD.exists():
        pytest.fail(f"{NETWORKD} is missing: scripts/setup installs systemd")
    mac = lab.tap_mac_of(host)
    # `l2crypt remove-tap` refuses while the agent holds the TAP, and removes it once stopped.
    res = lab.exec(host, [lab.cmd("l2crypt"), "remove-tap", "--tap", L.TAP_IFNAME])
    _one_line_error(res, "is open in another process", "stop the agent first")
    lab.stop(lab.proc(f"agent-{host}"))
    res = lab.exec(host, [lab.cmd("l2crypt"), "remove-tap", "--tap", L.TAP_IFNAME])
    assert res.returncode == 0 and res.stdout.strip() == f"removed TAP {L.TAP_IFNAME}", res.stdout + res.stderr
    assert not lab.has_link(host, L.TAP_IFNAME)
    daemon = manager(lab, host, tmp_path)
    try:
        wait_for("the network manager's TAP with the host's addresses",
                 lambda: lab.has_link(host, L.TAP_IFNAME)
                 and ("inet", L.tap_ipv4(host), 24, "global") in _addresses(lab, host), timeout_s=20)
        flags = int(_tap_file(lab, host, "tun_flags"), 16)
        assert flags & 0x0802 == 0x0802 and not flags & 0x0100, hex(flags)  # persistent, TAP, one queue
        lab.start_agent(host)
        assert lab.wait_connected(host)["mac"] == mac  # the stored MAC, put on the new TAP
        assert _tap_file(lab, host, "address") == mac
        assert ping(lab, "h1", L.tap_ipv4(host)).returncode == 0
        made = _addresses(lab, host)  # with the link-local address the carrier brought
        for sig in (signal.SIGKILL, signal.SIGTERM):
            lab.stop(lab.proc(f"agent-{host}"), sig)
            time.sleep(1.0)  # networkd sees the carrier go
            assert _addresses(lab, host) == made, sig
            lab.start_agent(host)
            lab.wait_connected(host)
            wait_for(f"h1 -> {host} after {sig.name}",
                     lambda: ping(lab, "h1", L.tap_ipv4(host), count=1).returncode == 0, timeout_s=RESUME_S + 2)
            assert _addresses(lab, host) == made
        if daemon is not None:
            log = lab.log_text(daemon.name)
            assert daemon.alive(), log
            # networkd read our file, saw the agent's carrier come and go, and kept the addresses.
            assert f"{L.TAP_IFNAME}: Configuring with /etc/systemd/network/{L.TAP_IFNAME}.network" in log, log
            assert log.count(f"{L.TAP_IFNAME}: Lost carrier") >= 2, log
            complaints = [ln for ln in log.splitlines() if re.search(r"(?i)unknown|ignoring|fail|invalid", ln)]
            assert not complaints, complaints
    finally:
        if daemon is not None:
            lab.stop(daemon)
    # The TAP stays when its maker stops too; the host keeps working for the next test.
    assert ping(lab, "h1", L.tap_ipv4(host)).returncode == 0


def test_the_agent_refuses_a_tap_it_cannot_use_in_one_line(rlab):
    """A TUN, a multi_queue TAP, or a broken tap.mac: one clear line, exit 1,
    nothing half made; then the host comes back as it was."""
    lab, host = rlab, "h2"
    mac = lab.tap_mac_of(host)
    lab.stop(lab.proc(f"agent-{host}"))
    state = lab.host_dir(host) / "tap.mac"
    try:
        assert lab.exec(host, [lab.cmd("l2crypt"), "remove-tap"]).returncode == 0
        for mode, words in ((["mode", "tun"], "is a TUN device"),
                            (["mode", "tap", "multi_queue"], "is a multi_queue TAP")):
            lab.exec(host, ["ip", "tuntap", "add", "dev", L.TAP_IFNAME, *mode], check=True)
            res = lab.exec(host, lab.agent_argv(host), timeout=30)
            _one_line_error(res, f"tap: '{L.TAP_IFNAME}' {words}")
            lab.exec(host, ["ip", "tuntap", "del", "dev", L.TAP_IFNAME, *mode], check=True)
        state.write_text("garbage\n")
        res = lab.exec(host, lab.agent_argv(host), timeout=30)
        _one_line_error(res, "tap.mac: not a unicast MAC address")
        assert not lab.has_link(host, L.TAP_IFNAME)  # refused before any TAP was made
    finally:
        state.write_text(mac + "\n")
        if not lab.has_link(host, L.TAP_IFNAME):
            lab._make_tap(host)  # the host's network manager, as at the lab's start
        lab.start_agent(host)
    assert lab.wait_connected(host)["mac"] == mac
    assert ping(lab, "h1", L.tap_ipv4(host)).returncode == 0

