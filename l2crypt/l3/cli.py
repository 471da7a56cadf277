"""``l2crypt l3-agent`` and ``l2crypt l3-status``: the layer-3 agent's commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from l2crypt.agent.config import DEFAULT_STATE_DIR, config_keys
from l2crypt.core.errors import L2cryptError
from l2crypt.ops.cli_options import key_client_cli_options, tuning_options

from .config import L3AgentConfig, load_l3_config


def _options(fn):
    docs = config_keys(L3AgentConfig)
    opts = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="TOML config file (every key can be overridden below)."),
        click.option("--mode", help=docs["mode"] + " [default: routed]"),
        click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
                     help=docs["servers"] + " (repeat for several)."),
        click.option("--state-dir", help=docs["state_dir"] + f" [default: {DEFAULT_STATE_DIR}]"),
        click.option("--pkcs11-pin-file", help=docs["pkcs11_pin_file"]),
        click.option("--address", "addresses", multiple=True, metavar="IP", help=docs["addresses"] + " (repeat)."),
        click.option("--prefix", "prefixes", multiple=True, metavar="CIDR", help=docs["prefixes"] + " (repeat)."),
        click.option("--udp-port", type=int, help=docs["udp_port"] + " [default: 7789]"),
        click.option("--queue-num", type=int, help=docs["queue_num"] + " [default: 7700]"),
        click.option("--table", help=docs["table"] + " [default: l2crypt_l3]"),
        click.option("--rules-backend", help=docs["rules_backend"] + " [default: auto]"),
        click.option("--fail-closed/--no-fail-closed", default=None, help=docs["fail_closed"] + " [default: on]"),
        *tuning_options(L3AgentConfig),
        click.option("--path-mtu", type=int, help=docs["path_mtu"] + " [default: 1500]"),
        click.option("--nat-keepalive-s", type=float, help=docs["nat_keepalive_s"] + " [default: 25]"),
        *key_client_cli_options(L3AgentConfig),
        click.option("--log-level", help=docs["log_level"] + " [default: info]"),
        click.option("--log-format", help=docs["log_format"] + " [default: text]"),
        click.option("--metrics-listen", help=docs["metrics_listen"] + " [default: 127.0.0.1:9481]"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def register(cli: click.Group, fail) -> None:
    """Add the layer-3 commands to the ``l2crypt`` group."""

    @cli.command("l3-agent")
    @_options
    def l3_agent(config_path, servers, addresses, prefixes, **overrides) -> None:
        """Run the layer-3 agent: seal IPv4 and IPv6 traffic to the policy
        prefixes (routed: IP protocol 253; nat: over UDP) through NFQUEUE, and
        refuse plain packets from them."""
        from l2crypt.ops.daemon_shell import run_daemon
        from .agent import L3Agent

        overrides["servers"] = list(servers) if servers else None
        overrides["addresses"] = list(addresses) if addresses else None
        overrides["prefixes"] = list(prefixes) if prefixes else None
        run_daemon(lambda: load_l3_config(config_path, overrides), L3Agent, fail)

    @cli.command("l3-status")
    @click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, help="The agent's state directory.")
    def l3_status(state_dir) -> None:
        """Show the running layer-3 agent's peers, keys, endpoints and counters (JSON)."""
        from l2crypt.ops.control import query_status

        try:
            doc = query_status(Path(state_dir) / "l3-agent.sock")
        except L2cryptError as exc:
            fail(str(exc))
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
