"""The multipath lab (issue 17): the gateway lab plus three WAN paths between gA and gB.

Everything of ``GatewayLab`` (segments A and B, the key servers peering
through ``l2c-wan-<a>``, gA's plain host), and three paths, each through its
own router namespace (in segment A's lab, suffix ``<a>``)::

    gA  wan1 10.71.1.1 -- ga 10.71.1.254 [l2c-r1-<a>] 10.71.2.254 gb -- wan1 10.71.2.1  gB
    gA  wan2 10.72.1.1 -- ga 10.72.1.254 [l2c-r2-<a>] 10.72.2.254 gb -- wan2 10.72.2.1  gB
    gA  wan3 10.73.1.1 -- ga 10.73.1.254 [l2c-r3-<a>] 10.73.2.254 gb -- wan3 10.73.2.1  gB
                                          rl 10.73.3.254
                                           |
                                          eth0 10.73.3.1 [l2c-rly-<a>]
                                          l2crypt-gateway relay --listen 10.73.3.1:4789
                                            --join 10.73.1.1:4789 10.73.2.1:4789

* Each gateway routes ``10.7k.0.0/16`` out of ``wan{k}``, so its datagrams to
  path k's addresses leave with path k's address as source.  On path 3 both
  gateways' remote is the relay (10.73.3.1:4789).
* Every path link has MTU 9200 (``WAN_MTU``): tunnel datagrams of jumbo inner
  frames pass unfragmented.  The segments keep ``Lab``'s MTU (1500): ``Lab``
  has no MTU option yet, so there is no ``segment_mtu`` here.
* ``shape``, ``set_loss`` and ``path_down`` act in the router namespace only
  (tbf on its two gateway-facing ports, nftables in its forward path), so the
  gateways' interfaces stay up as with a real upstream failure.
* ``multipath=False`` starts the gateways exactly as ``GatewayLab`` (one path
  over ``l2c-wan-<a>``); ``multipath=True`` gives each ``--tunnel-path
  path_spec(gw, k)`` and the options of ``tunnel_args``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .gateway import GATEWAYS, TUNNEL_PORT, GatewayLab
from .support import Capture, LabError, Proc

PATHS = (1, 2, 3)
RELAY_PATH = 3
WAN_MTU = 9200  # a jumbo inner frame (MTU 9000) plus the tunnel and IP/UDP overhead
RELAY_IP = "10.73.3.1"
RELAY_GW_IP = "10.73.3.254"
#: The interface of a router namespace toward each gateway.
ROUTER_IFNAME = {"gA": "ga", "gB": "gb"}
RELAY_STATS_INTERVAL_S = 0.2
#: At most this many bytes of a process's memory are read by ``process_memory``.
PROCESS_MEMORY_LIMIT = 512 * 1024 * 1024


def path_ip(gw: str, k: int) -> str:
    """The address of ``gw`` on path k: gA 10.7k.1.1, gB 10.7k.2.1."""
    return f"10.7{k}.{1 if gw == 'gA' else 2}.1"


def router_ip(gw: str, k: int) -> str:
    """The router's address on path k facing ``gw``: 10.7k.1.254 or 10.7k.2.254."""
    return path_ip(gw, k)[:-1] + "254"


