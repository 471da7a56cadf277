"""keyserverd configuration: one frozen dataclass, loaded from one TOML file.

1. ``load_config(path, overrides)`` reads the TOML file (top-level keys, no
   tables), applies CLI overrides on top, and checks every value.
2. A wrong value raises ``ConfigError`` naming where it came from and the key,
   e.g. ``keyserver.toml: listen: not HOST:PORT: 'abc'`` or
   ``--listen: not HOST:PORT: 'abc'``.

Example ``/etc/l2crypt/keyserver.toml``::

    listen = "0.0.0.0:7788"
    state_dir = "/var/lib/l2crypt/keyserver"
    cipher = "aes-256-gcm"
    cert_days = 365
    token_ttl_s = 86400
    server_names = ["ks1.example.net", "192.0.2.10"]
    log_level = "info"
    log_format = "text"
    metrics_listen = "127.0.0.1:9479"
    unauth_idle_s = 10.0
    rekey_after_s = 3600
    multicast_rekey_after_s = 3600
    retire_after_s = 300
    store = "postgresql://keyserverd@db.example.net/l2crypt?sslrootcert=/etc/l2crypt/pg-ca.crt"
    kek_file = "/etc/l2crypt/kek"   # default (SQLite only): state_dir/kek, created with the database
    # Peered key servers of cascaded switches: their host IDs, CA and address.
    peer_listen = "0.0.0.0:7790"
    peers = ["b-*=sha256:...@192.0.2.30:7790"]
    # NETKEY peering with the key server of another segment (all three or none):
    netkey_listen = "0.0.0.0:7789"
    netkey_peer = "192.0.2.20:7789"
    netkey_peer_ca = "sha256:..."   # the peer's CA fingerprint
    netkey_rekey_after_s = 3600
    key_requests_per_s = 100
    key_request_burst = 200
    workers = 0                    # processes sharing the port; 0 = one per core
    max_connections = 4096
    max_connections_per_host = 8
    max_unauthenticated_connections = 256
    unauth_deadline_s = 30.0
    pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"   # the CA key on a token ("" = ca.key file)
    pkcs11_token_label = "l2crypt-ca"
    pkcs11_pin_file = "/etc/l2crypt/ca-token.pin"      # "" = the systemd credential pkcs11-pin
    pkcs11_kek_label = "l2crypt-kek"   # the KEK on that token too (keyserverd kek generate makes it)
    pkcs11_ca = true                   # false: the CA key stays the file ca.key (only the KEK on the token)
    require_pinned_macs = false    # true: hosts bind only the MAC of ``host add --mac``
    require_pinned_ips = true      # hosts bind only the addresses of ``host add --ip``
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from keyserverd.peering.spec import SYNTAX, check_peers
from keyserverd.store.pg_tls import tls_parameters
from l2crypt.agent.tls_files import normalize_fingerprint
from l2crypt.core.constants import DEFAULT_KEYSERVER_PORT
from l2crypt.core.errors import ConfigError
from l2crypt.ops.metrics import parse_listen

from .ca import CaToken
from .store.kek import KekToken
from .service import CIPHERS, DEFAULT_CIPHER
from .store import PG_SCHEMES, check_store_url

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_METRICS_LISTEN = "127.0.0.1:9479"
#: The admin socket (``keyserverd status``) in the state directory, mode 0600.
ADMIN_SOCKET = "keyserverd.sock"
DEFAULT_STATE_DIR = Path("/var/lib/l2crypt/keyserver")
MAX_WORKERS = 64
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class KeyServerConfig:
    """Settings of one keyserverd.  Every field has a CLI override."""

    #: HOST:PORT to listen on (``[v6addr]:port`` for IPv6; port 0 picks a free one).
    listen: str = f"0.0.0.0:{DEFAULT_KEYSERVER_PORT}"
    #: Directory of the CA, the server certificate and the SQLite database.
    state_dir: Path = DEFAULT_STATE_DIR
    #: AEAD the agents use for frames: "aes-256-gcm" or "chacha20-poly1305".
    cipher: str = DEFAULT_CIPHER
    #: Validity of issued host certificates, in days.
    cert_days: int = 365
    #: Lifetime of a ``host add`` token, in seconds.
    token_ttl_s: int = 86400
    #: Extra DNS names / IP addresses in the server certificate's SAN.
    server_names: tuple[str, ...] = ()
    #: Logging level: debug, info, warning or error.
    log_level: str = "info"
    #: Seconds a connection without a client certificate may stay silent.
    unauth_idle_s: float = 10.0
    #: Seconds after which a pair key is rotated to a new PW_ID.
    rekey_after_s: float = 3600.0
    #: Seconds after which the multicast key is rotated to a new PW_ID.
    multicast_rekey_after_s: float = 3600.0
    #: Seconds a superseded key version is kept on the server before it is deleted.
    retire_after_s: float = 300.0
    #: Log line format: "text" (``event key=value``) or "json" (one object a line).
    log_format: str = "text"
    #: Prometheus endpoint HOST:PORT (``GET /metrics``), loopback by default; "" turns it off.
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    #: Where hosts and keys live: "" = SQLite ``keyserver.db`` in state_dir,
    #: ``sqlite:///PATH``, or ``postgresql://...`` shared by several instances.
    store: str = ""
    #: Allow a PostgreSQL URL naming an ``sslmode`` weaker than verify-full for a
    #: host that is not local (a Unix socket or loopback needs no TLS anyway).
    store_tls_insecure: bool = False
    #: File holding the key-encryption key (32 bytes, or 64 hex digits; mode
    #: 0600) the stored keys are sealed under; "" = ``state_dir/kek`` (SQLite
    #: only, created with a new database).  The same on every instance of a store.
    kek_file: str = ""
    #: Name of the systemd credential holding the KEK (read from
    #: ``$CREDENTIALS_DIRECTORY``; ``LoadCredential=`` or ``LoadCredentialEncrypted=``).
    kek_credential: str = ""
    #: HOST:PORT where peered key servers (cascaded switches) reach us; "" = not listening.
    peer_listen: str = ""
    #: Peered key servers, each ``IDS=sha256:<their CA fingerprint>@HOST:PORT``;
    #: IDS are the host IDs it speaks for (comma-separated IDs or PREFIX*).
    peers: tuple[str, ...] = ()
    #: HOST:PORT of the NETKEY peering listener ("" = no peering).
    netkey_listen: str = ""
    #: HOST:PORT of the peer key server's NETKEY peering listener.
    netkey_peer: str = ""
    #: SHA-256 fingerprint of the peer key server's CA (sha256:HEX).
    netkey_peer_ca: str = ""
    #: Seconds after which the leader of a peering rotates NETKEY.
    netkey_rekey_after_s: float = 3600.0
    #: Key requests one host may make per second (over all its connections).
    key_requests_per_s: float = 100.0
    #: Key requests one host may make at once after a quiet spell.
    key_request_burst: int = 200
    #: Processes serving the listening port (``SO_REUSEPORT``) and the one
    #: store; 0 = one per core (1 with peering, NETKEY or a CA token, or
    #: listening on port 0).  See ``keyserverd.workers``.
    workers: int = 0
    #: Connections open at once, TLS handshakes included (each costs about
    #: 0.3 MiB of memory and a file descriptor); more are refused at accept.
    #: Each worker counts its own.
    max_connections: int = 4096
    #: Connections one enrolled host (certificate ID) may hold at once.
    max_connections_per_host: int = 8
    #: Connections without a client certificate (enrollment, CA fetches) open at once.
    max_unauthenticated_connections: int = 256
    #: Seconds a connection without a client certificate may stay open in all,
    #: however many messages it sends (``unauth_idle_s`` bounds each silence).
    unauth_deadline_s: float = 30.0
    #: true: a host may bind at hello only the MAC given at ``host add --mac``
    #: (``mac_not_pinned`` otherwise); false: its first hello binds one, for good.
    require_pinned_macs: bool = False
    #: true: a layer-3 host may bind only the addresses given at ``host add --ip``
    #: (``ip_not_pinned`` otherwise); false: first come, first served.
    require_pinned_ips: bool = True
    #: PKCS#11 module (shared library) of the token the CA key is on; "" = the
    #: CA key is the file ``state_dir/ca.key``.  A new CA is made on the token
    #: at the first start; afterwards ``state_dir/ca.token`` names it.
    pkcs11_module: str = ""
    #: Label of that token.
    pkcs11_token_label: str = ""
    #: File holding the token's user PIN; "" = the systemd credential ``pkcs11-pin``.
    pkcs11_pin_file: str = ""
    #: Label of an AES-256 key on that token to seal the stored keys under
    #: instead of a KEK file ("" = none); ``keyserverd kek generate`` makes it.
    pkcs11_kek_label: str = ""
    #: false: the CA key stays the file ``ca.key`` while the KEK is on the token.
    pkcs11_ca: bool = True

    def ca_token(self) -> CaToken | None:
        """The token the CA key is on (the ``pkcs11_*`` keys), or None."""
        if not self.pkcs11_ca or not (self.pkcs11_module or self.pkcs11_token_label or self.pkcs11_pin_file):
            return None
        return CaToken(self.pkcs11_module, self.pkcs11_token_label, self.pkcs11_pin_file)

    def kek_token(self) -> KekToken | None:
        """The token key the stored keys are sealed under (``pkcs11_kek_label``), or None."""
        if not self.pkcs11_kek_label:
            return None
        return KekToken(self.pkcs11_module, self.pkcs11_token_label, self.pkcs11_kek_label, self.pkcs11_pin_file)

    @property
    def listen_host(self) -> str:
        return parse_hostport(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_hostport(self.listen)[1]


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"not HOST:PORT: {text!r}")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not m:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port out of range: {text!r}")
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {text!r}") from None
    return host, port


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"not a string: {name!r}")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.rstrip(".").split(".")):
        raise ValueError(f"not a DNS name or IP address: {name!r}")
    return name.rstrip(".").lower()


def _check(key: str, value: Any) -> Any:
    """Check and normalise one field; ValueError with the reason."""
    if key == "listen":
        if value == "":
            raise ValueError("missing (empty); want HOST:PORT")
        parse_hostport(value)
        return value
    if key == "metrics_listen":
        if not isinstance(value, str):
            raise ValueError(f'not "HOST:PORT" or "" (off): {value!r}')
        parse_listen(value)
        return value
    if key == "state_dir":
        if value == "":
            raise ValueError("missing (empty); want a directory")
        if not isinstance(value, (str, Path)):
            raise ValueError(f"not a path: {value!r}")
        return Path(value)
    if key == "log_format":
        if value not in LOG_FORMATS:
            raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
        return value
    if key == "cipher":
        if value not in CIPHERS:
            raise ValueError(f"must be one of {', '.join(CIPHERS)}, not {value!r}")
        return value
    if key in ("require_pinned_macs", "require_pinned_ips", "pkcs11_ca"):
        if not isinstance(value, bool):
            raise ValueError(f"not true or false: {value!r}")
        return value
    if key in ("cert_days", "token_ttl_s", "key_request_burst", "max_connections", "max_connections_per_host",
               "max_unauthenticated_connections"):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"not a positive integer: {value!r}")
        return value
    if key == "workers":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_WORKERS:
            raise ValueError(f"not a number of processes from 0 (one per core) to {MAX_WORKERS}: {value!r}")
        return value
    if key in ("netkey_listen", "netkey_peer"):
        if value != "":
            parse_hostport(value)
        return value
    if key == "netkey_peer_ca":
        return normalize_fingerprint(value) if value != "" else value
    if key in ("rekey_after_s", "multicast_rekey_after_s", "retire_after_s", "netkey_rekey_after_s"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"not a number of seconds >= 1: {value!r}")
        return float(value)
    if key in ("unauth_idle_s", "key_requests_per_s", "unauth_deadline_s"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"not a positive number: {value!r}")
        return float(value)
    if key == "server_names":
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"not a list of names: {value!r}")
        return tuple(_check_name(n) for n in value)
    if key == "peer_listen":
        if value:
            parse_hostport(value)
        return value
    if key == "peers":
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"not a list of {SYNTAX}: {value!r}")
        check_peers(value)
        return tuple(value)
    if key == "store":
        return check_store_url(value)
    if key == "store_tls_insecure":
        if not isinstance(value, bool):
            raise ValueError(f"not true or false: {value!r}")
        return value
    if key == "kek_file":
        if not isinstance(value, (str, Path)):
            raise ValueError(f"not a path: {value!r}")
        return str(value)
    if key in ("pkcs11_module", "pkcs11_token_label", "pkcs11_pin_file", "pkcs11_kek_label"):
        if not isinstance(value, (str, Path)):
            raise ValueError(f"not a string: {value!r}")
        return str(value)
    if key == "kek_credential":
        if not isinstance(value, str) or "/" in value or value in (".", ".."):
            raise ValueError(f"not a credential name (a file name, no '/'): {value!r}")
        return value
    if key == "log_level":
        if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return value.lower()
    raise KeyError(key)


FIELD_NAMES = tuple(f.name for f in fields(KeyServerConfig))


def config_problems(path: Path | str | None, overrides: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], list[str]]:
    """Check a file and overrides: (checked values, every problem, one line each
    ``FILE: KEY: reason`` or ``--option: reason``)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            return values, [f"{where}: cannot read: {exc.strerror or exc}"]
        except tomllib.TOMLDecodeError as exc:
            return values, [f"{where}: not valid TOML: {exc}"]
        for key, value in data.items():
            if key not in FIELD_NAMES:
                problems.append(f"{where}: {key}: unknown key (known: {', '.join(FIELD_NAMES)})")
                continue
            try:
                values[key] = _check(key, value)
            except ValueError as exc:
                problems.append(f"{where}: {key}: {exc}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in FIELD_NAMES:
            problems.append(f"unknown setting {key!r}")
            continue
        try:
            values[key] = _check(key, value)
        except ValueError as exc:
            problems.append(f"--{key.replace('_', '-')}: {exc}")
    problems.extend(_store_problems(values))
    netkey = [k for k in ("netkey_listen", "netkey_peer", "netkey_peer_ca") if values.get(k)]
    if netkey and len(netkey) != 3:
        missing = next(k for k in ("netkey_listen", "netkey_peer", "netkey_peer_ca") if k not in netkey)
        problems.append(f"{missing}: missing (NETKEY peering needs netkey_listen, netkey_peer and netkey_peer_ca)")
    if values.get("workers", 0) > 1:
        single = [k for k in ("peers", "peer_listen", "netkey_listen", "pkcs11_module", "pkcs11_token_label",
                              "pkcs11_kek_label")
                  if values.get(k)]
        if single:
            problems.append(f"workers: {single[0]} runs in one process; set workers = 1 (or 0, which is then 1)")
    return values, problems


def _store_problems(values: dict[str, Any]) -> list[str]:
    """The KEK and the PostgreSQL TLS settings, which depend on each other and on ``store``."""
    problems = []
    named = [k for k in ("kek_file", "kek_credential", "pkcs11_kek_label") if values.get(k)]
    if len(named) > 1:
        problems.append(f"{named[1]}: set one of kek_file, kek_credential and pkcs11_kek_label, not both "
                        f"{named[0]} and {named[1]}")
    if values.get("pkcs11_kek_label"):
        missing = [k for k in ("pkcs11_module", "pkcs11_token_label") if not values.get(k)]
        if missing:
            problems.append(f"{missing[0]}: missing: a KEK on a token (pkcs11_kek_label) needs pkcs11_module "
                            f"and pkcs11_token_label")
    store = values.get("store", "")
    if not store.startswith(PG_SCHEMES):
        return problems
    if not named:
        problems.append("kek_file: missing: a PostgreSQL store needs kek_file, kek_credential or "
                        "pkcs11_kek_label (every keyserverd sharing the store uses the same KEK)")
    try:
        tls_parameters(store, values.get("store_tls_insecure", False))
    except ValueError as exc:
        problems.append(f"store: {exc}")
    except ImportError:
        pass  # without psycopg the store cannot be opened at all; that start says so
    return problems


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> KeyServerConfig:
    """Read ``path`` (if given), apply ``overrides`` (field name -> value; None
    means "not given"), check everything and return the config.  A ConfigError
    names every bad key (the first in full, the others after "; ")."""
    values, problems = config_problems(path, overrides)
    if problems:
        raise ConfigError("; ".join(problems))
    return KeyServerConfig(**values)


def check_file(path: Path | str) -> list[str]:
    """Every problem of a keyserverd config file (``keyserverd check-config``); [] when valid."""
    return config_problems(path)[1]
