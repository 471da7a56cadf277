"""Keep the wire port deaf and silent except for l2crypt frames.

A plain Linux interface talks on its own as soon as it is up (IPv6
link-local addresses, DAD, MLD, router solicitations, ARP), and it hands
whatever arrives to the host's IP stack, which with the weak host model
delivers a datagram for the TAP's address that came in on the wire port.
On the wire port both would be plaintext.  ``guard_port``, before the port
comes up:

1. replaces the port's nftables table ``netdev l2crypt_<port>`` in one
   transaction (the old chains drop until the new ones take over, so a
   restart opens no window):
   * ``ingress`` (policy drop): frames of the l2crypt EtherType pass, to the
     agent's packet socket; every other frame is dropped and counted
     (``inbound_refused``) before the IP, ARP or IPv6 stack and before any
     packet socket bound to another EtherType sees it;
   * ``egress`` (policy drop): only the l2crypt EtherType leaves; the rest is
     dropped and counted (``egress_blocked``);
2. turns the host stack off the port as far as Linux allows, as a second
   layer (``quiet_stack``, the sysctls below);
3. only then sets the port up.

The table stays when the agent stops or dies, so the port fails closed both
ways.  ``read_guard`` reads the counters and checks that the chains and rules
are still those of step 1; ``unguard_port`` (``l2crypt unguard``) removes the
table, for operators only.

What the ingress hook cannot stop: the kernel hands every frame to packet
sockets bound to ETH_P_ALL (tcpdump, some LLDP or DHCP clients) *before* the
ingress hook runs.  Such a socket needs CAP_NET_RAW; a process holding that
can read the wire anyway.

The second layer, per port (``/proc/sys/net/ipv4/conf/<port>/`` and
``ipv6/conf/<port>/``; a file this kernel lacks is skipped).  Linux has no
switch that turns IPv4 off on one interface, so:

* no IPv4 address (flushed), ARP off (IFF_NOARP: ``arp_rcv`` drops every ARP
  frame), ``arp_ignore = 8`` and ``arp_announce = 2`` should ARP come back on,
  ``arp_accept = 0``, ``drop_gratuitous_arp = 1``, ``proxy_arp = 0``;
* ``rp_filter = 1``: a packet is accepted only if the route back to its
  source leaves through this port, and the port has no routes, so every IPv4
  packet fails (the kernel uses the larger of ``all`` and the port's value:
  ``all.rp_filter = 2`` makes it loose);
* ``accept_local = 0``, ``route_localnet = 0``, ``forwarding = 0`` and
  ``bc_forwarding = 0`` (nothing that arrives here is routed on),
  ``drop_unicast_in_l2_multicast = 1``, no redirects or source routes in or
  out, ``bootp_relay = 0``;
* IPv6: ``disable_ipv6 = 1`` (``ipv6_rcv`` drops everything), address
  generation mode none (no link-local address even if IPv6 comes back),
  ``accept_ra = 0``, ``autoconf = 0``.

``icmp_echo_ignore_broadcasts`` exists only host-wide; it is left alone.

Port settings go through netlink (pyroute2), rules and counters through nft's
JSON (``l2crypt.io.nft_json``).  pyroute2's synchronous ``IPRoute`` runs its own
event loop: call ``guard_port`` from a thread (``asyncio.to_thread``) when an
event loop is running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from l2crypt.core.errors import LocalError

from . import nft_json

FAMILY = "netdev"
TABLE_PREFIX = "l2crypt_"
INBOUND_COUNTER = "inbound_refused"
EGRESS_COUNTER = "egress_blocked"
IFF_NOARP = 0x80             # linux/if.h
IN6_ADDR_GEN_MODE_NONE = 1   # linux/if_link.h

IPV4_SYSCTLS = {
    "rp_filter": "1", "accept_local": "0", "route_localnet": "0", "forwarding": "0", "bc_forwarding": "0",
    "arp_ignore": "8", "arp_announce": "2", "arp_accept": "0", "arp_notify": "0", "drop_gratuitous_arp": "1",
    "proxy_arp": "0", "drop_unicast_in_l2_multicast": "1", "accept_redirects": "0", "secure_redirects": "0",
    "send_redirects": "0", "accept_source_route": "0", "bootp_relay": "0",
}
IPV6_SYSCTLS = {"disable_ipv6": "1", "accept_ra": "0", "autoconf": "0", "accept_redirects": "0"}
SYSCTL_ROOT = Path("/proc/sys/net")


def table_name(port: str) -> str:
    """The nftables table of ``port``'s guard: ``l2crypt_<port>``."""
    return TABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", port)


# --- the rule set ------------------------------------------------------------------


