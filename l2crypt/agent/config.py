"""Agent configuration: one frozen dataclass, loaded from one TOML file.

Every field can be overridden on the command line (``l2crypt agent --help``).
Errors name the key: ``agent.toml: hold_frames: want an integer, got 'many'``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2crypt.core import aead
from l2crypt.core.constants import (
    DEFAULT_ETHERTYPE,
    DEFAULT_HOLD_AGE_S,
    DEFAULT_HOLD_FRAMES,
    DEFAULT_KEY_MAX_AGE_S,
    DEFAULT_KEY_RETRY_MAX_S,
    DEFAULT_KEY_REQUESTS_PER_S,
    DEFAULT_KEY_RETRY_S,
    DEFAULT_MAX_PENDING_KEYS,
    DEFAULT_KEYSERVER_PORT,
    DEFAULT_REKEY_AFTER_FRAMES,
    DEFAULT_REPLAY_WINDOW_FRAMES,
    DEFAULT_RETIRE_AFTER_S,
    DEFAULT_SWITCH_AFTER_S,
    DEFAULT_UNKNOWN_CACHE_S,
)
from l2crypt.core.errors import ConfigError
from l2crypt.core.failover import RECONNECT_JITTER_S, RECONNECT_MAX_S
from l2crypt.core.frame_wire import parse_mac

DEFAULT_CONFIG_PATH = "/etc/l2crypt/agent.toml"
DEFAULT_STATE_DIR = "/var/lib/l2crypt"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9478"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DATAPATHS = ("simple", "batched")
WIRE_RINGS = ("off", "v2", "v3")


def parse_hostport(text: str, default_port: int = DEFAULT_KEYSERVER_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST``; raises ValueError."""
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        raise ValueError(f"not HOST:PORT: {text!r}")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"not HOST:PORT: {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"not HOST:PORT: {text!r} (write IPv6 as [addr]:port)")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def check_iface(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 15 or "/" in value or any(c.isspace() for c in value):
        raise ValueError(f"not an interface name (1-15 characters): {value!r}")
    return value


def check_servers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("want a list of HOST:PORT strings")
    for item in value:
        parse_hostport(item)
    return tuple(value)


def _mac(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"want a MAC address string, got {value!r}")
    mac = parse_mac(value)
    if mac[0] & 1:
        raise ValueError(f"{value} is a group address; a host needs a unicast MAC")
    return value


def check_ethertype(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0x0600 <= value <= 0xFFFF:
        raise ValueError(f"want an EtherType 0x0600-0xffff, got {value!r}")
    return value


def check_choice(options):
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"want one of {', '.join(options)}, got {value!r}")
        return value
    return check


def check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"want true or false, got {value!r}")
    return value


def _cipher(value: Any) -> str:
    return aead.check_cipher(value)


def check_int_range(lo: int, hi: int):
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"want an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"want {lo}..{hi}, got {value}")
        return value
    return check


def check_seconds(lo: float, hi: float):
    def check(value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"want a number of seconds, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"want {lo}..{hi} seconds, got {value}")
        return float(value)
    return check


def check_path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"want a path, got {value!r}")
    return value


def check_opt_path(value: Any) -> str:
    """A path, or "" for none."""
    if not isinstance(value, str):
        raise ValueError(f"want a path or \"\", got {value!r}")
    return value


#: The doc of ``pkcs11_pin_file`` (agent, layer-3 agent and gateway alike).
PKCS11_PIN_FILE_DOC = ("file holding the user PIN of the token the host key is on (enrolled with "
                       "--pkcs11-module); \"\" = the systemd credential pkcs11-pin; unused with a key file")


def check_metrics_listen(value: Any) -> str:
    from l2crypt.ops.metrics import parse_listen

    if not isinstance(value, str):
        raise ValueError(f'want "HOST:PORT" or "" (off), got {value!r}')
    parse_listen(value)
    return value


def setting(default, check, doc):
    return field(default=default, metadata={"check": check, "doc": doc})


KEY_CLIENT_KEYS = ("probe_interval_s", "probe_failures", "failback_holddown_s", "reconnect_jitter_s", "reconnect_max_s")


def wire_ring_setting(port: str):
    """``wire_ring`` of the agent (its wire port) and of the gateway (its encrypted port)."""
    return setting("off", check_choice(WIRE_RINGS),
                   f"{port} over PACKET_MMAP rings: off (one send/recv per frame), v2 (TPACKET_V2 "
                   "receive slots) or v3 (TPACKET_V3 receive blocks: about 1 ms more round trip on "
                   "sparse traffic); falls back to off if the kernel refuses the rings")


