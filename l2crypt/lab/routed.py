"""The routed lab of the layer-3 modes: two hosts in different subnets, a
router between them (optionally doing NAT), and a key server on a management
network.

Topology (``<s>`` is the lab's random suffix)::

          l2c-ks-<s>: keyserverd on 10.67.0.1:7788 (mbr0), management only
          +---------------- mbr0 10.67.0.1/24 ----------------+
          |  m1-<s>                                 m2-<s>     |
          +----|--------------------------------------|-------+
          mgmt0 10.67.0.11                       mgmt0 10.67.0.12
     +------------------+                     +------------------+
     | l2c-h1-<s>       |                     | l2c-h2-<s>       |
     | l3-agent         |                     | l3-agent         |
     | eth0 10.71.0.2/24|                     | eth0 10.72.0.2/24|
     |      fd71::2/64  |                     |      fd72::2/64  |
     +-----|------------+                     +-----|------------+
           |           +---------------------+      |
           +-------- r1 10.71.0.1   r2 10.72.0.1 ---+
                        fd71::1        fd72::1
                       | l2c-rt-<s>: the router |
                       | (nat: MASQUERADE r1->r2|
                       |  IPv4 and IPv6;        |
                       |  new connections from  |
                       |  r2 are dropped)       |
                       +------------------------+

* h1's policy is 10.72.0.0/24 and fd72::/64, h2's is 10.71.0.0/24 and
  fd71::/64; each host routes the other subnets via the router.  Every link
  has MTU 1500 and the routes carry no ``advmss`` or ``mtu``: the agents
  clamp the TCP MSS and answer too-big packets themselves (``path_mtu``).
* IPv6 addresses go through duplicate address detection, as on a real host;
  ``up()`` waits until none is tentative.
* ``nat=True``: the router masquerades h1's traffic leaving r2 and forwards
  nothing new that enters on r2; the agents run in nat mode (UDP).
* Processes, logs, captures and ``down()`` are those of ``lab.Lab``.
"""

from __future__ import annotations

import json
import time

from pyroute2 import IPRoute

from .segment import LIVE_LABS, Lab, LabError, MGMT_IFNAME, MGMT_PREFIX, Proc, mgmt_ip

ROUTER = "rt"
HOST_IF = "eth0"
SUBNETS = {"h1": "10.71.0", "h2": "10.72.0"}
SUBNETS6 = {"h1": "fd71::", "h2": "fd72::"}
IFA_F_TENTATIVE = 0x40
UDP_PORT = 7789
QUEUE_NUM = 7700


def host_ip(host: str) -> str:
    return f"{SUBNETS[host]}.2"


def host_ip6(host: str) -> str:
    return f"{SUBNETS6[host]}2"


def gateway_ip(host: str) -> str:
    return f"{SUBNETS[host]}.1"


def gateway_ip6(host: str) -> str:
    return f"{SUBNETS6[host]}1"


def subnet(host: str) -> str:
    return f"{SUBNETS[host]}.0/24"


def subnet6(host: str) -> str:
    return f"{SUBNETS6[host]}/64"


def other(host: str) -> str:
    return "h2" if host == "h1" else "h1"


