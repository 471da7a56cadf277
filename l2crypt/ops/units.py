"""systemd units shipped with the package, and ``l2crypt install-units``.

1. Every ``*.service`` file in ``l2crypt/ops/systemd/`` is a unit: the agent
   template (``l2crypt-agent@.service``, one instance per wire port), the key
   server (``keyserverd.service``) and the gateway (``l2crypt-gateway.service``).
2. The files name the commands as ``/usr/local/bin/NAME``; ``install-units``
   rewrites that to the directory the commands are really installed in.
3. They are written to ``PREFIX/etc/systemd/system`` (PREFIX ``/`` by default),
   mode 0644; ``--dry-run`` only says what it would write.
4. With ``--networkd``, the host's network set-up for systemd-networkd
   goes to ``PREFIX/etc/systemd/network``: ``l2c0.netdev`` (the persistent
   TAP) and ``l2c0.network`` (its addresses, or DHCP), rendered from the
   examples shipped beside the units for the TAP name and addresses given.
   They are the operator's files: an existing one that differs is replaced
   only with ``--force``.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from l2crypt.core.errors import ConfigError, LocalError

SHIPPED_BIN_DIR = "/usr/local/bin/"
UNIT_DIR = "etc/systemd/system"
NETWORK_DIR = "etc/systemd/network"
SHIPPED_TAP = "l2c0"


def shipped_units() -> dict[str, str]:
    """Unit file name -> text, as shipped in the package."""
    folder = resources.files("l2crypt.ops") / "systemd"
    return {p.name: p.read_text() for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".service")}


def default_bin_dir() -> Path:
    """Where ``l2crypt`` and ``keyserverd`` are installed (the running script's directory)."""
    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    if here is not None and (here / "l2crypt").exists():
        return here
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "l2crypt").exists():
        return venv_bin
    return Path(sysconfig.get_path("scripts"))


def render_units(bin_dir: Path) -> dict[str, str]:
    """The shipped units with ``/usr/local/bin/`` replaced by ``bin_dir``."""
    prefix = str(bin_dir).rstrip("/") + "/"
    return {name: text.replace(SHIPPED_BIN_DIR, prefix) for name, text in shipped_units().items()}


def shipped_network_files() -> dict[str, str]:
    """``l2c0.netdev`` and ``l2c0.network``, the systemd-networkd examples."""
    folder = resources.files("l2crypt.ops") / "systemd"
    return {name: (folder / name).read_text() for name in (f"{SHIPPED_TAP}.netdev", f"{SHIPPED_TAP}.network")}


def render_network_files(tap: str, addresses: tuple[str, ...] = (), dhcp: bool = False) -> dict[str, str]:
    """The networkd pair for TAP ``tap``: the examples' ``Address=`` lines
    replaced by ``addresses`` (ADDR/PREFIX, IPv4 or IPv6) or by ``DHCP=yes``."""
    if not addresses and not dhcp:
        raise ConfigError("--networkd needs the host's addresses on the TAP (--address ADDR/PREFIX) or --dhcp")
    lines = []
    for text in addresses:
        if "/" not in text:
            raise ConfigError(f"--address: want ADDR/PREFIX, got {text!r}")
        try:
            lines.append(f"Address={ipaddress.ip_interface(text).with_prefixlen}")
        except ValueError:
            raise ConfigError(f"--address: not an address with a prefix: {text!r}") from None
    if dhcp:
        lines.append("DHCP=yes")
    out = {}
    for name, text in shipped_network_files().items():
        body, done = [], False
        for line in text.splitlines():
            if line.startswith("Address="):
                if not done:
                    body.extend(lines)
                    done = True
                continue
            body.append(f"Name={tap}" if line == f"Name={SHIPPED_TAP}" else line)
        out[name.replace(SHIPPED_TAP, tap, 1)] = "\n".join(body) + "\n"
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror or exc}") from None


def _mkdir(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"cannot create {target}: {exc.strerror or exc}") from None


def install_units(prefix: Path, bin_dir: Path, dry_run: bool = False,
                  network: dict[str, str] | None = None, force: bool = False) -> list[Path]:
    """Write the units (and ``network``, the networkd pair of ``render_network_files``)
    under ``prefix``; returns the paths (written or, dry run, to write)."""
    files = {Path(prefix) / UNIT_DIR / name: text for name, text in render_units(bin_dir).items()}
    for name, text in (network or {}).items():
        path = Path(prefix) / NETWORK_DIR / name
        try:
            differs = path.read_text() != text
        except FileNotFoundError:
            differs = False
        except OSError as exc:
            raise LocalError(f"cannot read {path}: {exc.strerror or exc}") from None
        if differs and not force:
            raise LocalError(f"{path} exists and differs; --force replaces it")
        files[path] = text
    if not dry_run:
        for folder in sorted({path.parent for path in files}):
            _mkdir(folder)
        for path, text in files.items():
            _write(path, text)
    return list(files)
