"""The netfilter rules of one layer-3 agent instance, IPv4 and IPv6.

1. The running agent's rules (``apply`` with a queue number) send the
   policy's traffic to its NFQUEUE: on output every packet to a policy
   prefix, on prerouting every sealed packet (IP protocol / next header 253,
   or the nat UDP port).  They run at the raw priority (-300), before
   conntrack, so conntrack and routing see the rewritten packet.
2. Inbound, only sealed packets may come from a peer: a plain packet whose
   source is in a policy prefix is dropped by the kernel and counted
   (``refused_inbound``: "packets refused inbound" in ``l3-status`` and the
   metrics).  The engine then lets in only what verifies as sent by an
   enrolled peer from an address bound to it.
3. In nat mode, packets from our own UDP port skip the queue on output: they
   are the agent's own keepalives, already sealed (the agent holds that port,
   so no other process can send from it).  IPv6 neighbour discovery (ICMPv6
   133-137 with hop limit 255, so from the link itself) skips both the queue
   and the inbound rule: peers on one link must resolve each other's
   addresses, as ARP does for IPv4, and what they then exchange is sealed.
4. The queue has no ``bypass`` flag: while no process listens on it (the agent
   crashed, or has not started yet), the kernel drops what it would queue.
5. On a clean stop, with ``fail_closed = true`` (the default) the rules are
   replaced by ones that drop the policy's traffic and sealed packets (``apply``
   with ``queue_num`` None; the inbound rule stays); with ``fail_closed =
   false`` they are removed (``remove``) and the policy's traffic goes in clear.
6. Every apply replaces the instance's whole rule set (one transaction per
   IP version), so the stale rules of a crashed run are replaced at start.

Two backends write the same rules:
* ``nft``: one ``inet`` table per instance, written and read as nft JSON
  (``nft -j``; needs the kernel's nft_queue);
* ``iptables``: two chains per instance and IP version in the ``raw`` table,
  jumped to from OUTPUT and PREROUTING, loaded with ``iptables-restore
  --noflush`` / ``ip6tables-restore --noflush`` (the xt NFQUEUE target, which
  kernels without nft_queue still have).  Counters are read from
  ``iptables-save -c``: each line is ``[packets:bytes]`` and the rule in the
  restore syntax, split like a shell would, so the rule is found by its chain
  and its comment, not by column positions.
``choose_backend("auto")`` takes nft if the kernel accepts its queue rule,
else iptables.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess

from l2crypt.core.errors import LocalError
from l2crypt.core.l3_wire import L3_IP_PROTOCOL

NFT = "nft"
PRIORITY = -300
BACKENDS = ("auto", "nft", "iptables")
#: Name of the inbound drop counter (nft counter object; iptables rule comment).
REFUSED = "refused_inbound"
REFUSED_COMMENT = "l2crypt: refused inbound"
#: Per IP version: (restore command, rule command, save command) of the iptables backend.
IPT = {4: ("iptables-restore", "iptables", "iptables-save"), 6: ("ip6tables-restore", "ip6tables", "ip6tables-save")}
#: Per IP version: (nft set type, nft payload protocol).
NFT_ADDR = {4: ("ipv4_addr", "ip"), 6: ("ipv6_addr", "ip6")}
#: ICMPv6 neighbour discovery: router/neighbour solicitation/advertisement, redirect (RFC 4861).
ND_TYPES = (133, 134, 135, 136, 137)
ND_HOP_LIMIT = 255
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,23}$")


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise ValueError(f"not a rule-set name (a letter, then up to 23 letters, digits, _): {name!r}")
    return name


def prefixes_by_version(prefixes) -> dict[int, list]:
    """The policy's prefixes as ``ipaddress`` networks, by IP version (4, 6)."""
    out: dict[int, list] = {4: [], 6: []}
    for p in prefixes:
        net = ipaddress.ip_network(p, strict=False)
        out[net.version].append(net)
    return out


def _run(argv: list[str], data: str | None = None, timeout_s: float = 10.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=data.encode() if data is not None else None,
                              capture_output=True, timeout=timeout_s)
    except FileNotFoundError:
        raise LocalError(f"{argv[0]} is not installed (scripts/setup installs it)") from None
    except subprocess.TimeoutExpired:
        raise LocalError(f"{argv[0]} did not finish within {timeout_s} s") from None


def _first_line(res: subprocess.CompletedProcess) -> str:
    text = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
    return text[0] if text else f"exit {res.returncode}"


# --- nft ------------------------------------------------------------------------