class RoutedLab(Lab):
    """See the module docstring.  ``agents=False`` builds the network and
    enrolls the hosts but starts no agent (traffic then flows in clear)."""

    def __init__(self, state_dir=None, nat: bool = False, agents: bool = True, **kw):
        super().__init__(state_dir, hosts=("h1", "h2"), agents=agents, **kw)
        self.nat = nat
        self.mode = "nat" if nat else "routed"

    # -- topology

    def _route(self, role: str, dst: str, gateway: str) -> None:
        with IPRoute(netns=self.ns(role), flags=0) as ipr:
            ipr.route("add", dst=dst, gateway=gateway)

    def _wait_no_tentative(self, timeout_s: float = 10.0) -> None:
        """Wait until duplicate address detection is over on every address of the lab."""
        deadline = time.monotonic() + timeout_s
        for role in (ROUTER, *self.hosts):
            with IPRoute(netns=self.ns(role), flags=0) as ipr:
                while any(a.get_attr("IFA_FLAGS", a["flags"]) & IFA_F_TENTATIVE for a in ipr.get_addr(family=10)):
                    if time.monotonic() > deadline:
                        raise LabError(f"IPv6 addresses in {self.ns(role)} still tentative after {timeout_s} s")
                    time.sleep(0.1)

    def _build_router(self) -> None:
        self._new_ns(ROUTER)
        self._sysctl(ROUTER, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        if self.nat:
            rules = (
                "table inet labnat {\n"
                "  chain natpost { type nat hook postrouting priority 100; policy accept;\n"
                '    iifname "r1" oifname "r2" masquerade\n  }\n'
                "  chain natforward { type filter hook forward priority 0; policy accept;\n"
                '    iifname "r2" ct state new drop\n  }\n'
                "}\n"
            )
            self.exec(ROUTER, ["nft", "-f", "-"], input=rules.encode(), check=True)

    def _build_l3_host(self, host: str, index: int) -> None:
        self._new_ns(host)
        side = f"r{index}"
        self._veth(ROUTER, side, host, HOST_IF)
        self._addr(ROUTER, side, gateway_ip(host), 24)
        self._addr(ROUTER, side, gateway_ip6(host), 64)
        self._link(ROUTER, side, state="up")
        self._addr(host, HOST_IF, host_ip(host), 24)
        self._addr(host, HOST_IF, host_ip6(host), 64)
        self._link(host, HOST_IF, state="up")
        self._route(host, subnet(other(host)), gateway_ip(host))
        self._route(host, subnet6(other(host)), gateway_ip6(host))
        port = f"m{index}-{self.suffix}"
        self._veth("ks", port, host, MGMT_IFNAME)
        with IPRoute(netns=self.ns("ks"), flags=0) as ipr:
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="mbr0")[0])
            ipr.link("set", index=idx, state="up")
        self._addr(host, MGMT_IFNAME, mgmt_ip(host), MGMT_PREFIX)
        self._link(host, MGMT_IFNAME, state="up")

    # -- agents

    def start_l3_agent(self, host: str, *extra: str) -> Proc:
        return self.popen(host, [
            self.cmd("l2crypt"), "l3-agent", "--mode", self.mode, "--server", self.keyserver_addr,
            "--state-dir", self.host_dir(host), "--address", host_ip(host), "--address", host_ip6(host),
            "--prefix", subnet(other(host)), "--prefix", subnet6(other(host)),
            "--udp-port", str(UDP_PORT), "--queue-num", str(QUEUE_NUM), "--log-level", "debug",
            *extra,
        ], name=f"l3agent-{host}")

    def l3_status(self, host: str, timeout: float = 10.0) -> dict:
        res = self.exec(host, [self.cmd("l2crypt"), "l3-status", "--state-dir", self.host_dir(host)],
                        timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"l2crypt l3-status on {host} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def wait_l3_connected(self, host: str, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            agent = self.proc(f"l3agent-{host}")
            if agent is None or not agent.alive():
                raise LabError(f"the l3 agent of {host} is not running:\n{self.log_text(f'l3agent-{host}')[-3000:]}")
            try:
                st = self.l3_status(host, timeout=5)
                if st.get("connected"):
                    return st
                last = json.dumps(st)[:500]
            except (LabError, ValueError) as exc:
                last = str(exc)[-500:]
            time.sleep(0.2)
        raise LabError(f"l3 agent of {host} not connected within {timeout_s} s; last: {last}\n"
                       f"{self.log_text(f'l3agent-{host}')[-3000:]}")

    def stop_l3_agent(self, host: str, sig=None) -> None:
        import signal

        proc = self.proc(f"l3agent-{host}")
        if proc is not None:
            self.stop(proc, sig or signal.SIGTERM)

    def restart_l3_agent(self, host: str, *extra: str, sig=None, timeout_s: float = 30.0) -> dict:
        """Stop the host's agent (SIGTERM, or ``sig``) and start it again, with ``extra`` arguments."""
        self.stop_l3_agent(host, sig)
        self.start_l3_agent(host, *extra)
        return self.wait_l3_connected(host, timeout_s)

    def netfilter_rules(self, host: str) -> str:
        """The host's whole nftables rule set (iptables-nft rules included)."""
        return self.exec(host, ["nft", "list", "ruleset"], check=True).stdout

    # -- up

    def up(self, timeout_s: float = 90.0) -> "RoutedLab":
        if self not in LIVE_LABS:
            LIVE_LABS.append(self)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        deadline = time.monotonic() + timeout_s
        try:
            self._build_keyserver_net()
            self._build_router()
            for index, host in enumerate(self.hosts, start=1):
                self._build_l3_host(host, index)
            self.start_keyserver()
            self._wait_no_tentative()
            for host in self.hosts:
                token = self.host_add(host, ips=(host_ip(host), host_ip6(host)))  # require_pinned_ips is on by default
                res = self.enroll(host, token["token"], token["ca_fingerprint"])
                if res.returncode != 0:
                    raise LabError(f"enrollment of {host} failed: {res.stdout}{res.stderr}")
            if self.agents:
                for host in self.hosts:
                    self.start_l3_agent(host)
                for host in self.hosts:
                    self.wait_l3_connected(host, max(1.0, deadline - time.monotonic()))
            return self
        except BaseException:
            self.down()
            raise