def key_client_options(config) -> dict[str, float]:
    """The failover and reconnect keys of a daemon's config (or config class), as its key client takes them."""
    return {name: getattr(config, name) for name in KEY_CLIENT_KEYS}


def metrics_listen_setting(default: str):
    return setting(default, check_metrics_listen, 'Prometheus endpoint HOST:PORT (GET /metrics); "" turns it off')


@dataclass(frozen=True)
class DaemonKeys:
    """The keys every daemon (host agent, layer-3 agent, gateway) takes with one
    meaning, range and default: key-server failover and reconnects, logging,
    metrics (each daemon has its own default port: it sets ``metrics_listen``
    again)."""

    probe_interval_s: float = setting(5.0, check_seconds(0.05, 600.0),
                                      "seconds between pings of the key server in use (and of better ones)")
    probe_failures: int = setting(3, check_int_range(1, 100),
                                  "missed pongs in a row before failing over to the next server")
    failback_holddown_s: float = setting(30.0, check_seconds(0.0, 86400.0),
                                         "seconds a higher-priority server must answer before the daemon returns to it")
    reconnect_jitter_s: float = setting(RECONNECT_JITTER_S, check_seconds(0.0, 600.0),
                                        "longest random wait before connecting again after a session ends, "
                                        "seconds (spreads the reconnects of many hosts)")
    reconnect_max_s: float = setting(RECONNECT_MAX_S, check_seconds(0.2, 3600.0),
                                     "ceiling of the doubling wait between rounds in which no key server "
                                     "answered, seconds")
    log_level: str = setting("info", check_choice(LOG_LEVELS), "debug, info, warning or error")
    log_format: str = setting("text", check_choice(LOG_FORMATS), "text or json")
    metrics_listen: str = metrics_listen_setting(DEFAULT_METRICS_LISTEN)


@dataclass(frozen=True)
class EngineTuning:
    """The engine tuning keys every daemon takes (host agent, layer-3 agent,
    gateway), with one meaning, range and default each.  A *frame* is a
    packet for the layer-3 agent, a *MAC* a peer (by IP or ID).  The daemons'
    configs inherit these fields; ``tuning_values`` hands them to the engine
    settings."""

    replay_window_frames: int = setting(DEFAULT_REPLAY_WINDOW_FRAMES, check_int_range(64, 1 << 20),
                                        "frames of reordering a replay window accepts")
    hold_frames: int = setting(DEFAULT_HOLD_FRAMES, check_int_range(0, 1024),
                               "frames held per MAC while its key is requested")
    hold_age_s: float = setting(DEFAULT_HOLD_AGE_S, check_seconds(0.0, 60.0), "longest a frame is held, seconds")
    key_retry_s: float = setting(DEFAULT_KEY_RETRY_S, check_seconds(0.05, 60.0), "first key request retry, seconds")
    key_retry_max_s: float = setting(DEFAULT_KEY_RETRY_MAX_S, check_seconds(0.05, 600.0),
                                     "key request backoff ceiling, seconds")
    max_pending_keys: int = setting(DEFAULT_MAX_PENDING_KEYS, check_int_range(2, 1 << 20),
                                    "MACs waiting for a key at once; frames to more are dropped (pending_full)")
    key_requests_per_s: float = setting(DEFAULT_KEY_REQUESTS_PER_S, check_seconds(1.0, 100000.0),
                                        "key requests sent per second at most")
    unknown_cache_s: float = setting(DEFAULT_UNKNOWN_CACHE_S, check_seconds(0.0, 3600.0),
                                     "how long an 'unknown MAC' answer is believed, seconds")
    switch_after_s: float = setting(DEFAULT_SWITCH_AFTER_S, check_seconds(0.0, 600.0),
                                    "longest a sender keeps the old key after a new version arrives, seconds")
    retire_after_s: float = setting(DEFAULT_RETIRE_AFTER_S, check_seconds(0.0, 3600.0),
                                    "how long an old key version is still accepted after the switch, seconds")
    rekey_after_frames: int = setting(DEFAULT_REKEY_AFTER_FRAMES, check_int_range(16, 2**62),
                                      "frames sent under one pair key before the daemon asks for a new one")


@dataclass(frozen=True)
class FrameTuning(EngineTuning):
    """``EngineTuning`` plus the keys only the layer-2 frame engines have (host agent, gateway)."""

    key_max_age_s: float = setting(DEFAULT_KEY_MAX_AGE_S, check_seconds(60.0, 30 * 86400.0),
                                   "longest a key version is used after the key server made it, seconds "
                                   "(the server's key_max_age_s wins if lower)")


