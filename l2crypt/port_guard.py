"""Keep the wire port silent except for l2crypt frames.

A plain Linux interface talks on its own as soon as it is up: IPv6 link-local
addresses, DAD, MLD reports, router solicitations, ARP.  On the wire port all of
that would leave in clear.  ``guard_port``:

1. disables IPv6 on the port and sets addrgenmode none (no link-local address);
2. turns ARP off and flushes any address;
3. installs an nftables netdev egress chain: frames with the l2crypt
   EtherType pass, everything else is dropped and counted;
4. only then sets the port up.

The filter stays after the agent stops, so the port fails closed.
``unguard_port`` removes it (``l2crypt unguard``), for operators only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .errors import LocalError


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise LocalError(f"{what}: {proc.stderr.strip() or proc.stdout.strip()}")


def _table(port: str) -> str:
    return "l2crypt_" + re.sub(r"[^A-Za-z0-9_]", "_", port)


def guard_port(port: str, ethertype: int) -> None:
    """Silence ``port`` except for l2crypt frames, then bring it up.  Raises LocalError."""
    if not Path(f"/sys/class/net/{port}").exists():
        raise LocalError(f"wire port {port!r} does not exist")
    ipv6 = Path(f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6")
    if ipv6.exists():
        ipv6.write_text("1\n")
    _run(["ip", "link", "set", "dev", port, "addrgenmode", "none", "arp", "off"], f"cannot quiet {port}")
    _run(["ip", "addr", "flush", "dev", port], f"cannot flush addresses of {port}")
    table = _table(port)
    ruleset = f"""
table netdev {table}
delete table netdev {table}
table netdev {table} {{
    chain egress {{
        type filter hook egress device "{port}" priority 0; policy drop;
        ether type 0x{ethertype:04x} accept
        counter name leaked drop
    }}
    counter leaked {{ }}
}}
"""
    _run_input(["nft", "-f", "-"], ruleset, f"cannot install the egress filter on {port}")
    _run(["ip", "link", "set", "dev", port, "up"], f"cannot bring {port} up")


def _run_input(argv: list[str], text: str, what: str) -> None:
    try:
        proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise LocalError(f"{what}: {proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else 'nft failed'}")


def egress_drops(port: str) -> int | None:
    """Frames the guard has dropped on ``port``, or None if unknown."""
    try:
        proc = subprocess.run(
            ["nft", "list", "counter", "netdev", _table(port), "leaked"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"packets (\d+)", proc.stdout)
    return int(match.group(1)) if match else None


def unguard_port(port: str) -> None:
    """Remove the egress filter (the port then talks in clear again)."""
    _run(["nft", "delete", "table", "netdev", _table(port)], f"cannot remove the guard on {port}")
