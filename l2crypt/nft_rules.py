"""The netfilter rules of one layer-3 agent instance.

1. The running agent's rules (``install``) send the policy's traffic to its
   NFQUEUE: on output every packet to a policy prefix, on prerouting every
   sealed packet (IP protocol 253, or the nat UDP port); clear packets *from*
   a policy prefix are dropped.  They run at the raw priority (-300), before
   conntrack, so conntrack and routing see the rewritten packet.
2. The queue has no ``bypass`` flag: while no process listens on it (the agent
   crashed, or has not started yet), the kernel drops what it would queue.
3. On a clean stop (``close``), with ``fail_closed = true`` (the default) the
   rules are replaced by ones that drop the policy's traffic and sealed
   packets; with ``fail_closed = false`` they are removed (``remove``) and the
   policy's traffic goes out in clear.
4. Every apply replaces the instance's whole rule set in one transaction, so
   the stale rules of a crashed run are replaced at start.

Two backends write the same rules:
* ``nft``: one nftables table per instance (needs the kernel's nft_queue);
* ``iptables``: two chains per instance in the ``raw`` table, jumped to from
  OUTPUT and PREROUTING, loaded with ``iptables-restore --noflush`` (uses the
  xt NFQUEUE target, which kernels without nft_queue still have).
``choose_backend("auto")`` takes nft if the kernel accepts its queue rule,
else iptables.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess

from .errors import LocalError
from .l3_wire import L3_IP_PROTOCOL

NFT = "nft"
IPTABLES = "iptables"
IPTABLES_RESTORE = "iptables-restore"
PRIORITY = -300
BACKENDS = ("auto", "nft", "iptables")
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,23}$")


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise ValueError(f"not a rule-set name (a letter, then up to 23 letters, digits, _): {name!r}")
    return name


def _prefixes(prefixes) -> list[str]:
    return [str(ipaddress.IPv4Network(p, strict=False)) for p in prefixes]


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


def nft_ruleset(table: str, prefixes, queue_num: int | None, mode: str, udp_port: int) -> str:
    """The instance's nft table; ``queue_num`` None gives the closed (drop) table."""
    sealed = f"ip protocol {L3_IP_PROTOCOL}" if mode == "routed" else f"udp dport {udp_port}"
    verdict = f"queue num {queue_num}" if queue_num is not None else "drop"
    lines = [
        f"table ip {table} {{}}",
        f"delete table ip {table}",
        f"table ip {table} {{",
        "  set protected {",
        "    type ipv4_addr; flags interval;",
        f"    elements = {{ {', '.join(_prefixes(prefixes))} }}",
        "  }",
        f"  chain out {{ type filter hook output priority {PRIORITY}; policy accept;",
        f"    ip daddr @protected {verdict}",
        "  }",
        f"  chain in {{ type filter hook prerouting priority {PRIORITY}; policy accept;",
        f"    {sealed} {verdict}",
        "    ip saddr @protected drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class NftBackend:
    name = "nft"

    def __init__(self, table: str):
        self.table = table

    def apply(self, prefixes, queue_num: int | None, mode: str, udp_port: int) -> None:
        res = _run([NFT, "-f", "-"], nft_ruleset(self.table, prefixes, queue_num, mode, udp_port))
        if res.returncode != 0:
            raise LocalError(f"nft refused the rules: {_first_line(res)}")

    def remove(self) -> None:
        _run([NFT, "-f", "-"], f"table ip {self.table} {{}}\ndelete table ip {self.table}\n")

    def listing(self) -> str:
        res = _run([NFT, "list", "table", "ip", self.table])
        return res.stdout.decode(errors="replace") if res.returncode == 0 else ""


# --- iptables ---------------------------------------------------------------------


def iptables_restore_input(table: str, prefixes, queue_num: int | None, mode: str, udp_port: int) -> str:
    """``iptables-restore --noflush`` input: declaring the chains flushes them."""
    out_chain, in_chain = f"{table}_out", f"{table}_in"
    verdict = f"NFQUEUE --queue-num {queue_num}" if queue_num is not None else "DROP"
    sealed = f"-p {L3_IP_PROTOCOL}" if mode == "routed" else f"-p udp --dport {udp_port}"
    lines = ["*raw", f":{out_chain} - [0:0]", f":{in_chain} - [0:0]"]
    lines += [f"-A {out_chain} -d {p} -j {verdict}" for p in _prefixes(prefixes)]
    lines.append(f"-A {in_chain} {sealed} -j {verdict}")
    lines += [f"-A {in_chain} -s {p} -j DROP" for p in _prefixes(prefixes)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class IptablesBackend:
    name = "iptables"
    HOOKS = (("OUTPUT", "_out"), ("PREROUTING", "_in"))

    def __init__(self, table: str):
        self.table = table

    def apply(self, prefixes, queue_num: int | None, mode: str, udp_port: int) -> None:
        res = _run([IPTABLES_RESTORE, "--noflush"],
                   iptables_restore_input(self.table, prefixes, queue_num, mode, udp_port))
        if res.returncode != 0:
            raise LocalError(f"iptables-restore refused the rules: {_first_line(res)}")
        for hook, suffix in self.HOOKS:
            jump = ["-t", "raw", hook, "-j", self.table + suffix]
            if _run([IPTABLES, "-w", "5", "-C", *jump[:3], *jump[3:]]).returncode != 0:
                res = _run([IPTABLES, "-w", "5", "-t", "raw", "-I", hook, "1", "-j", self.table + suffix])
                if res.returncode != 0:
                    raise LocalError(f"iptables refused the jump to {self.table + suffix}: {_first_line(res)}")

    def remove(self) -> None:
        for hook, suffix in self.HOOKS:
            for _ in range(16):  # every copy of the jump, bounded
                if _run([IPTABLES, "-w", "5", "-t", "raw", "-D", hook, "-j", self.table + suffix]).returncode != 0:
                    break
            _run([IPTABLES, "-w", "5", "-t", "raw", "-F", self.table + suffix])
            _run([IPTABLES, "-w", "5", "-t", "raw", "-X", self.table + suffix])

    def listing(self) -> str:
        res = _run([IPTABLES, "-w", "5", "-t", "raw", "-S"])
        text = res.stdout.decode(errors="replace") if res.returncode == 0 else ""
        return "\n".join(ln for ln in text.splitlines() if self.table in ln)


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