def _match(left: dict, right) -> dict:
    return {"match": {"op": "==", "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def nft_ruleset(table: str, prefixes, queue_num: int | None, mode: str, udp_port: int) -> dict:
    """The instance's nft table as an nft JSON document (``nft -j -f -``);
    ``queue_num`` None gives the closed (drop) table."""
    obj = {"family": "inet", "table": table}
    verdict = {"queue": {"num": queue_num}} if queue_num is not None else {"drop": None}
    cmds: list[dict] = [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},  # the add makes this never fail
        {"add": {"table": {"family": "inet", "name": table}}},
        {"add": {"counter": {**obj, "name": REFUSED}}},
    ]
    for chain, hook in (("out", "output"), ("in", "prerouting")):
        cmds.append({"add": {"chain": {**obj, "name": chain, "type": "filter", "hook": hook,
                                       "prio": PRIORITY, "policy": "accept"}}})

    def rule(chain: str, *expr: dict) -> None:
        cmds.append({"add": {"rule": {**obj, "chain": chain, "expr": list(expr)}}})

    if mode == "nat" and queue_num is not None:
        rule("out", _match(_payload("udp", "sport"), udp_port), {"accept": None})
    nd = (_match(_payload("icmpv6", "type"), {"set": list(ND_TYPES)}),
          _match(_payload("ip6", "hoplimit"), ND_HOP_LIMIT), {"accept": None})
    rule("out", *nd)
    rule("in", *nd)
    if mode == "routed":
        rule("in", _match({"meta": {"key": "l4proto"}}, L3_IP_PROTOCOL), verdict)
    else:
        rule("in", _match(_payload("udp", "dport"), udp_port), verdict)
    for version, nets in prefixes_by_version(prefixes).items():
        if not nets:
            continue
        addr_type, proto = NFT_ADDR[version]
        name = f"protected{version}"
        elems = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets]
        cmds.append({"add": {"set": {**obj, "name": name, "type": addr_type, "flags": ["interval"],
                                     "elem": elems}}})
        rule("out", _match(_payload(proto, "daddr"), f"@{name}"), verdict)
        rule("in", _match(_payload(proto, "saddr"), f"@{name}"), {"counter": REFUSED}, {"drop": None})
    return {"nftables": cmds}


def nft_counter_packets(doc, name: str = REFUSED) -> int | None:
    """Packets of the named counter in ``nft -j list ...`` output (text or
    parsed); None if it holds no such counter."""
    if isinstance(doc, (str, bytes)):
        try:
            doc = json.loads(doc)
        except ValueError:
            return None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") == name and isinstance(counter.get("packets"), int):
            return counter["packets"]
    return None


class NftBackend:
    """The layer-3 rules as one nftables table, written and read as ``nft -j`` JSON."""
    name = "nft"

    def __init__(self, table: str):
        self.table = table

    def apply(self, prefixes, queue_num: int | None, mode: str, udp_port: int) -> None:
        doc = nft_ruleset(self.table, prefixes, queue_num, mode, udp_port)
        res = _run([NFT, "-j", "-f", "-"], json.dumps(doc))
        if res.returncode != 0:
            raise LocalError(f"nft refused the rules: {_first_line(res)}")

    def remove(self) -> None:
        doc = {"nftables": [{"add": {"table": {"family": "inet", "name": self.table}}},
                            {"delete": {"table": {"family": "inet", "name": self.table}}}]}
        _run([NFT, "-j", "-f", "-"], json.dumps(doc))

    def refused_inbound(self) -> int | None:
        """Packets the inbound rule dropped so far (None if unreadable)."""
        res = _run([NFT, "-j", "list", "counter", "inet", self.table, REFUSED])
        return nft_counter_packets(res.stdout.decode(errors="replace")) if res.returncode == 0 else None


# --- iptables ---------------------------------------------------------------------


