"""The l2crypt lab: a key server, a switch and hosts in network namespaces.

Topology (``<s>`` is the lab's random 5-hex-digit suffix; every namespace
carries it, so labs never collide and every interface lives in a namespace the
lab made; nothing is created in the root namespace)::

             l2c-ks-<s>: keyserverd on 10.67.0.1:7788 (TLS 1.3)
             +--------------------- mbr0 10.67.0.1/24 -----------------+
             |  m1-<s>                 m2-<s>                 m3-<s>  |
             +----|----------------------|----------------------|-----+
                  | management veths     |                      |
             mgmt0 10.67.0.11     mgmt0 10.67.0.12       mgmt0 10.67.0.13
       +-----------------+    +-----------------+    +-----------------+
       | l2c-h1-<s>      |    | l2c-h2-<s>      |    | l2c-h3-<s>      |
       | l2c0 (TAP)      |    | l2c0 (TAP)      |    | l2c0 (TAP)      |
       |  10.66.0.11/24  |    |  10.66.0.12/24  |    |  10.66.0.13/24  |
       |  fd66::11/64    |    |  fd66::12/64    |    |  fd66::13/64    |
       |   agent         |    |   agent         |    |   agent         |
       | eth0 (wire)     |    | eth0 (wire)     |    | eth0 (wire)     |
       +-----|-----------+    +-----|-----------+    +-----|-----------+
             | sealed frames only, EtherType 0x88B5        |
       +-----|------------------------|--------------------|-------+
       |  p1-<s>                   p2-<s>               p3-<s>     |
       |            br0  (l2c-sw-<s>: the switch; no addresses,    |
       |                  IPv6 off, STP off, no multicast snooping)|
       |  pi-<s> ---- eth0 of l2c-in-<s>, the intruder (no cert)   |
       +-----------------------------------------------------------+

* The host wire port ``eth0`` is created DOWN with no address: the agent
  hardens it (IPv6 off, no address generation, tc egress filter) and brings it
  up itself.
* As a host's network manager would, the lab makes the persistent TAP
  ``l2c0`` with its addresses once, before the first agent start; agents
  attach to it, a restart adds nothing.  IPv6 addresses go through duplicate
  address detection as on a real host (again whenever the TAP regains its
  carrier, i.e. after an agent restart): ``wait_connected`` also waits until
  none is tentative, and fails if one failed.  As in the README, hosts have no
  ``--mac`` and agents no ``--tap-mac``: the lab learns each MAC (``tap_mac_of``).
* ``Lab(agents=False)``: the same switch, test addresses on ``eth0``, no key
  server (``scripts/bench``'s baseline).  ``Lab(wire_mtu=9000)``: jumbo ports.
* Every process runs via ``ip netns exec`` in its own session; its PID (and
  start time) go to ``<state_dir>/lab.json`` and its output to
  ``logs/<name>.log``: ``Lab.load(state_dir).down()`` cleans up another's lab.
* Captures run tcpdump (``-U -w``) inside the switch namespace.  With
  ``capture_from_start`` the lab captures what each host port receives
  (``-Q in``) before any agent starts, for the lab's whole life.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute, netns

from .support import (STARTED_CHILDREN, Capture, LabError, LabProcesses, Proc, cpu_seconds, ethertype_counts,
                      read_pcap, read_pcap_records, stop_proc, wait_dad_done, wait_listening)

L2C_ETHERTYPE = 0x88B5  # constants.DEFAULT_ETHERTYPE (the lab runs the defaults)
HOSTS = ("h1", "h2", "h3")
KS_IP = "10.67.0.1"
KS_PORT = 7788
MGMT_PREFIX = 24
TAP_IFNAME = "l2c0"
WIRE_IFNAME = "eth0"
MGMT_IFNAME = "mgmt0"
BRIDGE = "br0"
NS_PREFIX = "l2c"


def _host_no(host: str) -> int:
    return int(host.lstrip("h"))


def wire_mac(host: str) -> str:
    """Fixed MAC of a host's wire port eth0: h1 -> 02:4c:57:00:00:11."""
    return f"02:4c:57:00:00:{0x10 + _host_no(host):02x}"


