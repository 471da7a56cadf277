"""nftables through its JSON interface (``nft -j``), never by parsing nft's text.

* ``apply(commands, what)`` runs a list of JSON commands (``{"add": {...}}``,
  ``{"delete": {...}}``, ...) as one transaction with ``nft -j -f -``: the
  kernel takes all of them at once, or none.
* ``list_table(family, name)`` returns the objects of a table (the table,
  its counters with their values, chains, rules) as parsed JSON, or None
  when the table does not exist.
* ``objects(listing, kind)`` picks the objects of one kind out of a listing.

The ``nft`` command rather than libnftables' Python binding: Debian ships the
binding as a system package (python3-nftables), which a virtualenv does not
see, and the command speaks the same JSON.
"""

from __future__ import annotations

import json
import subprocess

from l2crypt.core.errors import LocalError

NFT = "nft"
NFT_TIMEOUT_S = 10.0


def _run(argv: list[str], data: str | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=data, capture_output=True, text=True, timeout=NFT_TIMEOUT_S)
    except FileNotFoundError:
        raise LocalError(f"{argv[0]} is not installed (the nftables package)") from None
    except subprocess.TimeoutExpired:
        raise LocalError(f"{argv[0]} did not finish within {NFT_TIMEOUT_S:g} s") from None


def _first_line(res: subprocess.CompletedProcess) -> str:
    for line in (res.stderr + "\n" + res.stdout).splitlines():
        if line.strip():
            return line.strip()
    return f"nft exited with {res.returncode}"


def apply(commands: list[dict], what: str) -> None:
    """Run ``commands`` as one nft transaction; LocalError("what: nft's reason") if refused."""
    res = _run([NFT, "-j", "-f", "-"], json.dumps({"nftables": commands}))
    if res.returncode != 0:
        raise LocalError(f"{what}: {_first_line(res)}")


def list_table(family: str, name: str) -> list[dict] | None:
    """The objects of table ``family name`` (``nft -j list table``), or None when it
    does not exist or cannot be read."""
    try:
        res = _run([NFT, "-j", "list", "table", family, name], None)
    except LocalError:
        return None
    if res.returncode != 0:
        return None
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        return None
    listing = doc.get("nftables") if isinstance(doc, dict) else None
    return listing if isinstance(listing, list) else None


def objects(listing: list[dict], kind: str) -> list[dict]:
    """The objects of ``kind`` ("counter", "chain", "rule", ...) in ``listing``, in its order."""
    return [item[kind] for item in listing
            if isinstance(item, dict) and isinstance(item.get(kind), dict)]