def tuning_values(config: EngineTuning) -> dict[str, Any]:
    """The tuning keys ``config`` has (``EngineTuning``, and ``FrameTuning``'s
    if it is one), by name: what an ``EngineSettings`` or ``L3Settings`` takes."""
    cls = FrameTuning if isinstance(config, FrameTuning) else EngineTuning
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class AgentConfig(FrameTuning, DaemonKeys):
    """Settings of one host agent (one wire port, one TAP)."""

    port: str = setting(None, check_iface, "wire port: the physical interface toward the switch")
    tap: str = setting("l2c0", check_iface, "name of the TAP device the host's stack uses; persistent, it stays "
                                  "(with the host's addresses) when the agent stops")
    servers: tuple = setting(None, check_servers, "key servers, HOST:PORT, in order of priority")
    state_dir: str = setting(DEFAULT_STATE_DIR, check_path, "certificates, packet clock, replay floors, TAP MAC (tap.mac) and control socket")
    pkcs11_pin_file: str = setting("", check_opt_path, PKCS11_PIN_FILE_DOC)
    tap_mac: str | None = setting(None, _mac, "MAC of the TAP; default: the one kept in state_dir/tap.mac, "
                                          "else an existing TAP's, else a random one (then kept)")
    wire_mtu: int = setting(0, check_int_range(0, 65535), "MTU of the wire port in bytes; 0 = use the port's")
    datapath: str = setting("simple", check_choice(DATAPATHS),
                            "simple (one frame per TAP read and write) or batched (TAP with IFF_VNET_HDR and "
                            "TCP/checksum offloads: super-frames cut into segments, received segments joined); "
                            "batched falls back to simple if the kernel refuses the offloads")
    wire_ring: str = wire_ring_setting("wire port")
    datapath_process: bool = setting(False, check_bool,
                                     "run the frame path (TAP <-> seal/open <-> wire) in a process of its own, "
                                     "so the key client, control socket and metrics never delay a frame; if "
                                     "that process dies the agent stops (frames stay blocked)")
    ethertype: int = setting(DEFAULT_ETHERTYPE, check_ethertype, "EtherType of sealed frames")

    @property
    def socket_path(self) -> Path:
        return Path(self.state_dir) / "agent.sock"


REQUIRED = ("port", "servers")


def config_keys(cls=AgentConfig) -> dict[str, str]:
    """Every config key with its one-line description, the daemon's own first and
    the ``DaemonKeys`` last (the order of ``--help``; the docs test uses it too)."""
    common = {f.name for f in dataclasses.fields(DaemonKeys)}
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name in common)  # stable: each group keeps its order
    return {f.name: f.metadata["doc"] for f in fields}


def read_toml(path: str | Path) -> dict:
    """Read a TOML file; a missing or broken file is a ConfigError naming it."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None


def config_problems(cls, values: dict, source: str, required=()) -> tuple[dict, list[str]]:
    """Check ``values`` against ``cls``'s fields: (checked values, every problem).

    Each problem is one line ``SOURCE: KEY: what is wrong``: unknown keys,
    wrong types or values, and required keys that are missing or empty.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out, problems = {}, []
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{source}: {key}: unknown key")
            continue
        if value is None:
            continue
        try:
            out[key] = fields[key].metadata["check"](value)
        except ValueError as exc:
            if value in ("", []) and key in required:
                problems.append(f"{source}: {key}: missing (empty)")
            else:
                problems.append(f"{source}: {key}: {exc}")
    for key in required:
        if key not in values or values[key] is None:
            problems.append(f"{source}: {key}: missing (set it in the file or on the command line)")
    return out, problems


def build_config(cls, values: dict, source: str, required=()):
    """Check ``values`` against ``cls``'s fields; one ConfigError naming every bad key."""
    out, problems = config_problems(cls, values, source, required)
    if problems:
        raise ConfigError(problems[0] + "".join(f"; {p.removeprefix(source + ': ')}" for p in problems[1:]))
    return cls(**out)


def check_agent_file(path: str) -> list[str]:
    """Every problem of an agent config file (``l2crypt check-config``); [] when valid."""
    try:
        values = read_toml(path)
    except ConfigError as exc:
        return [str(exc)]
    return config_problems(AgentConfig, values, str(path), REQUIRED)[1]


def load_config(cls, path: str | None, overrides: dict, required=()):
    """A ``cls`` config: the file's values first, then CLI overrides (None
    means 'not given'); ConfigError naming the key on any problem."""
    values: dict = {}
    source = "command line"
    if path:
        values = read_toml(path)
        source = str(path)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given and path:
        source = f"{path} (+ command line)"
    values.update(given)
    return build_config(cls, values, source, required)


def load_agent_config(path: str | None, overrides: dict) -> AgentConfig:
    """The agent's config (see ``load_config``)."""
    return load_config(AgentConfig, path, overrides, REQUIRED)