def tap_ipv4(host: str) -> str:
    return f"10.66.0.{10 + _host_no(host)}"


def tap_ipv6(host: str) -> str:
    return f"fd66::{10 + _host_no(host)}"


def mgmt_ip(host: str) -> str:
    return f"10.67.0.{10 + _host_no(host)}"


INTRUDER_MAC = "02:4c:49:00:00:66"

# --- the lab -------------------------------------------------------------------

LIVE_LABS: list["Lab"] = []
_OWNER_PID = os.getpid()


def _down_all() -> None:
    # A forked child (pyroute2 forks) runs atexit too: only the builder takes labs down.
    if os.getpid() != _OWNER_PID:
        return
    for lab in list(LIVE_LABS):
        lab.down()


atexit.register(_down_all)


def install_signal_cleanup() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt in this process, so
    ``finally`` blocks and fixture finalizers run and take every live lab down."""

    def _raise(signum, frame):
        if os.getpid() != _OWNER_PID:
            # A library's forked child (pyroute2 SIGTERMs its helpers): die, never unwind.
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)


class Lab(LabProcesses):
    """Build, run and tear down the lab; see the module docstring for the drawing."""

    def __init__(
        self,
        state_dir: str | Path | None = None,
        hosts: tuple[str, ...] = HOSTS,
        agents: bool = True,
        capture_from_start: bool = False,
        suffix: str | None = None,
        bin_dir: str | Path | None = None,
        agent_args: tuple[str, ...] = (),
        wire_mtu: int | None = None,
    ):
        self.suffix = suffix or secrets.token_hex(3)[:5]
        self.wire_mtu = wire_mtu
        self.state_dir = Path(state_dir or f"/tmp/l2crypt-lab-{self.suffix}").resolve()
        self.hosts = tuple(hosts)
        self.agents = agents
        self.capture_from_start = capture_from_start
        self.bin_dir = Path(bin_dir or Path(sys.executable).parent)
        self.agent_args = tuple(agent_args)  # extra options of every agent
        self.namespaces: dict[str, str] = {}  # role -> netns name
        self.procs: list[Proc] = []
        self.lifetime: dict[str, Capture] = {}  # host -> capture of what it sent to the switch
        self.tap_macs: dict[str, str] = {}  # host -> the TAP MAC its agent chose (learned from its status)
        self.keyserver_addr = f"{KS_IP}:{KS_PORT}"
        self.keyserver_args: list[str] = []  # extra keyserverd options (lab_gateway: NETKEY peering)
        self._owner_pid = os.getpid()  # a forked copy of this object must not tear down

    # -- names and paths

    def ns(self, role: str) -> str:
        """The netns name of a role (``ks``, ``sw``, ``h1``.., ``in``) or a netns name."""
        return self.namespaces.get(role, role)

    def host_dir(self, host: str) -> Path:
        return self.state_dir / "hosts" / host

    @property
    def ks_dir(self) -> Path:
        return self.state_dir / "keyserver"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def log_text(self, name: str) -> str:
        p = self.log_path(name)
        return p.read_text(errors="replace") if p.exists() else ""

    def port_name(self, role: str) -> str:
        """Switch-side port of a host (``p1-<s>``) or of the intruder (``pi-<s>``)."""
        tag = "i" if role == "in" else str(_host_no(role))
        return f"p{tag}-{self.suffix}"

    def cmd(self, name: str) -> str:
        """Path of a console script of the venv (``l2crypt``, ``keyserverd``)."""
        return str(self.bin_dir / name)

    # -- state file

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "suffix": self.suffix,
            "hosts": list(self.hosts),
            "agents": self.agents,
            "namespaces": self.namespaces,
            "keyserver": self.keyserver_addr,
            "procs": [p.__dict__ for p in self.procs],
            "lifetime_pcaps": {h: str(c.pcap) for h, c in self.lifetime.items()},
            "tap_macs": self.tap_macs,
        }
        tmp = self.state_dir / "lab.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / "lab.json")

    @classmethod
    def load(cls, state_dir: str | Path) -> "Lab":
        """A handle on a lab recorded in ``state_dir/lab.json`` (e.g. to take it down)."""
        state = json.loads((Path(state_dir) / "lab.json").read_text())
        lab = cls(state_dir, tuple(state["hosts"]), state["agents"], suffix=state["suffix"])
        lab.namespaces = state["namespaces"]
        lab.procs = [Proc(**p) for p in state["procs"]]
        lab.tap_macs = state.get("tap_macs", {})
        for host, pcap in state.get("lifetime_pcaps", {}).items():
            proc = next((p for p in lab.procs if p.name == f"tcpdump-life-{host}"), None)
            if proc is not None:
                lab.lifetime[host] = Capture(lab, proc, Path(pcap))
        LIVE_LABS.append(lab)
        return lab

    def detach(self) -> None:
        """Leave the lab running when this process exits (``scripts/lab up``)."""
        if self in LIVE_LABS:
            LIVE_LABS.remove(self)
        STARTED_CHILDREN.clear()

    # -- topology

    def _new_ns(self, role: str) -> str:
        name = f"{NS_PREFIX}-{role}-{self.suffix}"
        self.namespaces[role] = name
        self.save()  # recorded before it exists, so a crash in between is cleaned up too
        netns.create(name)
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def _sysctl(self, role: str, values: dict[str, str]) -> None:
        code = (
            "import sys\nfor kv in sys.argv[1:]:\n"
            "    k, v = kv.split('=', 1)\n"
            "    open('/proc/sys/' + k.replace('.', '/'), 'w').write(v)\n"
        )
        self.exec(role, [sys.executable, "-c", code, *(f"{k}={v}" for k, v in values.items())],
                  check=True)

    def _veth(self, left_role: str, left: str, right_role: str, right: str,
              right_mac: str | None = None) -> None:
        """A veth pair created inside ``left_role``'s netns with its peer in ``right_role``'s."""
        fd = os.open(f"/var/run/netns/{self.ns(right_role)}", os.O_RDONLY)
        try:
            peer = {"ifname": right, "net_ns_fd": fd}
            if right_mac:
                peer["address"] = right_mac
            with IPRoute(netns=self.ns(left_role), flags=0) as ipr:
                ipr.link("add", ifname=left, kind="veth", peer=peer)
        finally:
            os.close(fd)
        for role, ifname in ((left_role, left), (right_role, right)) if left_role == "sw" and self.wire_mtu else ():
            self._link(role, ifname, mtu=self.wire_mtu)

    def _link(self, role: str, ifname: str, **kw) -> None:
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise LabError(f"no interface {ifname} in {self.ns(role)}")
            ipr.link("set", index=idx[0], **kw)

    def _addr(self, role: str, ifname: str, address: str, prefixlen: int) -> None:
        """Add an address as a host's network manager does (IPv6 goes through DAD)."""
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)

    def wait_oper_up(self, role: str, ifname: str, timeout_s: float = 5.0) -> None:
        """Wait until ``ifname`` has carrier (operstate UP); a bridge port then forwards."""
        deadline = time.monotonic() + timeout_s
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            while True:
                links = ipr.get_links(ifname=ifname)
                if links and links[0].get_attr("IFLA_OPERSTATE") == "UP":
                    return
                if time.monotonic() > deadline:
                    raise LabError(f"{ifname} in {self.ns(role)} not up within {timeout_s} s")
                time.sleep(0.05)

    def has_link(self, role: str, ifname: str) -> bool:
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            return bool(ipr.link_lookup(ifname=ifname))

    def _build_switch(self) -> None:
        self._new_ns("sw")
        # The switch must not talk: no IPv6 on the bridge or its ports, no addresses.
        self._sysctl("sw", {"net.ipv6.conf.all.disable_ipv6": "1",
                            "net.ipv6.conf.default.disable_ipv6": "1"})
        with IPRoute(netns=self.ns("sw"), flags=0) as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0,
                     br_forward_delay=0, br_mcast_snooping=0)
            ipr.link("set", index=ipr.link_lookup(ifname=BRIDGE)[0], state="up")

    def _attach_to_switch(self, role: str, mac: str) -> None:
        """eth0 in ``role`` <-> port on br0 (port up; eth0 left as it is)."""
        port = self.port_name(role)
        self._veth("sw", port, role, WIRE_IFNAME, right_mac=mac)
        with IPRoute(netns=self.ns("sw"), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=BRIDGE)[0])
            ipr.link("set", index=idx, state="up")

    def _build_keyserver_net(self) -> None:
        self._new_ns("ks")
        self._sysctl("ks", {"net.ipv6.conf.all.disable_ipv6": "1",
                            "net.ipv6.conf.default.disable_ipv6": "1"})
        with IPRoute(netns=self.ns("ks"), flags=0) as ipr:
            ipr.link("add", ifname="mbr0", kind="bridge", br_stp_state=0, br_forward_delay=0)
            idx = ipr.link_lookup(ifname="mbr0")[0]
            ipr.addr("add", index=idx, address=KS_IP, prefixlen=MGMT_PREFIX)
            ipr.link("set", index=idx, state="up")

    def _build_host(self, host: str) -> None:
        self._new_ns(host)
        self._attach_to_switch(host, wire_mac(host))
        if self.agents:
            port = f"m{_host_no(host)}-{self.suffix}"
            self._veth("ks", port, host, MGMT_IFNAME)
            with IPRoute(netns=self.ns("ks"), flags=0) as ipr:
                idx = ipr.link_lookup(ifname=port)[0]
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname="mbr0")[0])
                ipr.link("set", index=idx, state="up")
            self._sysctl(host, {f"net.ipv6.conf.{MGMT_IFNAME}.disable_ipv6": "1"})
            self._addr(host, MGMT_IFNAME, mgmt_ip(host), MGMT_PREFIX)
            self._link(host, MGMT_IFNAME, state="up")
            # eth0 stays DOWN with no address: the agent hardens it and brings it up.
            self._make_tap(host)
        else:
            self._link(host, WIRE_IFNAME, state="up")
            self._addr_test_addresses(host, WIRE_IFNAME)

    def _make_tap(self, host: str) -> None:
        """What the host's network manager does at boot (README, ifupdown): a
        persistent TAP, up, with the host's addresses.  Never done again."""
        self.exec(host, ["ip", "tuntap", "add", "dev", TAP_IFNAME, "mode", "tap"], check=True)
        self._addr_test_addresses(host, TAP_IFNAME)

    def _addr_test_addresses(self, host: str, ifname: str) -> None:
        self._link(host, ifname, state="up")
        self._addr(host, ifname, tap_ipv4(host), 24)
        self._addr(host, ifname, tap_ipv6(host), 64)

    def add_intruder(self) -> str:
        """A namespace on the switch with no certificate; its ``eth0`` injects frames."""
        if "in" not in self.namespaces:
            self._new_ns("in")
            self._sysctl("in", {"net.ipv6.conf.all.disable_ipv6": "1",
                                "net.ipv6.conf.default.disable_ipv6": "1"})
            self._attach_to_switch("in", INTRUDER_MAC)
            self._link("in", WIRE_IFNAME, state="up")
            self.wait_oper_up("sw", self.port_name("in"))
        return self.ns("in")

    def inject(self, frames: list[bytes], role: str = "in", ifname: str = WIRE_IFNAME) -> int:
        """Send raw frames out of ``ifname`` in ``role`` through an AF_PACKET socket."""
        code = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            "s.bind((sys.argv[1], 0))\n"
            "n = 0\n"
            "for line in sys.stdin.read().split():\n"
            "    s.send(bytes.fromhex(line)); n += 1\n"
            "print(n)\n"
        )
        data = "\n".join(f.hex() for f in frames).encode()
        res = self.exec(role, [sys.executable, "-c", code, ifname], input=data, check=True)
        return int(res.stdout.strip() or 0)

    # -- captures

    def capture(self, ifname: str = BRIDGE, role: str = "sw", direction: str | None = None,
                name: str | None = None, bpf: list[str] | None = None,
                snaplen: int | None = None) -> Capture:
        """Start tcpdump on ``ifname`` in ``role`` and return once it listens.

        On ``br0`` (promiscuous under tcpdump) the bridge delivers a copy of
        every frame that enters it on any port, unicast included.
        ``direction="in"`` on a port keeps only what the attached host sent.
        """
        name = name or f"tcpdump-{ifname}-{secrets.token_hex(2)}"
        pcap = self.state_dir / "pcaps" / f"{name}.pcap"
        pcap.parent.mkdir(parents=True, exist_ok=True)
        argv = ["tcpdump", "-i", ifname, "-U", "--immediate-mode", "-n", "-Z", "root", "-w", str(pcap)]
        if direction:
            argv += ["-Q", direction]
        if snaplen:
            argv += ["-s", str(snaplen)]  # headers only, for long, fast captures
        proc = self.popen(role, argv + list(bpf or []), name=name)
        deadline = time.monotonic() + 10
        while "listening on" not in self.log_text(name):
            if not proc.alive() or time.monotonic() > deadline:
                self.stop(proc)
                raise LabError(f"tcpdump on {ifname} did not start:\n{self.log_text(name)[-2000:]}")
            time.sleep(0.05)
        return Capture(self, proc, pcap)

    def lifetime_frames(self) -> dict[str, list[bytes]]:
        """What each host sent to the switch since before its agent started."""
        return {h: c.frames() for h, c in self.lifetime.items()}

    # -- key server and agents

    def start_keyserver(self, timeout_s: float = 20.0) -> Proc:
        self.ks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = self.popen("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_dir,
                                 "--listen", self.keyserver_addr, "--workers", "1", *self.keyserver_args], name="keyserverd")
        return wait_listening(proc, KS_IP, KS_PORT, timeout_s, "keyserverd")

    def kill_keyserver(self, sig: int = signal.SIGKILL) -> None:
        proc = self.proc("keyserverd")
        if proc is not None:
            self.stop(proc, sig)

    def keyserverd(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        """Run an operator command of keyserverd on the lab's state dir."""
        return self.exec("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_dir, *args],
                         timeout=timeout)

    def host_add(self, host_id: str, mac: str | None = None, ips: tuple[str, ...] = ()) -> dict:
        args = ["host", "add", host_id, "--json"] + (["--mac", mac] if mac else [])
        args += [arg for ip in ips for arg in ("--ip", ip)]
        res = self.keyserverd(*args)
        if res.returncode != 0:
            raise LabError(f"keyserverd host add {host_id} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def enroll(self, host: str, token: str, fingerprint: str, host_id: str | None = None,
               state_dir: Path | None = None, timeout: float = 30.0, extra: tuple = ()) -> subprocess.CompletedProcess:
        sd = state_dir or self.host_dir(host)
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.exec(host, [self.cmd("l2crypt"), "enroll", "--server", self.keyserver_addr,
                                "--id", host_id or host, "--token", "-",  # on stdin: never in ps
                                "--ca-fingerprint", fingerprint, "--state-dir", sd, *extra],
                         timeout=timeout, input=token.encode() + b"\n")

    def agent_servers(self, host: str) -> list[str]:
        """The key servers the agent of ``host`` is given, in order of priority."""
        return [self.keyserver_addr]

    def agent_argv(self, host: str) -> list[str]:
        """The README's agent command for ``host`` (no ``--tap-mac``: the agent keeps its own MAC)."""
        servers = [arg for server in self.agent_servers(host) for arg in ("--server", server)]
        return [self.cmd("l2crypt"), "agent", "--port", WIRE_IFNAME, "--tap", TAP_IFNAME, *servers,
                "--state-dir", str(self.host_dir(host))]

    def start_agent(self, host: str, extra_args: tuple[str, ...] = ()) -> Proc:
        """Start the agent of ``host``; ``extra_args`` are more ``l2crypt agent`` options."""
        return self.popen(host, [*self.agent_argv(host), *self.agent_args, *extra_args], name=f"agent-{host}")

    def status(self, host: str, timeout: float = 10.0) -> dict:
        argv = [self.cmd("l2crypt"), "status", "--state-dir", self.host_dir(host), "--json"]
        res = self.exec(host, argv, timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"l2crypt status on {host} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def wait_connected(self, host: str, timeout_s: float = 30.0) -> dict:
        """Wait until the agent of ``host`` says connected; learn its TAP MAC
        (LabError if it differs from the MAC it had before: a restart must keep it)."""
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while time.monotonic() < deadline:
            agent = self.proc(f"agent-{host}")
            if agent is None or not agent.alive():
                raise LabError(f"the agent of {host} is not running:\n{self.log_text(f'agent-{host}')[-3000:]}")
            try:
                st = self.status(host, timeout=5)
                last = json.dumps(st)[:500]
            except (LabError, ValueError) as exc:
                st, last = {}, str(exc)[-500:]
            if st.get("connected"):
                if self.tap_macs.setdefault(host, st["mac"]) != st["mac"]:
                    raise LabError(f"the TAP MAC of {host} changed from {self.tap_macs[host]} to {st['mac']}")
                self.save()
                wait_dad_done(self.ns(host), TAP_IFNAME, max(1.0, deadline - time.monotonic()))
                return st
            time.sleep(0.2)
        raise LabError(f"agent of {host} not connected within {timeout_s} s; last status: {last}\n"
                       f"{self.log_text(f'agent-{host}')[-3000:]}")

    def tap_mac_of(self, host: str) -> str:
        """The TAP MAC the agent of ``host`` chose (it keeps it across restarts)."""
        return self.tap_macs.get(host) or self.status(host)["mac"]

    def restart_agent(self, host: str, timeout_s: float = 30.0, extra_args: tuple[str, ...] = (),
                      sig: int = signal.SIGTERM) -> dict:
        """Stop the agent of ``host`` with ``sig`` and start it again with the same
        command, as systemd would; the host keeps its TAP, addresses and MAC."""
        agent = self.proc(f"agent-{host}")
        if agent is not None:
            self.stop(agent, sig)
        self.start_agent(host, extra_args)
        return self.wait_connected(host, timeout_s)

    # -- up and down

    def up(self, timeout_s: float = 90.0) -> "Lab":
        """Build everything and return when every host has a connected agent and addresses."""
        if self not in LIVE_LABS:
            LIVE_LABS.append(self)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        deadline = time.monotonic() + timeout_s
        try:
            self._build_switch()
            if self.agents:
                self._build_keyserver_net()
            for host in self.hosts:
                self._build_host(host)
            if self.capture_from_start:
                for host in self.hosts:
                    self.lifetime[host] = self.capture(self.port_name(host), direction="in",
                                                       name=f"tcpdump-life-{host}")
                self.save()
            if not self.agents:
                for host in self.hosts:
                    wait_dad_done(self.ns(host), WIRE_IFNAME)
                return self
            self.start_keyserver()
            for host in self.hosts:
                token = self.host_add(host)
                res = self.enroll(host, token["token"], token["ca_fingerprint"])
                if res.returncode != 0:
                    raise LabError(f"enrollment of {host} failed: {res.stdout}{res.stderr}")
                self.start_agent(host)
            for host in self.hosts:
                self.wait_connected(host, max(1.0, deadline - time.monotonic()))
            return self
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop every process, remove every namespace.  Idempotent; never raises."""
        if os.getpid() != self._owner_pid:
            return
        old = None
        try:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up first
        except ValueError:
            pass  # not the main thread
        try:
            for proc in list(reversed(self.procs)):
                sig = signal.SIGINT if proc.name.startswith("tcpdump") else signal.SIGTERM
                try:
                    stop_proc(proc, sig)
                except Exception as exc:  # noqa: BLE001 - cleanup must go on
                    print(f"lab: stopping {proc.name}: {exc}", file=sys.stderr)
            self.procs.clear()
            existing = set(netns.listnetns())
            pids_by_ns = {}
            try:
                pids_by_ns = netns.ns_pids()
            except Exception:  # noqa: BLE001
                pass
            for role, name in list(self.namespaces.items()):
                if name not in existing:
                    continue
                # Safety net: anything still running in a namespace of this lab was
                # started by this lab (directly or by a child of it).
                for pid in pids_by_ns.get(name, []):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    netns.remove(name)
                except OSError as exc:
                    print(f"lab: removing netns {name}: {exc}", file=sys.stderr)
            self.namespaces.clear()
            if self.state_dir.exists():
                self.save()
        finally:
            if self in LIVE_LABS:
                LIVE_LABS.remove(self)
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
