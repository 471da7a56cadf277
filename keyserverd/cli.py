"""The ``keyserverd`` command.

    keyserverd [--config FILE] [--state-dir DIR] [--listen HOST:PORT] ...   serve
    keyserverd serve [same options]
    keyserverd host add ID [--mac MAC] [--ip IP]... [--role host|gateway] [--ttl S] [--server HOST:PORT] [--json]
    keyserverd host list [--json]
    keyserverd host revoke ID
    keyserverd rekey (--pair ID1 ID2 | --all | --multicast)
    keyserverd status [--json]                 ask the running server (admin socket)
    keyserverd check-config FILE               name every problem of a config file
    keyserverd kek rotate --new-kek-file FILE  re-seal every stored key under a new KEK
    keyserverd kek generate FILE               write a new random KEK (0600)
    keyserverd kek generate --pkcs11-kek-label L ...   make a new KEK on the PKCS#11 token

``--config`` and ``--state-dir`` are accepted on the group and on every
subcommand (the subcommand's value wins).  A bad argument or config value
prints one line ``keyserverd: error: ...`` on stderr and exits 2; a refused
operation (unknown host, duplicate ID) exits 1.  Never a traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import sqlite3
import sys
import time
from pathlib import Path

import click

from keyserverd.peering.netkey import NETKEY_FILE, NetkeyBook
from keyserverd.peering.spec import check_peers, owner_of
from keyserverd.store.kek import (DEFAULT_KEK_FILE, create_kek_file, create_token_kek, load_kek, read_kek_file,
                                  replace_kek_file)
from l2crypt.core.constants import KEYSERVER_TLS_NAME
from l2crypt.core.errors import ConfigError, L2cryptError
from l2crypt.core.frame_wire import format_mac, is_group_address, parse_mac
from l2crypt.core.ks_messages import MAX_PEER_IPS, valid_host_id
from l2crypt.ops.control import query_status
from l2crypt.ops.logs import setup_logging

from .ca import ROLES, CertificateAuthority
from .config import ADMIN_SOCKET, KeyServerConfig, check_file, load_config
from .service import CIPHERS, revoke_and_rotate
from .status import render as render_status
from .daemon import serve_forever
from .store import open_configured_store
from .tokens import hash_token, new_token

DB_FILE = "keyserver.db"
#: File descriptors wanted beyond ``max_connections`` (database, sockets, peering, logs).
#: click >= 8.2 raises this for a group called without a subcommand.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
PROG = "keyserverd"

log = logging.getLogger("keyserverd")


# --- options ---------------------------------------------------------------

def _common_options(f):
    f = click.option("--pkcs11-ca/--no-pkcs11-ca", default=None,
                     help="--no-pkcs11-ca: the CA key stays the file ca.key, only the KEK is on the token "
                          "[default: the CA key is on the token too].")(f)
    f = click.option("--pkcs11-kek-label", metavar="LABEL",
                     help="Seal the stored keys under the AES-256 key of this label on the token instead of a "
                          "KEK file; it never leaves the token ('keyserverd kek generate' makes it).")(f)
    f = click.option("--pkcs11-pin-file", metavar="FILE",
                     help="File holding the token's user PIN [default: the systemd credential pkcs11-pin].")(f)
    f = click.option("--pkcs11-token-label", metavar="LABEL", help="Label of the token the CA key (or KEK) is on.")(f)
    f = click.option("--pkcs11-module", metavar="LIB",
                     help="Keep the CA key on a PKCS#11 token through this module: a new CA is made on the "
                          "token at the first start (state_dir/ca.token names it), host certificates are "
                          "signed there.  With --pkcs11-kek-label the KEK is on that token too.")(f)
    f = click.option("--store-tls-insecure", is_flag=True, default=None,
                     help="Allow the PostgreSQL URL's sslmode to be weaker than verify-full for a host "
                          "that is not local.")(f)
    f = click.option("--kek-credential", metavar="NAME",
                     help="systemd credential holding the key-encryption key ($CREDENTIALS_DIRECTORY/NAME).")(f)
    f = click.option("--kek-file", metavar="FILE",
                     help="File holding the key-encryption key the stored keys are sealed under "
                          "[default: STATE_DIR/kek, SQLite only].")(f)
    f = click.option("--store", help="Store URL: postgresql://... (shared by several instances) or "
                                      "sqlite:///PATH; default: SQLite in the state directory.")(f)
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="State directory (CA, server certificate, database).")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="TOML config file.")(f)
    return f


def _serve_options(f):
    f = click.option("--peer", "peers", multiple=True, metavar="IDS=sha256:FP@HOST:PORT",
                     help="A peered key server: the host IDs it speaks for (IDs or PREFIX*, comma-separated), "
                          "its CA fingerprint and peering address (repeatable).")(f)
    f = click.option("--peer-listen", help="HOST:PORT where peered key servers reach this one.")(f)
    f = click.option("--netkey-rekey-after-s", type=float, help="Rotate NETKEY after this many seconds (leader).")(f)
    f = click.option("--netkey-peer-ca", help="SHA-256 fingerprint of the peer key server's CA.")(f)
    f = click.option("--netkey-peer", help="HOST:PORT of the peer key server's NETKEY listener.")(f)
    f = click.option("--netkey-listen", help="HOST:PORT to listen on for NETKEY peering.")(f)
    f = click.option("--key-request-burst", type=int, help="Key requests one host may make at once.")(f)
    f = click.option("--key-requests-per-s", type=float, help="Key requests one host may make per second.")(f)
    f = click.option("--retire-after-s", type=float, help="Seconds a superseded key version is kept.")(f)
    f = click.option("--multicast-rekey-after-s", type=float, help="Rotate the multicast key after this many seconds.")(f)
    f = click.option("--rekey-after-s", type=float, help="Rotate pair keys after this many seconds.")(f)
    f = click.option("--require-pinned-ips/--no-require-pinned-ips", default=None,
                     help="Layer-3 hosts bind only the addresses of `host add --ip` [default: on].")(f)
    f = click.option("--require-pinned-macs/--no-require-pinned-macs", default=None,
                     help="Hosts bind only the MAC of `host add --mac` [default: off].")(f)
    f = click.option("--unauth-deadline-s", type=float,
                     help="Seconds a client without a certificate may stay connected in all [default: 30].")(f)
    f = click.option("--max-unauthenticated-connections", type=int,
                     help="Connections without a client certificate open at once [default: 256].")(f)
    f = click.option("--max-connections-per-host", type=int,
                     help="Connections one enrolled host may hold at once [default: 8].")(f)
    f = click.option("--workers", type=int,
                     help="Processes sharing the listening port and the store [default: 0 = one per core].")(f)
    f = click.option("--max-connections", type=int,
                     help="Connections open at once, handshakes included [default: 4096].")(f)
    f = click.option("--unauth-idle-s", type=float, help="Seconds a client without a certificate may stay silent.")(f)
    f = click.option("--metrics-listen", metavar="HOST:PORT",
                     help='Prometheus endpoint (GET /metrics) [default: 127.0.0.1:9479]; "" turns it off.')(f)
    f = click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format [default: text].")(f)
    f = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level.")(f)
    f = click.option("--server-name", "server_names", multiple=True,
                     help="Extra DNS name or IP for the server certificate (repeatable).")(f)
    f = click.option("--token-ttl", "token_ttl_s", type=int, help="Default token lifetime, seconds.")(f)
    f = click.option("--cert-days", type=int, help="Validity of host certificates, days.")(f)
    f = click.option("--cipher", type=click.Choice(CIPHERS), help="Frame AEAD the agents use.")(f)
    f = click.option("--listen", help="HOST:PORT to listen on.")(f)
    return f


def _merged(ctx: click.Context, opts: dict) -> dict:
    """Group options under subcommand options (a subcommand value wins)."""
    merged = dict(ctx.find_root().obj or {})
    for key, value in opts.items():
        if value is not None and value != ():
            merged[key] = value
    return merged


def _config(opts: dict) -> KeyServerConfig:
    if not logging.getLogger().handlers:  # operator commands: warnings (kek_created) as one line each
        setup_logging("warning", "text")
    overrides = {
        key: (tuple(value) if key in ("server_names", "peers") else value)
        for key, value in opts.items()
        if key != "config_path" and value is not None and value != ()
    }
    return load_config(opts.get("config_path"), overrides)


# --- commands --------------------------------------------------------------

@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_common_options
@_serve_options
@click.pass_context
def cli(ctx: click.Context, **opts) -> None:
    """l2crypt key server: enrollment, ID-MAC binding and pair keys over TLS 1.3."""
    ctx.obj = {k: v for k, v in opts.items() if v is not None and v != ()}
    if ctx.invoked_subcommand is None:
        serve_forever(_config(ctx.obj))


@cli.command()
@_common_options
@_serve_options
@click.pass_context
def serve(ctx: click.Context, **opts) -> None:
    """Run the key server (the default)."""
    serve_forever(_config(_merged(ctx, opts)))


@cli.group()
@_common_options
@click.pass_context
def host(ctx: click.Context, **opts) -> None:
    """Manage hosts: add (with a one-time token), list, revoke."""
    ctx.find_root().obj = _merged(ctx, opts)


@host.command("add")
@click.argument("host_id", metavar="ID")
@click.option("--mac", help="Pin the host to this MAC (otherwise its first hello binds one, "
                            "unless require_pinned_macs is on).")
@click.option("--ip", "ips", multiple=True, metavar="IP",
              help="Pin a layer-3 address to the host (repeatable); with require_pinned_ips (the default) "
                   "a layer-3 host binds only these.")
@click.option("--role", type=click.Choice(ROLES), default="host", show_default=True)
@click.option("--ttl", "ttl_s", type=click.IntRange(min=1), help="Token lifetime in seconds (default: token_ttl_s).")
@click.option("--server", help="HOST:PORT the host should enroll against (for the printed join line).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common_options
@click.pass_context
def host_add(ctx, host_id, mac, ips, role, ttl_s, server, as_json, **opts) -> None:
    """Create a host and print its one-time enrollment token."""
    config = _config(_merged(ctx, opts))
    if not valid_host_id(host_id) or host_id == KEYSERVER_TLS_NAME:
        raise click.BadParameter(
            f"{host_id!r}: 1-64 letters, digits, '.', '-', '_', not starting with '.' or '-'",
            param_hint="ID")
    peer = owner_of(check_peers(config.peers), host_id)
    if peer is not None:
        raise click.BadParameter(f"{host_id!r} is a host ID of the peer key server at {peer.address} "
                                 f"({','.join(peer.ids)})", param_hint="ID")
    mac_bytes = None
    if mac is not None:
        try:
            mac_bytes = parse_mac(mac)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--mac") from None
        if is_group_address(mac_bytes):
            raise click.BadParameter(f"{mac} is a multicast/broadcast address", param_hint="--mac")
    ip_bytes = [_parse_host_ip(ip) for ip in dict.fromkeys(ips)]
    if len(ip_bytes) > MAX_PEER_IPS:
        raise click.BadParameter(f"at most {MAX_PEER_IPS} addresses per host", param_hint="--ip")
    if server is None:
        server = _default_server(config)
    ca = CertificateAuthority.open(config.state_dir, None, config.ca_token())
    now = time.time()
    expires = now + (ttl_s if ttl_s is not None else config.token_ttl_s)
    token = new_token()
    store = open_configured_store(config, now)
    try:
        for ip in ip_bytes:
            holder = store.host_id_by_ip(ip)
            if holder is not None:
                raise L2cryptError(f"IP {ipaddress.ip_address(ip)} is already bound to host {holder!r}")
        store.add_host(host_id, mac_bytes, role, hash_token(token), expires, now)
        for ip in ip_bytes:
            store.bind_ip(host_id, ip)
    finally:
        store.close()
    fingerprint = ca.ca_fingerprint()
    expires_text = _rfc3339(expires)
    if as_json:
        click.echo(json.dumps({"id": host_id, "token": token, "ca_fingerprint": fingerprint,
                               "expires": expires_text}))
        return
    pins = (f", mac {format_mac(mac_bytes)}" if mac_bytes else "") + "".join(
        f", ip {ipaddress.ip_address(ip)}" for ip in ip_bytes)
    click.echo(f"host {host_id} added (role {role}{pins})")
    click.echo(f"token:          {token}")
    click.echo(f"expires:        {expires_text}")
    click.echo(f"ca fingerprint: {fingerprint}")
    if config.require_pinned_macs and mac_bytes is None:
        click.echo("note: require_pinned_macs is on: without --mac this host cannot bind a MAC (layer 3 only)")
    command = "l2crypt-gateway" if role == "gateway" else "l2crypt"
    click.echo("join with (paste the token when asked; it stays out of ps and shell history):")
    click.echo(f"  {command} enroll --server {server} --id {host_id} --token - --ca-fingerprint {fingerprint}")


@host.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common_options
@click.pass_context
def host_list(ctx, as_json, **opts) -> None:
    """List hosts: ID, MAC, role, enrolled, revoked."""
    config = _config(_merged(ctx, opts))
    store = open_configured_store(config, time.time(), create=False)
    try:
        hosts = store.list_hosts()
    finally:
        store.close()
    rows = [
        {"id": h.id, "mac": format_mac(h.mac) if h.mac else None, "role": h.role,
         "enrolled": h.enrolled, "revoked": h.revoked}
        for h in hosts
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    header = ("ID", "MAC", "ROLE", "ENROLLED", "REVOKED")
    table = [header] + [
        (r["id"], r["mac"] or "-", r["role"], "yes" if r["enrolled"] else "no", "yes" if r["revoked"] else "no")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@host.command("revoke")
@click.argument("host_id", metavar="ID")
@_common_options
@click.pass_context
def host_revoke(ctx, host_id, **opts) -> None:
    """Revoke a host: rotate every pair key it is part of and the multicast key,
    tell every other host to drop it, and refuse its certificate from now on."""
    config = _config(_merged(ctx, opts))
    store = open_configured_store(config, time.time(), create=False)
    try:
        changed, rotated = revoke_and_rotate(store, host_id, time.time())
    finally:
        store.close()
    if changed:
        click.echo(f"host {host_id} revoked; {rotated} pair key(s) and the multicast key rotated")
    else:
        click.echo(f"host {host_id} was already revoked; {rotated} pair key(s) and the multicast key rotated")


@cli.command()
@click.option("--pair", nargs=2, metavar="ID1 ID2", help="Rotate the pair key of these two hosts.")
@click.option("--all", "all_pairs", is_flag=True, help="Rotate every pair key and the multicast key.")
@click.option("--multicast", is_flag=True, help="Rotate the multicast key.")
@_common_options
@click.pass_context
def rekey(ctx, pair, all_pairs, multicast, **opts) -> None:
    """Rotate keys to a new PW_ID now.  A running keyserverd pushes the new
    versions to the hosts; old versions stay valid while they overlap."""
    if not (pair or all_pairs or multicast):
        raise click.UsageError("say what to rotate: --pair ID1 ID2, --all or --multicast")
    config = _config(_merged(ctx, opts))
    now = time.time()
    store = open_configured_store(config, now, create=False)
    try:
        if pair:
            id1, id2 = pair
            pw_id = store.rotate_pair_key(id1, id2, now)
            if pw_id is None:
                raise L2cryptError(f"hosts {id1!r} and {id2!r} have no pair key yet (nothing to rotate)")
            click.echo(f"pair {id1} <-> {id2} rotated to pw_id {pw_id}")
        if all_pairs:
            count = sum(1 for a, b in store.pairs() if store.rotate_pair_key(a, b, now) is not None)
            click.echo(f"{count} pair key(s) rotated")
        if all_pairs or multicast:
            click.echo(f"multicast key rotated to pw_id {store.rotate_multicast_key(now)}")
    finally:
        store.close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_common_options
@click.pass_context
def status(ctx, as_json, **opts) -> None:
    """Show the running key server: hosts, connections, keys and their ages, event seq."""
    config = _config(_merged(ctx, opts))
    doc = query_status(config.state_dir / ADMIN_SOCKET, who="keyserverd")
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        render_status(doc)


@cli.command("check-config")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path) -> None:
    """Check a config file; name every problem with its key (exit 2 if any)."""
    problems = check_file(path)
    for problem in problems:
        click.echo(f"{PROG}: {problem}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{path}: ok")


@cli.group()
@_common_options
@click.pass_context
def kek(ctx: click.Context, **opts) -> None:
    """The key-encryption key (KEK) the stored keys are sealed under."""
    ctx.find_root().obj = _merged(ctx, opts)


@kek.command("generate")
@click.argument("path", metavar="[FILE]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_common_options
@click.pass_context
def kek_generate(ctx, path, **opts) -> None:
    """Write a new random KEK (32 bytes, mode 0600) to FILE, which must not exist.
    Name it with kek_file (or install it as a systemd credential).

    Without FILE: make the KEK on the PKCS#11 token (--pkcs11-module,
    --pkcs11-token-label, --pkcs11-kek-label, --pkcs11-pin-file, or their
    config keys): an AES-256 key that never leaves the token; a key of that
    label already there is never replaced.  Run it once, before the first
    start with pkcs11_kek_label."""
    if path is not None:
        new = create_kek_file(path)
        click.echo(f"{path}: new KEK, id {new.shown_id}; back it up apart from the database")
        return
    config = _config(_merged(ctx, opts))
    where = config.kek_token()
    if where is None:
        raise click.UsageError("say where the new KEK goes: FILE, or --pkcs11-kek-label LABEL with the token's "
                               "--pkcs11-module and --pkcs11-token-label")
    new = create_token_kek(where)
    click.echo(f"new KEK {new.source[len('the KEK '):]}, id {new.shown_id}; it cannot be copied off the token: "
               f"without the token (or its vendor's backup) the stored keys are lost")


@kek.command("rotate")
@click.option("--new-kek-file", required=True, metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="The new KEK (32 bytes or 64 hex digits, mode 0600); created with a random KEK if "
                   "FILE does not exist.")
@_common_options
@click.pass_context
def kek_rotate(ctx, new_kek_file, **opts) -> None:
    """Re-seal every stored key (pair keys, multicast keys, NETKEY) under a new
    KEK, in one transaction.  No key and no PW_ID changes: hosts notice nothing.

    Stop every keyserverd that uses the store first (and run no other
    keyserverd command meanwhile): the rotation is refused while anything
    else has the store open.  The current KEK is the one the config names
    (--kek-file, --kek-credential, or STATE_DIR/kek).  Afterwards a KEK
    file in use is replaced by the new KEK, so the config stays as it is;
    a credential has to be replaced by hand.  Give the new KEK to every
    keyserverd sharing the store, then start them.  Backups made before
    still need the old KEK.
    """
    config = _config(_merged(ctx, opts))
    current = load_kek(config.kek_file, config.kek_credential, token=config.kek_token())
    current_file = (Path(config.kek_file) if config.kek_file
                    else None if config.kek_credential or current is not None
                    else config.state_dir / DEFAULT_KEK_FILE)
    if current is None and not current_file.exists():
        raise L2cryptError(f"no KEK at {current_file}: nothing is sealed yet, or the KEK is elsewhere "
                           f"(--kek-file, --kek-credential)")
    new = read_kek_file(new_kek_file, "--new-kek-file") if new_kek_file.exists() else create_kek_file(new_kek_file)
    store = open_configured_store(config, time.time(), create=False, kek=current)
    resealed = {}

    def then() -> None:  # after the commit, before any keyserverd can open the store again
        try:
            resealed["netkey"] = netkeys.reseal(new)
            if current_file is not None:
                replace_kek_file(current_file, new_kek_file)
        except OSError as exc:
            raise L2cryptError(f"the store is now sealed under the KEK in {new_kek_file} (id {new.shown_id}), "
                               f"but {exc.filename or current_file} could not be written "
                               f"({exc.strerror or exc}): put that KEK in place by hand") from None

    try:
        if new.kek_id == store.kek.kek_id:
            raise L2cryptError(f"--new-kek-file {new_kek_file} holds the KEK in use (id {new.shown_id})")
        old_id = store.kek.shown_id
        netkeys = NetkeyBook(config.state_dir / NETKEY_FILE, store.kek)
        counts = store.reseal(new, then)
    finally:
        store.close()
    click.echo(f"KEK id {old_id} -> {new.shown_id}: re-sealed {counts['pair_keys']} pair key version(s), "
               f"{counts['multicast_keys']} multicast key version(s), {resealed['netkey']} NETKEY version(s); "
               f"no PW_ID changed")
    if current_file is not None:
        click.echo(f"{current_file} now holds the new KEK: copy it to every keyserverd sharing this store, and "
                   f"back it up apart from the database (older backups still need the old KEK)")
    elif config.pkcs11_kek_label:
        click.echo(f"now set kek_file = {new_kek_file} and remove pkcs11_kek_label on every keyserverd sharing "
                   f"this store")
    else:
        click.echo(f"now replace the credential {config.kek_credential!r} with {new_kek_file} (e.g. "
                   f"systemd-creds encrypt --name={config.kek_credential} {new_kek_file} "
                   f"/etc/credstore.encrypted/{config.kek_credential}) on every keyserverd sharing this store")


def _default_server(config: KeyServerConfig) -> str:
    host = config.listen_host
    if host in ("0.0.0.0", "::"):
        host = config.server_names[0] if config.server_names else socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{config.listen_port}"


def _parse_host_ip(text: str) -> bytes:
    """``--ip``: one unicast IPv4 or IPv6 address a host can own, as 4 or 16 bytes."""
    from .l3_service import bindable_ip

    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: not an IPv4 or IPv6 address", param_hint="--ip") from None
    if not bindable_ip(ip.packed):
        raise click.BadParameter(f"{text}: not a unicast host address", param_hint="--ip")
    return ip.packed


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(message: str, code: int) -> None:
    click.echo(f"{PROG}: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except _NO_ARGS_IS_HELP as exc:  # "keyserverd host": show its help
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:
        _fail(exc.format_message(), 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 1)
    except click.Abort:
        _fail("aborted", 130)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except L2cryptError as exc:
        _fail(str(exc), 1)
    except sqlite3.Error as exc:
        _fail(f"database: {exc}", 1)
    except OSError as exc:
        _fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # psycopg errors (PostgreSQL store), without importing psycopg here
        if not type(exc).__module__.startswith("psycopg"):
            raise
        _fail(f"database: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
