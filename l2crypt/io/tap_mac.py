"""The TAP's MAC, kept in the state directory so it outlives the agent.

The key server binds the first MAC a host presents to that host for good, so
the MAC must never change: not on a restart, not on a reboot that makes a
new TAP.  The agent decides it once and keeps it in ``STATE_DIR/tap.mac``
(one line, ``02:1a:2b:3c:4d:5e``; a state directory is one enrolled host, so
one MAC):

1. a configured ``tap_mac`` wins (and replaces what is stored);
2. else the stored MAC;
3. else the MAC of an existing TAP of that name (one the host's network
   manager made before the first start);
4. else the MAC the kernel gives a new TAP.

The agent then sets that MAC on the TAP when the TAP has another one (a
network manager that makes the TAP at boot gives it a fresh random MAC), and
stores it.  ``choose_mac`` is the pure decision; the two others touch the file.
"""

from __future__ import annotations

from pathlib import Path

from l2crypt.core.errors import LocalError
from l2crypt.core.frame_wire import format_mac, parse_mac

from .state_file import write_atomic

FILE_NAME = "tap.mac"


def mac_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / FILE_NAME


def read_stored_mac(state_dir: str | Path) -> bytes | None:
    """The stored TAP MAC, None when there is none yet; LocalError when the
    file cannot be read or does not hold one unicast MAC."""
    path = mac_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"{path}: cannot read the stored TAP MAC: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        mac = parse_mac(text.strip())
    except ValueError:
        mac = None
    if mac is None or mac[0] & 1 or mac == bytes(6):
        raise LocalError(
            f"{path}: not a unicast MAC address ({text.strip()[:40]!r}). It keeps the MAC the key server bound to "
            f"this host: write that MAC back (keyserverd host list shows it), or set tap_mac")
    return mac


def store_mac(state_dir: str | Path, mac: bytes) -> None:
    """Write ``mac`` to the state directory (atomically, fsynced, mode 0600)."""
    path = mac_path(state_dir)
    try:
        write_atomic(path, (format_mac(mac) + "\n").encode())
    except OSError as exc:
        raise LocalError(f"{path}: cannot store the TAP MAC: {exc.strerror or exc}") from None


def choose_mac(configured: bytes | None, stored: bytes | None, existing: bytes | None) -> tuple[bytes | None, str]:
    """The MAC the TAP must have and where it comes from (``config``, ``state``,
    ``tap`` or ``kernel``); None with ``kernel``: keep what a new TAP gets."""
    if configured is not None:
        return configured, "config"
    if stored is not None:
        return stored, "state"
    if existing is not None:
        return existing, "tap"
    return None, "kernel"