@dataclass(frozen=True)
class PortGuard:
    """The guard of one port.

    ``pass_ethertype`` is the one EtherType the ingress chain lets through (None:
    none, every frame is dropped before the host stack); ``egress`` adds the
    egress chain, which lets only ``pass_ethertype`` leave.
    """

    port: str
    pass_ethertype: int | None
    egress: bool = True

    @property
    def table(self) -> str:
        return table_name(self.port)

    def chains(self) -> dict[str, list[list[dict]]]:
        """Chain name (= its hook) -> the expressions of its rules, in order."""
        passing = [] if self.pass_ethertype is None else [[
            {"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}},
                       "right": self.pass_ethertype}},
            {"accept": None}]]
        out = {"ingress": passing + [[{"counter": INBOUND_COUNTER}, {"drop": None}]]}
        if self.egress:
            out["egress"] = passing + [[{"counter": EGRESS_COUNTER}, {"drop": None}]]
        return out

    def counter_names(self) -> list[str]:
        return [INBOUND_COUNTER] + ([EGRESS_COUNTER] if self.egress else [])

    def ruleset(self) -> list[dict]:
        """The nft JSON commands that (re)build the table; ``nft_json.apply`` runs them
        as one transaction (add + delete makes "delete if it exists")."""
        table = {"family": FAMILY, "name": self.table}
        own = {"family": FAMILY, "table": self.table}
        cmds: list[dict] = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
        cmds += [{"add": {"counter": {**own, "name": name}}} for name in self.counter_names()]
        for chain, rules in self.chains().items():
            cmds.append({"add": {"chain": {**own, "name": chain, "type": "filter", "hook": chain,
                                           "dev": self.port, "prio": 0, "policy": "drop"}}})
            cmds += [{"add": {"rule": {**own, "chain": chain, "expr": expr}}} for expr in rules]
        return cmds

    # --- reading it back -----------------------------------------------------------

    def reading(self, listing: list[dict] | None) -> dict:
        """What a status shows of this guard, from ``nft -j list table`` output:
        ``port_guard`` ("intact", "altered" or "missing") and the counters
        (``inbound_refused``, and ``egress_blocked`` when there is an egress
        chain; None when missing).  "altered": a chain, its hook or policy, or a
        rule differs from what ``ruleset`` made."""
        if listing is None:
            return {"port_guard": "missing", **dict.fromkeys(self.counter_names())}
        counters = {c.get("name"): c.get("packets") for c in nft_json.objects(listing, "counter")
                    if c.get("table") == self.table}
        values = {name: counters[name] if isinstance(counters.get(name), int) else None
                  for name in self.counter_names()}
        chains = {c.get("name"): (c.get("hook"), c.get("policy")) for c in nft_json.objects(listing, "chain")
                  if c.get("table") == self.table}
        rules: dict[str, list] = {}
        for rule in nft_json.objects(listing, "rule"):
            if rule.get("table") == self.table:
                rules.setdefault(rule.get("chain"), []).append(rule.get("expr"))
        want = self.chains()
        intact = (chains == {name: (name, "drop") for name in want}
                  and all(rules.get(name, []) == exprs for name, exprs in want.items())
                  and None not in values.values())
        return {"port_guard": "intact" if intact else "altered", **values}

    def read(self) -> dict:
        """``reading`` of the table as the kernel has it now (runs ``nft -j list``)."""
        return self.reading(nft_json.list_table(FAMILY, self.table))

    def install(self) -> None:
        """(Re)build the table in one transaction.  Raises LocalError."""
        nft_json.apply(self.ruleset(), f"cannot install the port guard on {self.port}")


# --- the host stack --------------------------------------------------------------------


def _write_sysctls(port: str) -> None:
    for proto, values in (("ipv6", IPV6_SYSCTLS), ("ipv4", IPV4_SYSCTLS)):
        base = SYSCTL_ROOT / proto / "conf" / port
        for key, value in values.items():
            path = base / key
            if not path.exists():
                continue
            try:
                path.write_text(value + "\n")
            except OSError as exc:
                raise LocalError(f"cannot set {proto}.conf.{port}.{key} = {value}: {exc.strerror or exc}") from None


def quiet_stack(port: str) -> None:
    """Turn the host's IP stack off ``port`` (see the module docstring); the port
    keeps its up/down state.  Raises LocalError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    _write_sysctls(port)
    try:
        with IPRoute() as ipr:
            index = _index(ipr, port)
            ipr.link("set", index=index, flags=IFF_NOARP, change=IFF_NOARP)
            if (SYSCTL_ROOT / "ipv6" / "conf" / port).exists():
                ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
                    ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]})
            ipr.flush_addr(index=index)
    except NetlinkError as exc:
        raise LocalError(f"cannot quiet {port}: {exc.args[-1] if exc.args else exc}") from None


def set_up(port: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            ipr.link("set", index=_index(ipr, port), state="up")
    except NetlinkError as exc:
        raise LocalError(f"cannot bring {port} up: {exc.args[-1] if exc.args else exc}") from None


def _index(ipr, port: str) -> int:
    found = ipr.link_lookup(ifname=port)
    if not found:
        raise LocalError(f"port {port!r} does not exist")
    return found[0]


def port_exists(port: str) -> bool:
    return Path(f"/sys/class/net/{port}").exists()


# --- what the daemons call ---------------------------------------------------------------


def take_over(guard: PortGuard, role: str) -> PortGuard:
    """Install ``guard``, turn the host stack off its port, then bring the port up
    (in this order: the filter is in place before anything else changes).
    ``role`` names the port in errors ("wire port").  Raises LocalError."""
    if not port_exists(guard.port):
        raise LocalError(f"{role} {guard.port!r} does not exist")
    guard.install()
    quiet_stack(guard.port)
    set_up(guard.port)
    return guard


def guard_port(port: str, ethertype: int) -> PortGuard:
    """Filter the wire ``port`` both ways (only ``ethertype`` passes), turn the host
    stack off it, then bring it up.  Raises LocalError."""
    return take_over(PortGuard(port, ethertype, egress=True), "wire port")


def unguard_port(port: str) -> None:
    """Remove the port's guard table (the port then passes everything again; its
    sysctls stay as ``quiet_stack`` left them).  Raises LocalError if there is none."""
    table = {"family": FAMILY, "name": table_name(port)}
    if nft_json.list_table(FAMILY, table["name"]) is None:
        raise LocalError(f"no port guard on {port} (no nftables table {FAMILY} {table['name']})")
    nft_json.apply([{"delete": {"table": table}}], f"cannot remove the guard on {port}")
