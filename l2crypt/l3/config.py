"""Configuration of the layer-3 agent (``l2crypt l3-agent``): one frozen
dataclass, loaded from one TOML file, every field overridable on the command
line.  Example::

    mode = "routed"                    # or "nat"
    servers = ["10.67.0.1:7788"]
    state_dir = "/var/lib/l2crypt"     # the enrollment of ``l2crypt enroll``
    addresses = ["10.71.0.2", "fd71::2"]      # this host's addresses, bound to its ID
    prefixes = ["10.72.0.0/24", "fd72::/64"]  # the policy: traffic to these is sealed
    fail_closed = true
    path_mtu = 1500                    # sealed packets are kept within it
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2crypt.agent.config import (
    DaemonKeys,
    DEFAULT_STATE_DIR,
    EngineTuning,
    PKCS11_PIN_FILE_DOC,
    check_choice,
    check_int_range,
    check_opt_path,
    check_path,
    check_seconds,
    check_servers,
    load_config,
    metrics_listen_setting,
    setting,
)
from l2crypt.core.constants import DEFAULT_WIRE_MTU
from l2crypt.core.ks_messages import MAX_PEER_IPS
from l2crypt.core.l3_types import DEFAULT_NAT_KEEPALIVE_S
from l2crypt.io.nft_rules import BACKENDS, check_table_name

# Tuning constants (defaults) of the layer-3 agent.
DEFAULT_L3_UDP_PORT = 7789
DEFAULT_QUEUE_NUM = 7700
DEFAULT_TABLE = "l2crypt_l3"
DEFAULT_L3_METRICS_LISTEN = "127.0.0.1:9481"


def _str_list(value: Any) -> list:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("want a non-empty list")
    return list(value)


def _addresses(value: Any) -> tuple:
    out = []
    for item in _str_list(value):
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise ValueError(f"not an IP address: {item!r}") from None
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback or (ip.version == 6 and ip.is_link_local):
            raise ValueError(f"{item} is not a unicast host address (link-local IPv6 ones are not unique)")
        out.append(str(ip))
    if len(out) > MAX_PEER_IPS:
        raise ValueError(f"at most {MAX_PEER_IPS} addresses")
    return tuple(out)


def _prefixes(value: Any) -> tuple:
    out = []
    for item in _str_list(value):
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            raise ValueError(f"not an IP prefix: {item!r} ({exc})") from None
    return tuple(out)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"want true or false, got {value!r}")


def _table(value: Any) -> str:
    return check_table_name(value)


@dataclass(frozen=True)
class L3AgentConfig(EngineTuning, DaemonKeys):
    """Settings of one layer-3 agent (one policy, one NFQUEUE, one nft table);
    the engine tuning keys come from ``EngineTuning`` (frames are packets here)."""

    mode: str = setting("routed", check_choice(("routed", "nat")),
                   "routed (IP header kept, protocol 253) or nat (sealed packet over UDP)")
    servers: tuple = setting(None, check_servers, "key servers, HOST:PORT, in order of priority")
    state_dir: str = setting(DEFAULT_STATE_DIR, check_path, "certificates, clock floor and control socket")
    pkcs11_pin_file: str = setting("", check_opt_path, PKCS11_PIN_FILE_DOC)
    addresses: tuple = setting(None, _addresses, "this host's IPv4 and IPv6 addresses, bound to its ID at the key server")
    prefixes: tuple = setting(None, _prefixes, "policy: IPv4 and IPv6 prefixes whose traffic is sealed (CIDR)")
    udp_port: int = setting(DEFAULT_L3_UDP_PORT, check_int_range(1, 65535), "nat mode: UDP port of sealed packets")
    queue_num: int = setting(DEFAULT_QUEUE_NUM, check_int_range(0, 65535), "NFQUEUE number the agent listens on")
    table: str = setting(DEFAULT_TABLE, _table, "name of this instance's rule set (nft table / iptables chains)")
    rules_backend: str = setting("auto", check_choice(BACKENDS), "auto (nft if the kernel has nft_queue, else iptables), nft or iptables")
    fail_closed: bool = setting(True, _bool, "on stop, keep dropping the policy's traffic (true) or remove the rules")
    path_mtu: int = setting(DEFAULT_WIRE_MTU, check_int_range(576, 65535),
                       "MTU of the path between the hosts, bytes: sealed packets are kept within it "
                       "(TCP MSS clamp; larger packets that may not be fragmented are dropped: too_big)")
    nat_keepalive_s: float = setting(DEFAULT_NAT_KEEPALIVE_S, check_seconds(0.0, 3600.0),
                                "nat mode: a sealed keepalive on every path idle this long, seconds; 0 = off")
    metrics_listen: str = metrics_listen_setting(DEFAULT_L3_METRICS_LISTEN)

    @property
    def socket_path(self) -> Path:
        return Path(self.state_dir) / "l3-agent.sock"


REQUIRED = ("servers", "addresses", "prefixes")


def load_l3_config(path: str | None, overrides: dict) -> L3AgentConfig:
    """The layer-3 agent's config (see ``config.load_config``)."""
    return load_config(L3AgentConfig, path, overrides, REQUIRED)
