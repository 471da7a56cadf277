"""The gateway lab: two encrypted segments, a plain host and a routed WAN.

Two ``Lab`` segments (``A`` with suffix ``<a>``, ``B`` with ``<b>``), each with
its own key server and switch, plus (namespaces of segment A unless noted)::

      segment A: h1, h2 on br0 (l2c-sw-<a>)     segment B: h3 on br0 (l2c-sw-<b>)
        |                                          |
      eth0 02:4c:47:00:00:a1                     eth0 02:4c:47:00:00:b1
      l2c-gA-<a>  gateway gA                     l2c-gB-<b>  gateway gB
      | plain0            | wan0 10.69.1.1       wan0 10.69.2.1 |
      |                   +------ l2c-wan-<a> (routes) ---------+
    eth0 of l2c-p1-<a>:   a-gw 10.69.1.254   b-gw 10.69.2.254
    plain host p1         a-ks 10.68.1.254   b-ks 10.68.2.254
    10.66.0.31/24         |                  |
    MTU 1500              wan0 10.68.1.1     wan0 10.68.2.1
                          key server A       key server B  (NETKEY peering on :7789)

* Each gateway also has ``mgmt0`` (10.67.0.21 or .22) on its segment's key
  server bridge.  h1, h2, h3 and p1 share 10.66.0.0/24: the segments are one
  layer-2 domain joined by the gateways.
* The key servers' CAs are made before they start, so each is told the
  other's fingerprint; they peer through the WAN namespace.
* ``p1``'s port has checksum and segmentation offloads off: a veth would
  otherwise hand the gateway unfinished 64 KiB segments that no wire
  carries.  gA's ``plain0`` has GRO on, as a NIC has by default, and the
  plain side keeps the MTU of 1500 a plain host has: the gateway turns GRO
  off itself, and counts frames that no longer fit once sealed (``too_big``).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from pyroute2 import IPRoute

from .segment import BRIDGE, MGMT_IFNAME, MGMT_PREFIX, WIRE_IFNAME, Lab, LabError, Proc

GATEWAYS = {"gA": ("A", "02:4c:47:00:00:a1", "10.67.0.21", "10.69.1.1"),
            "gB": ("B", "02:4c:47:00:00:b1", "10.67.0.22", "10.69.2.1")}
P1_MAC = "02:4c:50:00:00:31"
P1_IPV4 = "10.66.0.31"
P1_IPV6 = "fd66::31"
TUNNEL_PORT = 4789
NETKEY_PORT = 7789
KS_WAN = {"A": ("10.68.1.1", "10.68.1.254", "a-ks"), "B": ("10.68.2.1", "10.68.2.254", "b-ks")}
GW_WAN_IFNAME = {"gA": "a-gw", "gB": "b-gw"}


class GatewayLab:
    """Segments A and B, gateways gA (plain port and tunnel) and gB (tunnel), the WAN."""

    def __init__(self, state_dir: str | Path, netkey_rekey_after_s: float = 3600.0, group_crossing: str = "basic",
                 gateway_args: dict[str, list[str]] | None = None, wire_mtu: int | None = None):
        """``gateway_args``: extra ``l2crypt-gateway run`` options per gateway (``{"gA": [...]}``);
        ``wire_mtu``: the segments' switch port MTU (``Lab``)."""
        self.state_dir = Path(state_dir).resolve()
        self.gateway_args = dict(gateway_args or {})
        sa, sb = secrets.token_hex(3)[:5], secrets.token_hex(3)[:5]
        self.seg = {"A": Lab(self.state_dir / "A", hosts=("h1", "h2"), suffix=sa, wire_mtu=wire_mtu),
                    "B": Lab(self.state_dir / "B", hosts=("h3",), suffix=sb, wire_mtu=wire_mtu)}
        self.netkey_rekey_after_s = netkey_rekey_after_s
        self.group_crossing = group_crossing

    # -- names

    @property
    def a(self) -> Lab:
        return self.seg["A"]

    @property
    def b(self) -> Lab:
        return self.seg["B"]

    def lab_of(self, role: str) -> Lab:
        """The segment lab a role lives in (h3 and gB: B; everything else: A)."""
        return self.b if role in ("h3", "gB") else self.a

    def gw_dir(self, gw: str) -> Path:
        return self.lab_of(gw).state_dir / "gateways" / gw

    def switch_port(self, gw: str) -> str:
        """The switch-side port of the gateway's encrypted port (in its segment's ``sw``)."""
        return f"pg{gw[1].lower()}-{self.lab_of(gw).suffix}"

    # -- building

    def up(self, timeout_s: float = 120.0) -> "GatewayLab":
        from keyserverd.ca import CertificateAuthority

        try:
            fps = {}
            for name, lab in self.seg.items():
                lab.ks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fps[name] = CertificateAuthority.open(lab.ks_dir, ()).ca_fingerprint()
            for name, lab in self.seg.items():
                other = "B" if name == "A" else "A"
                lab.keyserver_args = ["--netkey-listen", f"0.0.0.0:{NETKEY_PORT}",
                                      "--netkey-peer", f"{KS_WAN[other][0]}:{NETKEY_PORT}",
                                      "--netkey-peer-ca", fps[other],
                                      "--netkey-rekey-after-s", str(self.netkey_rekey_after_s)]
                lab.up(timeout_s=timeout_s / 2)
            self._build_wan()
            self._build_plain_host()
            for gw in GATEWAYS:
                self._build_gateway(gw)
            for gw in GATEWAYS:
                self.start_gateway(gw)
            for gw in GATEWAYS:
                self.wait_gateway(gw, lambda st: st.get("connected") and st.get("netkey_pw_id"), timeout_s / 2)
            return self
        except BaseException:
            self.down()
            raise

    def _addr_route(self, lab: Lab, role: str, ifname: str, address: str, prefixlen: int,
                    routes: tuple[str, ...] = (), via: str | None = None) -> None:
        lab._addr(role, ifname, address, prefixlen)
        lab._link(role, ifname, state="up")
        with IPRoute(netns=lab.ns(role), flags=0) as ipr:
            for dst in routes:
                ipr.route("add", dst=dst, gateway=via)

    def _build_wan(self) -> None:
        a = self.a
        a._new_ns("wan")
        a._sysctl("wan", {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.disable_ipv6": "1"})
        for name, lab in self.seg.items():
            ks_ip, wan_ip, wan_if = KS_WAN[name]
            a._veth("wan", wan_if, lab.ns("ks"), "wan0")
            self._addr_route(a, "wan", wan_if, wan_ip, 24)
            self._addr_route(lab, "ks", "wan0", ks_ip, 24, ("10.68.0.0/16",), wan_ip)

    def _build_plain_host(self) -> None:
        a = self.a
        a._new_ns("p1")
        a._new_ns("gA")
        a._veth("gA", "plain0", "p1", WIRE_IFNAME, right_mac=P1_MAC)
        # What a wire carries: finished frames, no checksum offload or segmentation on p1's port ...
        a.exec("p1", ["ethtool", "-K", WIRE_IFNAME, "tx", "off", "tso", "off", "gso", "off"], check=True)
        # ... and what a NIC does on receive: GRO on (the gateway turns it off).
        a.exec("gA", ["ethtool", "-K", "plain0", "gro", "on"], check=True)
        a._link("p1", WIRE_IFNAME, state="up")
        a._addr("p1", WIRE_IFNAME, P1_IPV4, 24)
        a._addr("p1", WIRE_IFNAME, P1_IPV6, 64)

    def _build_gateway(self, gw: str) -> None:
        seg, mac, mgmt_ip, wan_ip = GATEWAYS[gw]
        lab = self.seg[seg]
        if gw not in lab.namespaces:
            lab._new_ns(gw)
        tag = gw[1].lower()
        # eth0 on the segment's switch (left DOWN: the gateway guards it and brings it up).
        port = self.switch_port(gw)
        lab._veth("sw", port, gw, WIRE_IFNAME, right_mac=mac)
        mport = f"mg{tag}-{lab.suffix}"
        lab._veth("ks", mport, gw, MGMT_IFNAME)
        for role, ifname, bridge in (("sw", port, BRIDGE), ("ks", mport, "mbr0")):
            with IPRoute(netns=lab.ns(role), flags=0) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0])
                ipr.link("set", index=idx, state="up")
        lab._sysctl(gw, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"})
        lab._addr(gw, MGMT_IFNAME, mgmt_ip, MGMT_PREFIX)
        lab._link(gw, MGMT_IFNAME, state="up")
        wan_if = GW_WAN_IFNAME[gw]
        self.a._veth("wan", wan_if, lab.ns(gw), "wan0")
        self._addr_route(self.a, "wan", wan_if, wan_ip[:-1] + "254", 24)
        self._addr_route(lab, gw, "wan0", wan_ip, 24, ("10.69.0.0/16",), wan_ip[:-1] + "254")
        token = self._gateway_add(lab, gw)
        d = self.gw_dir(gw)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        res = lab.exec(gw, [lab.cmd("l2crypt-gateway"), "enroll", "--server", lab.keyserver_addr, "--id", gw,
                            "--token", "-", "--ca-fingerprint", token["ca_fingerprint"],
                            "--state-dir", d], timeout=30, input=token["token"].encode() + b"\n")
        if res.returncode != 0:
            raise LabError(f"enrollment of {gw} failed: {res.stdout}{res.stderr}")

    @staticmethod
    def _gateway_add(lab: Lab, gw: str) -> dict:
        res = lab.keyserverd("host", "add", gw, "--role", "gateway", "--json")
        if res.returncode != 0:
            raise LabError(f"keyserverd host add {gw} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    # -- gateways

    def tunnel_argv(self, gw: str) -> list[str]:
        """The tunnel options of ``gw``'s ``l2crypt-gateway run``: one peer over the WAN."""
        other = "gB" if gw == "gA" else "gA"
        return ["--tunnel-listen", f"{GATEWAYS[gw][3]}:{TUNNEL_PORT}",
                "--tunnel-peer", f"{other}={GATEWAYS[other][3]}:{TUNNEL_PORT}"]

    def start_gateway(self, gw: str) -> Proc:
        lab = self.lab_of(gw)
        argv = [lab.cmd("l2crypt-gateway"), "run", "--encrypted-port", WIRE_IFNAME,
                "--server", lab.keyserver_addr, "--state-dir", self.gw_dir(gw),
                *self.tunnel_argv(gw), "--group-crossing", self.group_crossing]
        if gw == "gA":
            argv += ["--plain-port", "plain0"]
        argv += self.gateway_args.get(gw, [])
        return lab.popen(gw, argv, name=f"gateway-{gw}")

    def stop_gateway(self, gw: str, sig: int = 9) -> None:
        lab = self.lab_of(gw)
        proc = lab.proc(f"gateway-{gw}")
        if proc is not None:
            lab.stop(proc, sig)

    def gateway_status(self, gw: str, timeout: float = 10.0) -> dict:
        lab = self.lab_of(gw)
        res = lab.exec(gw, [lab.cmd("l2crypt-gateway"), "status", "--state-dir", self.gw_dir(gw), "--json"],
                       timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"l2crypt-gateway status on {gw} failed: {res.stdout}{res.stderr}")
        return json.loads(res.stdout)

    def wait_gateway(self, gw: str, pred, timeout_s: float = 30.0) -> dict:
        lab = self.lab_of(gw)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            proc = lab.proc(f"gateway-{gw}")
            if proc is None or not proc.alive():
                raise LabError(f"gateway {gw} is not running:\n{lab.log_text(f'gateway-{gw}')[-3000:]}")
            try:
                st = self.gateway_status(gw, timeout=5)
                if pred(st):
                    return st
                last = json.dumps(st)[:800]
            except (LabError, ValueError) as exc:
                last = str(exc)[-500:]
            time.sleep(0.3)
        raise LabError(f"gateway {gw}: condition not met within {timeout_s} s; last status: {last}\n"
                       f"{lab.log_text(f'gateway-{gw}')[-3000:]}\n{lab.log_text('keyserverd')[-2000:]}")

    def down(self) -> None:
        for lab in self.seg.values():
            lab.down()

    def __enter__(self) -> "GatewayLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
