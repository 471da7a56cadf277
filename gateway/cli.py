"""``l2crypt-gateway``: enroll the gateway, run it, show its status, check its config; run a tunnel relay."""

from __future__ import annotations

import sys

import click

from l2crypt import __version__
from l2crypt.agent.cli import enroll_options, run_click, run_enroll
from l2crypt.agent.config import config_keys
from l2crypt.ops.cli_options import config_option

from .config import DEFAULT_STATE_DIR, GatewayConfig, load_gateway_config

PROG = "l2crypt-gateway"


def fail(message: str, code: int = 1) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """l2crypt gateway: joins an encrypted segment to a plain network
    (full-decrypt port) and to other encrypted segments (inter-subnet port).

    Add it on the key server with `keyserverd host add ID --role gateway`,
    enroll it with `l2crypt-gateway enroll`, then run it.
    """


@cli.command()
@enroll_options("gateway", DEFAULT_STATE_DIR)
def enroll(**opts) -> None:
    """Trade a one-time token for the gateway's certificate (as `l2crypt enroll`;
    give the token with --token-file FILE or --token -, so it stays out of ps)."""
    run_enroll(PROG, fail, **opts)


_DOCS = config_keys(GatewayConfig)
_TYPES = {"ethertype": lambda s: int(s, 0)}


def _run_options(fn):
    opts = [click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                         help="TOML config file (every key can be overridden below)."),
            click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
                         help=_DOCS["servers"] + " (repeat for several)."),
            click.option("--tunnel-peer", "tunnel_peers", multiple=True, metavar="ID=HOST:PORT",
                         help=_DOCS["tunnel_peers"] + " (repeat for several)."),
            click.option("--tunnel-path", "tunnel_paths", multiple=True, metavar="'PEER path=N local=.. remote=..'",
                         help=_DOCS["tunnel_paths"] + " (repeat for several).")]
    for name, doc in _DOCS.items():
        if name in ("servers", "tunnel_peers", "tunnel_paths"):
            continue
        if name in ("tunnel_offload", "tunnel_spray"):
            flag = name.replace("_", "-")
            on = getattr(GatewayConfig(), name)
            opts.append(click.option(f"--{flag}/--no-{flag}", name, default=None,
                                     help=doc + f" [default: {'on' if on else 'off'}]"))
        elif name in _TYPES:
            opts.append(click.option("--" + name.replace("_", "-"), name, type=_TYPES[name], help=doc))
        else:
            opts.append(config_option(GatewayConfig, name, show_default=False))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@cli.command()
@_run_options
def run(config_path, servers, tunnel_peers, tunnel_paths, **overrides) -> None:
    """Run the gateway in the foreground (SIGTERM or Ctrl-C stops it)."""
    from l2crypt.ops.daemon_shell import run_daemon

    from .daemon import Gateway

    overrides["servers"] = list(servers) if servers else None
    overrides["tunnel_peers"] = list(tunnel_peers) if tunnel_peers else None
    overrides["tunnel_paths"] = list(tunnel_paths) if tunnel_paths else None
    run_daemon(lambda: load_gateway_config(config_path, overrides), Gateway, fail)


@cli.command()
@click.option("--state-dir", default=None, help=f"The gateway's state directory [default: {DEFAULT_STATE_DIR}].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Take the state directory from this gateway config file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the status as JSON (with --watch: one line of rates each time).")
@click.option("--watch", is_flag=True, help="Show live rates per port (frames/s, bits/s) until Ctrl-C.")
@click.option("--interval", "interval_s", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop --watch after this many refreshes (0: at Ctrl-C).")
def status(state_dir, config_path, as_json, watch, interval_s, count) -> None:
    """Show the gateway's key server, ports, learned MACs, NETKEY version, counters and drops."""
    from l2crypt.agent.cli import show_status

    from .status_view import render_status
    from .status_view import watch as watch_rates

    show_status(state_dir, config_path, as_json, watch, interval_s, count, fail=fail,
                socket_name="gateway.sock", who="gateway", render=render_status, watch_rates=watch_rates,
                default_state_dir=DEFAULT_STATE_DIR)


@cli.command("check-config")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
def check_config(path) -> None:
    """Check a gateway config file; name every problem with its key (exit 2 if any)."""
    from .config import check_gateway_file

    problems = check_gateway_file(path)
    for problem in problems:
        click.echo(f"{PROG}: {problem}", err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{path}: ok")


def _endpoint(ctx, param, value):
    from .relay import parse_endpoint

    try:
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            return [tuple(parse_endpoint(v) for v in pair) for pair in value]
        return parse_endpoint(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option("--listen", required=True, metavar="HOST:PORT", callback=_endpoint,
              help="The relay's UDP address (an IPv4 address: the gateways send to it).")
@click.option("--join", "joins", multiple=True, required=True, nargs=2, metavar="A_HOST:PORT B_HOST:PORT",
              callback=_endpoint,
              help="Two gateway tunnel endpoints: a datagram from one (same IP and port) goes to the other "
                   "(repeat for several pairs; an endpoint stands in one join only).")
@click.option("--stats-interval-s", type=click.FloatRange(0.1, 86400), default=10.0, show_default=True,
              help="Seconds between two JSON lines of counters on stderr (one more at exit).")
@click.option("--stats-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the counters as a JSON document to this file (atomically) at each interval and at exit.")
@click.option("--max-datagram-bytes", type=click.IntRange(1, 65507), default=16384, show_default=True,
              help="Longer datagrams are dropped and counted (oversized).")
def relay(listen, joins, stats_interval_s, stats_file, max_datagram_bytes) -> None:
    """Forward sealed tunnel datagrams between gateways (one path of a multipath
    tunnel through a third host).  The relay holds no key and reads no datagram
    beyond its length; anything not from a joined endpoint, empty or oversized is
    dropped and counted.  Counters (forwarded datagrams and bytes per direction,
    drops per reason) go to stderr as JSON lines.  SIGTERM or Ctrl-C stops it."""
    from .relay import RelayTable, run_relay

    try:
        table = RelayTable(list(joins), max_datagram_bytes)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        run_relay(listen, table, stats_interval_s, stats_file)
    except OSError as exc:
        fail(str(exc))


def main(argv=None) -> None:
    run_click(cli, PROG, argv)
