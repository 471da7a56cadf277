"""``l2crypt``: enroll a host, run its agent, show its status."""

from __future__ import annotations

import json
import sys

import click

from l2crypt import __version__
from l2crypt.core.errors import ConfigError, L2cryptError
from l2crypt.ops.cli_options import key_client_cli_options, tuning_options

from .config import DEFAULT_METRICS_LISTEN, DEFAULT_STATE_DIR, AgentConfig, config_keys, load_agent_config

PROG = "l2crypt"


def fail(message: str, code: int = 1) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """l2crypt: a layer-2 encrypting switch agent.

    Enroll the host once with the token from `keyserverd host add`, then run
    the agent: every Ethernet frame the host sends through the TAP leaves the
    wire port sealed with a key for the pair of hosts (or the multicast key).
    """


def enroll_options(what: str, default_state_dir: str):
    """The options of ``l2crypt enroll`` and ``l2crypt-gateway enroll`` (``what``: host or gateway)."""
    opts = [
        click.option("--server", required=True, metavar="HOST:PORT", help="Key server to enroll with."),
        click.option("--id", "host_id", required=True, help=f"The {what} ID the operator created."),
        click.option("--token-file", type=click.Path(dir_okay=False),
                     help="File holding the one-time token from `keyserverd host add`."),
        click.option("--token", help="The token; `-` reads it from stdin (asked without echo on a "
                                     "terminal). A value given here shows in ps and shell history."),
        click.option("--ca-fingerprint", required=True, metavar="sha256:HEX",
                     help="SHA-256 fingerprint of the key server's CA, printed by `keyserverd host add`."),
        click.option("--state-dir", default=default_state_dir, show_default=True,
                     help="Where the key, certificate and CA are stored."),
        click.option("--force", is_flag=True, help="Replace an existing enrollment."),
        click.option("--pkcs11-module", metavar="LIB",
                     help="Make the key pair on a PKCS#11 token through this module (e.g. "
                          "/usr/lib/softhsm/libsofthsm2.so): EC P-256, not extractable; the token "
                          "signs the CSR and the state directory keeps only a reference to the key."),
        click.option("--token-label", metavar="LABEL", help="With --pkcs11-module: the token's label."),
        click.option("--pin-file", type=click.Path(dir_okay=False),
                     help="With --pkcs11-module: file holding the token's user PIN [default: the "
                          "systemd credential pkcs11-pin]. The PIN is never taken from the command line."),
    ]

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def run_enroll(prog: str, fail, server, host_id, token, token_file, ca_fingerprint, state_dir, force,
               pkcs11_module=None, token_label=None, pin_file=None) -> None:
    """The body of both enroll commands: read the token, enroll, say where the certificate is."""
    from .enroll import enroll as do_enroll
    from .enroll import read_token

    try:
        secret = read_token(token, token_file, warn=lambda text: click.echo(f"{prog}: warning: {text}", err=True))
        path = do_enroll(server, host_id, secret, ca_fingerprint, state_dir, force,
                         pkcs11_module, token_label, pin_file)
    except L2cryptError as exc:
        fail(str(exc))
    where = f"; the key is on token {token_label!r}" if pkcs11_module else ""
    click.echo(f"enrolled as {host_id}; certificate stored in {path}{where}")


@cli.command()
@enroll_options("host", DEFAULT_STATE_DIR)
def enroll(**opts) -> None:
    """Trade a one-time token for this host's certificate.

    The CA is pinned by fingerprint before the token is sent.  Give the token
    with --token-file FILE or --token - (stdin), so it stays out of ps.
    With --pkcs11-module and --token-label the host key is made on a PKCS#11
    token and never leaves it; the agent then answers the key server's
    challenge with it (set pkcs11_pin_file, or the credential pkcs11-pin).
    """
    run_enroll(PROG, fail, **opts)


