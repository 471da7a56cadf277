"""Gateway configuration: one frozen dataclass, loaded from one TOML file.

Every field can be overridden on the command line (``l2crypt-gateway run --help``).
Errors name the key: ``gateway.toml: group_crossing: want one of basic, all, none, got 'x'``.

Example ``/etc/l2crypt/gateway.toml``::

    encrypted_port = "eth0"            # on the encrypted segment
    plain_port = "eth1"                # full-decrypt uplink (optional)
    servers = ["10.0.0.1:7788"]
    state_dir = "/var/lib/l2crypt-gateway"
    tunnel_listen = "192.0.2.1:4789"   # inter-subnet port (optional)
    tunnel_peers = ["gw-b=198.51.100.1:4789"]   # the peer gateway's enrolled ID
    group_crossing = "basic"
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2crypt.agent.config import (
    DATAPATHS,
    DaemonKeys,
    FrameTuning,
    PKCS11_PIN_FILE_DOC,
    check_bool,
    check_choice,
    check_ethertype,
    check_iface,
    check_int_range,
    check_opt_path,
    check_path,
    check_seconds,
    check_servers,
    config_problems,
    load_config,
    metrics_listen_setting,
    parse_hostport,
    read_toml,
    setting,
    wire_ring_setting,
)
from l2crypt.core.constants import DEFAULT_ETHERTYPE
from l2crypt.core.errors import ConfigError
from l2crypt.core.tunnel_keys import sender_tag

from .group_policy import GROUP_CROSSING
from .path_config import MODES, PathSpec, check_paths, parse_path

DEFAULT_STATE_DIR = "/var/lib/l2crypt-gateway"
DEFAULT_CONFIG_PATH = "/etc/l2crypt/gateway.toml"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9480"
PEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def _opt_iface(value: Any) -> str | None:
    return None if value in (None, "") else check_iface(value)


def _opt_hostport(value: Any) -> str:
    if value != "":
        parse_hostport(value, default_port=0)
    return value


def _peers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError("want a list of ID=HOST:PORT strings")
    names, tags = set(), {}
    for item in value:
        name, sep, addr = str(item).partition("=")
        if not sep or not PEER_NAME.match(name):
            raise ValueError(f"not ID=HOST:PORT (ID: the peer gateway's enrolled ID, up to 32 characters): {item!r}")
        if parse_hostport(addr, default_port=0)[1] == 0:
            raise ValueError(f"{item!r}: the peer needs a port")
        if name in names:
            raise ValueError(f"peer {name!r} given twice")
        tag = sender_tag(name)
        if tag in tags:
            raise ValueError(f"peers {tags[tag]!r} and {name!r} have the same tunnel sender tag; rename one")
        names.add(name)
        tags[tag] = name
    return tuple(value)


@dataclass(frozen=True)
class GatewayConfig(FrameTuning, DaemonKeys):
    """Settings of one gateway; the engine tuning keys (its frame engines and
    the tunnel) come from ``FrameTuning``."""

    encrypted_port: str = setting(None, check_iface, "port on the encrypted segment (sealed frames only)")
    plain_port: str | None = setting(None, _opt_iface, "full-decrypt uplink toward a plain network (optional)")
    servers: tuple = setting(None, check_servers, "key servers, HOST:PORT, in order of priority")
    state_dir: str = setting(DEFAULT_STATE_DIR, check_path, "certificate, clock floor, replay floors and control socket")
    pkcs11_pin_file: str = setting("", check_opt_path, PKCS11_PIN_FILE_DOC)
    tunnel_listen: str = setting("", _opt_hostport, "local HOST:PORT of the inter-subnet UDP port ('' = none)")
    tunnel_peers: tuple = setting((), _peers, "peer gateways of the NETKEY peer segment, ID=HOST:PORT "
                             "(ID: the peer gateway's enrolled ID)")
    tunnel_paths: tuple = setting((), check_paths, "more paths to tunnel peers (several uplinks, or a relay): "
                                  "'PEER path=N local=HOST:PORT remote=HOST:PORT [weight=W]', path 1-15 (0 is "
                                  "the tunnel_peers address), the same IDs at both ends; each path has its own keys")
    tunnel_mode: str = setting("split", check_choice(MODES),
                               "how frames use a peer's paths: split (each flow on one path, flows spread by the "
                               "paths' measured weights), redundant (every frame on the two best paths, the "
                               "duplicate dropped) or fec (split, plus one XOR parity frame per tunnel_fec_k)")
    tunnel_spray: bool = setting(False, check_bool,
                                 "split mode: spread single frames rather than flows over the paths (per-packet "
                                 "spraying; the receiver puts them back in order, waiting at most tunnel_reorder_ms)")
    tunnel_fec_k: int = setting(4, check_int_range(2, 32), "fec mode: frames per parity frame")
    tunnel_probe_interval_s: float = setting(0.05, check_seconds(0.01, 10.0),
                                             "authenticated probe on each path every this many seconds")
    tunnel_probe_misses: int = setting(6, check_int_range(2, 100),
                                       "a path without an answer for this many probe intervals is taken out")
    tunnel_weight_interval_s: float = setting(1.0, check_seconds(0.1, 60.0),
                                              "path weights are re-computed from RTT, loss and delivered rate "
                                              "this often, seconds")
    tunnel_path_holddown_s: float = setting(3.0, check_seconds(0.0, 600.0),
                                            "a path taken out comes back after answering probes for this long")
    tunnel_reorder_ms: float = setting(30.0, check_seconds(1.0, 1000.0),
                                       "most a sprayed frame waits for an earlier one, milliseconds")
    tunnel_offload: bool = setting(False, check_bool,
                                   "tunnel socket with UDP GSO (the datagrams of one batch to a peer in one send) "
                                   "and UDP GRO (many datagrams in one receive); falls back to one datagram per "
                                   "system call if the kernel refuses")
    group_crossing: str = setting("basic", check_choice(GROUP_CROSSING),
                             "which broadcast/multicast frames cross: basic (ARP, DHCP, IPv6 ND), all or none")
    max_learned_macs: int = setting(4096, check_int_range(1, 1 << 20), "most MACs the gateway speaks for")
    mac_ageing_s: float = setting(300.0, check_seconds(1.0, 86400.0),
                             "a learned MAC without traffic for this long is forgotten (and released "
                             "at the key server), seconds")
    refused_cache_s: float = setting(30.0, check_seconds(0.0, 3600.0), "how long a refused MAC stays refused, seconds")
    wire_ring: str = wire_ring_setting("encrypted port")
    datapath: str = setting("simple", check_choice(DATAPATHS),
                            "plain port: simple (one frame per read and write, GRO and LRO off) or batched "
                            "(PACKET_VNET_HDR, GRO on: received super-frames cut into segments that fit the "
                            "encrypted port, sent segments joined into super-frames the kernel cuts); batched "
                            "falls back to simple if the kernel refuses PACKET_VNET_HDR")
    ethertype: int = setting(DEFAULT_ETHERTYPE, check_ethertype, "EtherType of sealed frames")
    metrics_listen: str = metrics_listen_setting(DEFAULT_METRICS_LISTEN)

    @property
    def socket_path(self) -> Path:
        return Path(self.state_dir) / "gateway.sock"

    def peer_addresses(self) -> dict[str, tuple[str, int]]:
        out = {}
        for item in self.tunnel_peers:
            name, _, addr = item.partition("=")
            out[name] = parse_hostport(addr, default_port=0)
        return out

    def path_specs(self) -> list[PathSpec]:
        """Every path of every tunnel peer: path 0 of each ``tunnel_peers`` entry, then ``tunnel_paths``."""
        specs = []
        if self.tunnel_listen:
            local = parse_hostport(self.tunnel_listen, default_port=0)
            specs += [PathSpec(name, 0, local, addr) for name, addr in self.peer_addresses().items()]
        return specs + [parse_path(item) for item in self.tunnel_paths]

    def tunnel_peer_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.peer for spec in self.path_specs()))

    def tunnel_path_ids(self) -> dict[str, tuple[int, ...]]:
        """The path IDs of each peer, in config order."""
        out: dict[str, tuple[int, ...]] = {}
        for spec in self.path_specs():
            out[spec.peer] = out.get(spec.peer, ()) + (spec.path,)
        return out


REQUIRED = ("encrypted_port", "servers")


def _cross_problems(values: dict, source: str) -> list[str]:
    """Problems between keys (each named): checked after every key is valid on its own."""
    problems = []
    if values.get("tunnel_peers") and not values.get("tunnel_listen"):
        problems.append(f"{source}: tunnel_listen: missing (tunnel_peers need a local UDP port)")
    with_address = {item.partition("=")[0] for item in values.get("tunnel_peers") or ()}
    for item in values.get("tunnel_paths") or ():
        spec = parse_path(item)
        if spec.path == 0 and spec.peer in with_address:
            problems.append(f"{source}: tunnel_paths: {item!r}: path 0 of {spec.peer!r} is its tunnel_peers "
                            "address; number this one 1-15")
    if values.get("plain_port") and values.get("plain_port") == values.get("encrypted_port"):
        problems.append(f"{source}: plain_port: must differ from encrypted_port")
    return problems


def check_gateway_file(path: str) -> list[str]:
    """Every problem of a gateway config file (``l2crypt-gateway check-config``); [] when valid."""
    try:
        values = read_toml(path)
    except ConfigError as exc:
        return [str(exc)]
    checked, problems = config_problems(GatewayConfig, values, str(path), REQUIRED)
    return problems + _cross_problems(checked, str(path))


def load_gateway_config(path: str | None, overrides: dict) -> GatewayConfig:
    """File values first, then CLI overrides (see ``l2crypt.agent.config.load_config``),
    then the rules that involve more than one key."""
    config = load_config(GatewayConfig, path, overrides, REQUIRED)
    source = f"{path} (+ command line)" if path and any(v is not None for v in overrides.values()) \
        else (str(path) if path else "command line")
    problems = _cross_problems(dataclasses.asdict(config), source)
    if problems:
        raise ConfigError(problems[0])
    return config