def iptables_restore_input(table: str, prefixes, queue_num: int | None, mode: str, udp_port: int,
                           version: int = 4) -> str:
    """``iptables-restore --noflush`` (``ip6tables-restore`` for version 6)
    input: declaring the chains flushes them."""
    out_chain, in_chain = f"{table}_out", f"{table}_in"
    verdict = f"NFQUEUE --queue-num {queue_num}" if queue_num is not None else "DROP"
    sealed = f"-p {L3_IP_PROTOCOL}" if mode == "routed" else f"-p udp -m udp --dport {udp_port}"
    nets = prefixes_by_version(prefixes)[version]
    lines = ["*raw", f":{out_chain} - [0:0]", f":{in_chain} - [0:0]"]
    if mode == "nat" and queue_num is not None:
        lines.append(f"-A {out_chain} -p udp -m udp --sport {udp_port} -j RETURN")
    if version == 6:
        lines += [f"-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq {ND_HOP_LIMIT} -j RETURN"
                  for chain in (out_chain, in_chain) for t in ND_TYPES]
    lines += [f"-A {out_chain} -d {n} -j {verdict}" for n in nets]
    lines.append(f"-A {in_chain} {sealed} -j {verdict}")
    lines += [f'-A {in_chain} -s {n} -m comment --comment "{REFUSED_COMMENT}" -j DROP' for n in nets]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_save_packets(text: str, chain: str, comment: str = REFUSED_COMMENT) -> int:
    """Packets of the rules of ``chain`` carrying ``comment``, summed, in
    ``iptables-save -c`` output (lines ``[packets:bytes] -A CHAIN ...``)."""
    total = 0
    for line in text.splitlines():
        counts, sep, rule = line.partition("]")
        if not sep or not counts.startswith("["):
            continue
        packets = counts[1:].partition(":")[0]
        try:
            args = shlex.split(rule)
        except ValueError:
            continue
        if args[:2] != ["-A", chain] or not packets.isdigit():
            continue
        if any(a == "--comment" and b == comment for a, b in zip(args, args[1:])):
            total += int(packets)
    return total


class IptablesBackend:
    """The layer-3 rules as iptables/ip6tables chains (where nft is missing); counters from
    ``iptables-save -c``."""
    name = "iptables"
    HOOKS = (("OUTPUT", "_out"), ("PREROUTING", "_in"))

    def __init__(self, table: str):
        self.table = table
        self.versions: tuple[int, ...] = (4,)

    def apply(self, prefixes, queue_num: int | None, mode: str, udp_port: int) -> None:
        nets = prefixes_by_version(prefixes)
        # IPv4 always (its chains may be empty); IPv6 only with IPv6 prefixes,
        # so a host without ip6tables support runs an IPv4 policy.
        self.versions = tuple(v for v in (4, 6) if v == 4 or nets[v])
        for version in self.versions:
            restore, ipt, _ = IPT[version]
            res = _run([restore, "--noflush"],
                       iptables_restore_input(self.table, prefixes, queue_num, mode, udp_port, version))
            if res.returncode != 0:
                raise LocalError(f"{restore} refused the rules: {_first_line(res)}")
            for hook, suffix in self.HOOKS:
                jump = ["-t", "raw", hook, "-j", self.table + suffix]
                if _run([ipt, "-w", "5", "-C", *jump[:3], *jump[3:]]).returncode != 0:
                    res = _run([ipt, "-w", "5", "-t", "raw", "-I", hook, "1", "-j", self.table + suffix])
                    if res.returncode != 0:
                        raise LocalError(f"{ipt} refused the jump to {self.table + suffix}: {_first_line(res)}")

    def remove(self) -> None:
        for version in (4, 6):
            try:
                self._remove(IPT[version][1])
            except LocalError:
                if version == 4:
                    raise  # no ip6tables on this host: it never had IPv6 rules of ours

    def _remove(self, ipt: str) -> None:
        for hook, suffix in self.HOOKS:
            for _ in range(16):  # every copy of the jump, bounded
                if _run([ipt, "-w", "5", "-t", "raw", "-D", hook, "-j", self.table + suffix]).returncode != 0:
                    break
            _run([ipt, "-w", "5", "-t", "raw", "-F", self.table + suffix])
            _run([ipt, "-w", "5", "-t", "raw", "-X", self.table + suffix])

    def refused_inbound(self) -> int | None:
        """Packets the inbound rules dropped so far, both versions (None if unreadable)."""
        total = 0
        for version in self.versions:
            res = _run([IPT[version][2], "-c", "-t", "raw"])
            if res.returncode != 0:
                return None
            total += iptables_save_packets(res.stdout.decode(errors="replace"), self.table + "_in")
        return total


def choose_backend(name: str, table: str, prefixes, queue_num: int, mode: str, udp_port: int):
    """Install the running rules with backend ``name`` (``auto``: nft, else iptables)
    and return the backend that holds them.  LocalError if none could."""
    if name in ("auto", "nft"):
        nft = NftBackend(table)
        try:
            nft.apply(prefixes, queue_num, mode, udp_port)
            return nft
        except LocalError:
            if name == "nft":
                raise
            nft.remove()  # nothing half-made of ours stays behind
    ipt = IptablesBackend(table)
    ipt.apply(prefixes, queue_num, mode, udp_port)
    return ipt