class MultipathLab(GatewayLab):
    """``GatewayLab`` plus three WAN paths between gA and gB, path 3 through a relay."""

    def __init__(self, state_dir: str | Path, multipath: bool = False,
                 tunnel_args: dict[str, object] | None = None, **kw):
        """``multipath``: start the gateways with ``--tunnel-path`` per path (else as
        ``GatewayLab``).  ``tunnel_args``: ``{"mode": "split", "spray": True}`` ->
        ``--tunnel-mode split --tunnel-spray`` (a bool is a flag; False gives ``--no-...``)."""
        super().__init__(state_dir, **kw)
        self.multipath = multipath
        self.tunnel_args = dict(tunnel_args or {})
        self.paths_built = False

    # -- names

    @staticmethod
    def router(k: int) -> str:
        """The role of path k's router namespace (``r1``..``r3``)."""
        if k not in PATHS:
            raise LabError(f"no path {k}: the paths are {PATHS}")
        return f"r{k}"

    def path_remote(self, gw: str, k: int) -> str:
        """Where ``gw`` sends on path k: the other gateway's path address, or the relay's."""
        other = "gB" if gw == "gA" else "gA"
        return RELAY_IP if k == RELAY_PATH else path_ip(other, k)

    def path_spec(self, gw: str, k: int) -> str:
        """``gw``'s ``tunnel_paths`` entry for path k: ``"<peer> path=<k> local=IP:PORT remote=IP:PORT"``."""
        self.router(k)
        other = "gB" if gw == "gA" else "gA"
        return (f"{other} path={k} local={path_ip(gw, k)}:{TUNNEL_PORT} "
                f"remote={self.path_remote(gw, k)}:{TUNNEL_PORT}")

    # -- building

    def _build_gateway(self, gw: str) -> None:
        super()._build_gateway(gw)
        if not self.paths_built and all(g in self.lab_of(g).namespaces for g in GATEWAYS):
            for k in PATHS:
                self._build_path(k)
            self._build_relay()
            self.paths_built = True

    def _build_path(self, k: int) -> None:
        a, r = self.a, self.router(k)
        a._new_ns(r)
        a._sysctl(r, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.disable_ipv6": "1",
                      "net.ipv6.conf.default.disable_ipv6": "1"})
        for gw in GATEWAYS:
            lab, port = self.lab_of(gw), ROUTER_IFNAME[gw]
            a._veth(r, port, lab.ns(gw), f"wan{k}")
            a._link(r, port, mtu=WAN_MTU)
            lab._link(gw, f"wan{k}", mtu=WAN_MTU)
            self._addr_route(a, r, port, router_ip(gw, k), 24)
            self._addr_route(lab, gw, f"wan{k}", path_ip(gw, k), 24, (f"10.7{k}.0.0/16",), router_ip(gw, k))

    def _build_relay(self) -> None:
        a, r = self.a, self.router(RELAY_PATH)
        a._new_ns("rly")
        a._sysctl("rly", {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
        a._veth(r, "rl", "rly", "eth0")
        a._link(r, "rl", mtu=WAN_MTU)
        a._link("rly", "eth0", mtu=WAN_MTU)
        self._addr_route(a, r, "rl", RELAY_GW_IP, 24)
        self._addr_route(a, "rly", "eth0", RELAY_IP, 24, ("10.73.0.0/16",), RELAY_GW_IP)
        self.start_relay()

    def relay_stats_path(self) -> Path:
        return self.a.state_dir / "relay-stats.json"

    def start_relay(self, timeout_s: float = 15.0) -> Proc:
        """Start the relay of path 3 in ``rly``; return once it listens."""
        a = self.a
        proc = a.popen("rly", [a.cmd("l2crypt-gateway"), "relay", "--listen", f"{RELAY_IP}:{TUNNEL_PORT}",
                               "--join", f"{path_ip('gA', RELAY_PATH)}:{TUNNEL_PORT}",
                               f"{path_ip('gB', RELAY_PATH)}:{TUNNEL_PORT}",
                               "--stats-interval-s", str(RELAY_STATS_INTERVAL_S),
                               "--stats-file", self.relay_stats_path()], name="relay")
        deadline = time.monotonic() + timeout_s
        while '"relay_listening"' not in a.log_text("relay"):
            if not proc.alive() or time.monotonic() > deadline:
                raise LabError(f"the relay did not start within {timeout_s} s:\n{a.log_text('relay')[-2000:]}")
            time.sleep(0.05)
        return proc

    def relay_pid(self) -> int:
        proc = self.a.proc("relay")
        if proc is None or not proc.alive():
            raise LabError(f"the relay is not running:\n{self.a.log_text('relay')[-2000:]}")
        return proc.pid

    def relay_stats(self) -> dict:
        """The relay's last counters (written every ``RELAY_STATS_INTERVAL_S``)."""
        try:
            return json.loads(self.relay_stats_path().read_text())
        except (OSError, ValueError):
            return {}

    # -- gateways

    def tunnel_argv(self, gw: str) -> list[str]:
        if not self.multipath:
            return super().tunnel_argv(gw)
        argv = [arg for k in PATHS for arg in ("--tunnel-path", self.path_spec(gw, k))]
        for key, value in self.tunnel_args.items():
            flag = "--tunnel-" + key.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv

    # -- conditions of a path

    def _router_exec(self, k: int, argv: list[str], input: bytes | None = None) -> None:
        self.a.exec(self.router(k), argv, timeout=10, check=True, input=input)

    def shape(self, k: int, mbit: float | None) -> None:
        """Cap path k at ``mbit`` Mbit/s each way (tbf on the router's ports); None removes it."""
        for port in ROUTER_IFNAME.values():
            if mbit is None:
                self.a.exec(self.router(k), ["tc", "qdisc", "del", "dev", port, "root"], timeout=10)
                continue
            burst = max(int(mbit * 1e6 / 8 / 250), 2 * (WAN_MTU + 18))  # 4 ms, at least two jumbo frames
            self._router_exec(k, ["tc", "qdisc", "replace", "dev", port, "root", "tbf", "rate", f"{mbit}mbit",
                                  "burst", str(burst), "latency", "20ms"])

    def _nft_table(self, k: int, table: str, rules: str | None) -> None:
        """Replace (or with ``rules=None`` remove) the inet table ``table`` in r{k}."""
        script = f"add table inet {table}\ndelete table inet {table}\n"
        if rules is not None:
            script += f"table inet {table} {{\n{rules}\n}}\n"
        self._router_exec(k, ["nft", "-f", "-"], input=script.encode())

    def set_loss(self, k: int, percent: float) -> None:
        """Drop ``percent`` % of the packets r{k} forwards, each way at random; 0 removes it."""
        if not 0 <= percent <= 100:
            raise LabError(f"loss must be from 0 to 100 %, not {percent}")
        n = round(percent * 100)
        rules = None if n == 0 else (
            "  chain forward { type filter hook forward priority 0; policy accept;\n"
            f"    numgen random mod 10000 < {n} counter drop\n  }}")
        self._nft_table(k, "l2c_loss", rules)

    def path_down(self, k: int) -> None:
        """r{k} drops everything (forwarded or its own); the gateways' links stay up."""
        rules = "\n".join(f"  chain {hook} {{ type filter hook {hook} priority -10; policy drop; }}"
                          for hook in ("prerouting", "output"))
        self._nft_table(k, "l2c_down", rules)

    def path_up(self, k: int) -> None:
        self._nft_table(k, "l2c_down", None)

    def capture(self, k: int, seconds: float | None = None, snaplen: int | None = None) -> Capture | Path:
        """tcpdump on r{k}'s port toward gB.  With ``seconds``: capture that long and return
        the pcap's path; without: return the running ``Capture`` (``.stop()``, ``.frames()``)."""
        cap = self.a.capture(ROUTER_IFNAME["gB"], role=self.router(k), snaplen=snaplen,
                             name=f"tcpdump-path{k}-{int(time.monotonic() * 1000) % 100000}")
        if seconds is None:
            return cap
        time.sleep(seconds)
        return cap.stop()

    # -- memory of a process

    @staticmethod
    def process_memory(pid: int, limit_bytes: int = PROCESS_MEMORY_LIMIT) -> bytes:
        """The writable mappings of ``pid`` (heap, stack, anonymous and data), at most
        ``limit_bytes`` in all: what a key in its memory would be in."""
        out, total = [], 0
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError as exc:
            raise LabError(f"cannot read the memory map of {pid}: {exc}") from None
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for line in maps:
                m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
                if not m or "w" not in m.group(3) or "r" not in m.group(3) or line.endswith("[vvar]"):
                    continue
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                size = min(end - start, limit_bytes - total)
                if size <= 0:
                    break
                try:
                    mem.seek(start)
                    chunk = mem.read(size)
                except (OSError, OverflowError, ValueError):
                    continue
                out.append(chunk)
                total += len(chunk)
        return b"".join(out)
