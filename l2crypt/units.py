"""systemd units shipped with the package, and ``l2crypt install-units``.

1. Every ``*.service`` file in ``l2crypt/systemd/`` is a unit: the agent
   template (``l2crypt-agent@.service``, one instance per wire port), the key
   server (``keyserverd.service``) and the gateway (``l2crypt-gateway.service``).
2. The files name the commands as ``/usr/local/bin/NAME``; ``install-units``
   rewrites that to the directory the commands are really installed in.
3. They are written to ``PREFIX/etc/systemd/system`` (PREFIX ``/`` by default),
   mode 0644; ``--dry-run`` only says what it would write.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from .errors import LocalError

SHIPPED_BIN_DIR = "/usr/local/bin/"
UNIT_DIR = "etc/systemd/system"


def shipped_units() -> dict[str, str]:
    """Unit file name -> text, as shipped in the package."""
    folder = resources.files("l2crypt") / "systemd"
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


def install_units(prefix: Path, bin_dir: Path, dry_run: bool = False) -> list[Path]:
    """Write the units under ``prefix``; returns the paths (written or, dry run, to write)."""
    target = Path(prefix) / UNIT_DIR
    units = render_units(bin_dir)
    written = []
    if not dry_run:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalError(f"cannot create {target}: {exc.strerror or exc}") from None
    for name, text in units.items():
        path = target / name
        written.append(path)
        if dry_run:
            continue
        tmp = path.with_name(f".{name}.tmp")
        try:
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            tmp.replace(path)
        except OSError as exc:
            raise LocalError(f"cannot write {path}: {exc.strerror or exc}") from None
    return written