def _agent_options(fn):
    docs = config_keys(AgentConfig)
    opts = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="TOML config file (every key can be overridden below)."),
        click.option("--port", help=docs["port"]),
        click.option("--tap", help=docs["tap"] + " [default: l2c0]"),
        click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
                     help=docs["servers"] + " (repeat for several)."),
        click.option("--state-dir", help=docs["state_dir"] + f" [default: {DEFAULT_STATE_DIR}]"),
        click.option("--tap-mac", help=docs["tap_mac"]),
        click.option("--pkcs11-pin-file", help=docs["pkcs11_pin_file"]),
        click.option("--wire-mtu", type=int, help=docs["wire_mtu"]),
        click.option("--datapath", help=docs["datapath"] + " [default: simple]"),
        click.option("--wire-ring", help=docs["wire_ring"] + " [default: off]"),
        click.option("--datapath-process/--no-datapath-process", default=None,
                     help=docs["datapath_process"] + " [default: off]"),
        click.option("--ethertype", type=lambda s: int(s, 0), help=docs["ethertype"] + " [default: 0x88b5]"),
        *tuning_options(AgentConfig),
        *key_client_cli_options(AgentConfig),
        click.option("--log-level", help=docs["log_level"] + " [default: info]"),
        click.option("--log-format", help=docs["log_format"] + " [default: text]"),
        click.option("--metrics-listen", metavar="HOST:PORT",
                     help=docs["metrics_listen"] + f" [default: {DEFAULT_METRICS_LISTEN}]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@_agent_options
def agent(config_path, servers, **overrides) -> None:
    """Run the host agent in the foreground (SIGTERM or Ctrl-C stops it).

    The agent attaches to the persistent TAP (made by the host's network
    manager, or by the agent at its first start) and leaves it in place when
    it stops, so the host keeps its addresses; it keeps the TAP's MAC in the
    state directory (tap.mac).  `l2crypt remove-tap` deletes the TAP.
    """
    from l2crypt.ops.daemon_shell import run_daemon

    from .agent import Agent

    overrides["servers"] = list(servers) if servers else None
    run_daemon(lambda: load_agent_config(config_path, overrides), Agent, fail)


@cli.command()
@click.option("--state-dir", default=None, help=f"The agent's state directory [default: {DEFAULT_STATE_DIR}].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Take the state directory from this agent config file.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (with --watch: one line of rates each time).")
@click.option("--watch", is_flag=True, help="Show live rates (frames/s, bytes/s per peer) until Ctrl-C.")
@click.option("--interval", "interval_s", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop --watch after this many refreshes (0: at Ctrl-C).")
def status(state_dir, config_path, as_json, watch, interval_s, count) -> None:
    """Show the running agent's key server, peers, key versions, counters and MTU."""
    from l2crypt.ops.status_view import render_status
    from l2crypt.ops.status_view import watch as watch_rates

    show_status(state_dir, config_path, as_json, watch, interval_s, count, fail=fail,
                socket_name="agent.sock", who="agent", render=render_status, watch_rates=watch_rates)


def show_status(state_dir, config_path, as_json, watch, interval_s, count, *, fail, socket_name, who,
                render, watch_rates, default_state_dir=DEFAULT_STATE_DIR) -> None:
    """The body of a daemon's ``status`` command (the agent's and the gateway's):
    find the control socket (``--state-dir``, or the config's ``state_dir``),
    then print the document as JSON or a table, or watch the rates."""
    from pathlib import Path

    from .config import read_toml
    from l2crypt.ops.control import query_status

    try:
        if state_dir is None and config_path is not None:
            state_dir = read_toml(config_path).get("state_dir")
            if state_dir is not None and not isinstance(state_dir, str):
                fail(f"{config_path}: state_dir: want a path, got {state_dir!r}", 2)
    except L2cryptError as exc:
        fail(str(exc), 2)
    path = Path(state_dir or default_state_dir) / socket_name
    try:
        if watch:
            watch_rates(lambda: query_status(path, who=who), interval_s, count, as_json)
            return
        doc = query_status(path, who=who)
    except L2cryptError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        render(doc)


@cli.command()
@click.option("--port", required=True, help="The port to give back: a wire port, or a gateway's encrypted or plain port.")
def unguard(port) -> None:
    """Remove the port guard (nftables table l2crypt_PORT) from a port.

    The agent and the gateway install it before they bring a port up and leave
    it when they stop, so the port fails closed.  Without it the port passes
    plain frames both ways again.  Stop the daemon first; its next start puts
    the guard back.  The port's sysctls (IPv6 and ARP off, strict rp_filter)
    stay as the daemon left them.
    """
    from l2crypt.io.port_guard import unguard_port

    try:
        unguard_port(port)
    except L2cryptError as exc:
        fail(str(exc))
    click.echo(f"removed the port guard from {port}: plain frames pass both ways now")


@cli.command("check-config")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
def check_config(path) -> None:
    """Check an agent config file; name every problem with its key (exit 2 if any)."""
    from .config import check_agent_file

    problems = check_agent_file(path)
    for problem in problems:
        click.echo(f"{PROG}: {problem}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{path}: ok")


@cli.command("remove-tap")
@click.option("--tap", default=None, help="The TAP to delete [default: l2c0, or the config's tap].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Take the TAP's name from this agent config file.")
def remove_tap_cmd(tap, config_path) -> None:
    """Delete the agent's persistent TAP (the host's addresses on it go too).

    The agent leaves its TAP in place when it stops, so the host keeps its
    addresses across restarts.  Run this with the agent stopped, after
    removing the TAP from the network manager's config (a TAP made by
    systemd-networkd or ifupdown comes back at their next start).  The MAC
    stays in the state directory (tap.mac): a new TAP gets it again.
    """
    from .config import check_iface, read_toml
    from l2crypt.io.linux_tap import remove_tap

    try:
        if tap is None and config_path is not None:
            tap = read_toml(config_path).get("tap")
        tap = check_iface(tap or AgentConfig.tap)
    except L2cryptError as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        fail(f"tap: {exc}", 2)
    try:
        remove_tap(tap)
    except L2cryptError as exc:
        fail(str(exc))
    click.echo(f"removed TAP {tap}")


@cli.command("install-units")
@click.option("--prefix", type=click.Path(file_okay=False), default="/", show_default=True,
              help="Install under PREFIX/etc/systemd/system.")
@click.option("--bin-dir", type=click.Path(file_okay=False), default=None,
              help="Where the l2crypt commands are (default: where this one runs from).")
@click.option("--dry-run", is_flag=True, help="Only print what would be written.")
@click.option("--networkd", is_flag=True,
              help="Also write the host's TAP set-up for systemd-networkd: TAP.netdev (the persistent TAP) "
                   "and TAP.network (its addresses) in PREFIX/etc/systemd/network.")
@click.option("--tap", default="l2c0", show_default=True, help="With --networkd: the TAP's name.")
@click.option("--address", "addresses", multiple=True, metavar="ADDR/PREFIX",
              help="With --networkd: an address of the host on the TAP, IPv4 or IPv6 (repeat for several).")
@click.option("--dhcp", is_flag=True, help="With --networkd: take the TAP's addresses from DHCP.")
@click.option("--force", is_flag=True, help="With --networkd: replace network files that exist and differ.")
def install_units_cmd(prefix, bin_dir, dry_run, networkd, tap, addresses, dhcp, force) -> None:
    """Install the systemd units (agent per port, key server, gateway).

    The host's addresses belong to its network manager and live on the
    agent's TAP, which outlives the agent.  --networkd writes that set-up
    for systemd-networkd (the README shows the same for ifupdown).
    """
    from pathlib import Path

    from .config import check_iface
    from l2crypt.ops.units import default_bin_dir, install_units, render_network_files

    bin_path = Path(bin_dir) if bin_dir else default_bin_dir()
    if not networkd and (addresses or dhcp or force):
        fail("--address, --dhcp and --force go with --networkd", 2)
    try:
        network = render_network_files(check_iface(tap), tuple(addresses), dhcp) if networkd else None
        paths = install_units(Path(prefix), bin_path, dry_run, network, force)
    except ConfigError as exc:
        fail(str(exc), 2)
    except L2cryptError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--tap: {exc}", 2)
    for path in paths:
        click.echo(f"{'would write' if dry_run else 'wrote'} {path}"
                   + (f" (commands in {bin_path})" if path.suffix == ".service" else ""))
    if not dry_run:
        click.echo("next: " + ("networkctl reload; " if networkd else "")
                   + "systemctl daemon-reload; systemctl enable --now l2crypt-agent@PORT "
                   "(or keyserverd, or l2crypt-gateway)")


from l2crypt.l3.cli import register as _register_l3  # noqa: E402

_register_l3(cli, fail)


def run_click(group: click.Group, prog: str, argv=None) -> None:
    """Run a click group so that usage errors are one line and exit 2, never a traceback."""
    try:
        rv = group.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp") and exc.ctx is not None:
            click.echo(exc.ctx.get_help())
            sys.exit(2)
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


def main(argv=None) -> None:
    """Console entry point."""
    run_click(cli, PROG, argv)
