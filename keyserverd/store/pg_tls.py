"""How the PostgreSQL store's connection must be protected.

libpq's default, ``sslmode=prefer``, takes TLS when the server offers it and
verifies nothing, so anyone on the path can read the traffic (hosts, tokens'
hashes, sealed keys) or pose as the database.  ``tls_parameters(url,
insecure)`` decides, before any connection is made:

1. Where the connection goes: every host of the URL (``host``, or
   ``hostaddr`` where given; ``$PGHOST`` / ``$PGHOSTADDR`` when the URL
   names none; libpq's default Unix socket when neither does).  A Unix
   socket directory (``/...`` or ``@...``), ``localhost`` or a loopback
   address is local: the URL is used as it is, TLS or not.
2. Any other host: the URL's ``sslmode``, which must be ``verify-full``
   (TLS, the certificate chains to ``sslrootcert``, and its name is the
   host); without one, ``sslmode=verify-full`` is added.
3. A weaker mode (``disable``, ``allow``, ``prefer``, ``require``,
   ``verify-ca``) for such a host is refused, unless the config says
   ``store_tls_insecure = true``: then the URL's mode is used as written.
   Without a mode in the URL, ``verify-full`` applies even then.
Returns the parameters to add to the URL (``{"sslmode": "verify-full"}`` or
``{}``); ValueError with the reason when the URL is refused.
"""

from __future__ import annotations

import ipaddress
import os

VERIFIED = "verify-full"
WEAK_MODES = ("disable", "allow", "prefer", "require", "verify-ca")


def _is_local(host: str) -> bool:
    if host == "" or host.startswith(("/", "@")) or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def destinations(params: dict, environ: dict) -> list[str]:
    """Where libpq connects: one entry per host (hostaddr wins over host)."""
    hosts = params.get("host") or environ.get("PGHOST") or ""
    addrs = params.get("hostaddr") or environ.get("PGHOSTADDR") or ""
    host_list, addr_list = hosts.split(","), addrs.split(",") if addrs else []
    count = max(len(host_list), len(addr_list))
    out = []
    for i in range(count):
        addr = addr_list[i].strip() if i < len(addr_list) else ""
        host = host_list[i].strip() if i < len(host_list) else ""
        out.append(addr or host)
    return out


def tls_parameters(url: str, insecure: bool = False, environ: dict | None = None) -> dict[str, str]:
    """Connection parameters to add to ``url`` (see the module docstring); ValueError if refused."""
    from psycopg.conninfo import conninfo_to_dict

    environ = os.environ if environ is None else environ
    try:
        params = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: libpq could not parse it
        raise ValueError(f"not a PostgreSQL URL libpq can read: {str(exc).strip().splitlines()[0]}") from None
    remote = [d for d in destinations(params, environ) if not _is_local(d)]
    if not remote:
        return {}
    mode = params.get("sslmode")
    if mode is not None and mode not in WEAK_MODES + (VERIFIED,):
        raise ValueError(f"sslmode={mode} is not a libpq sslmode")
    if mode is None:
        return {"sslmode": VERIFIED}
    if mode == VERIFIED or insecure:
        return {}
    raise ValueError(f"sslmode={mode} does not verify the database server {remote[0]}; use sslmode=verify-full "
                     f"(the default for a host that is not local, with sslrootcert=FILE naming its CA) or set "
                     f"store_tls_insecure = true")
