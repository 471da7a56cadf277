"""The shipped systemd units: installed by ``l2crypt install-units``, accepted by
``systemd-analyze verify``, hardened, and shipped in the wheel."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l2crypt.cli import main
from l2crypt.units import shipped_units

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code, *capsys.readouterr()


def test_install_units_dry_run_writes_nothing(tmp_path, capsys):
    code, out, _ = run(capsys, "install-units", "--prefix", str(tmp_path), "--dry-run")
    assert code == 0
    assert f"would write {tmp_path}/etc/systemd/system/l2crypt-agent@.service" in out
    assert f"would write {tmp_path}/etc/systemd/system/keyserverd.service" in out
    assert f"would write {tmp_path}/etc/systemd/system/l2crypt-gateway.service" in out
    assert not (tmp_path / "etc").exists()


def test_install_units_rewrites_the_command_paths(tmp_path, capsys):
    code, out, _ = run(capsys, "install-units", "--prefix", str(tmp_path), "--bin-dir", str(BIN))
    assert code == 0
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    agent = (unit_dir / "l2crypt-agent@.service").read_text()
    assert f"ExecStart={BIN}/l2crypt agent --config /etc/l2crypt/agent-%i.toml --port %i" in agent
    ks = (unit_dir / "keyserverd.service").read_text()
    assert f"ExecStart={BIN}/keyserverd serve --config /etc/l2crypt/keyserver.toml" in ks
    assert oct((unit_dir / "keyserverd.service").stat().st_mode & 0o777) == "0o644"
    gw = (unit_dir / "l2crypt-gateway.service").read_text()
    assert f"ExecStart={BIN}/l2crypt-gateway run --config /etc/l2crypt/gateway.toml" in gw


def test_units_are_hardened():
    units = shipped_units()
    assert {"l2crypt-agent@.service", "keyserverd.service", "l2crypt-gateway.service"} <= set(units)
    agent = units["l2crypt-agent@.service"]
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n" in agent
    assert "DeviceAllow=/dev/net/tun rw" in agent and "BindsTo=sys-subsystem-net-devices-%i.device" in agent
    gateway = units["l2crypt-gateway.service"]
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n" in gateway
    assert "PrivateDevices=yes" in gateway and "ReadWritePaths=/var/lib/l2crypt-gateway\n" in gateway
    for name, text in units.items():
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                     "StateDirectory=l2crypt", "ConfigurationDirectory=l2crypt", "Restart=on-failure"):
            assert line in text, f"{name} lacks {line}"


def test_units_pass_systemd_analyze_verify(tmp_path, capsys):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (scripts/setup installs the systemd package)")
    assert run(capsys, "install-units", "--prefix", str(tmp_path), "--bin-dir", str(BIN))[0] == 0
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    files = sorted(unit_dir.glob("*.service"))
    assert files
    res = subprocess.run([analyze, "verify", *map(str, files)], capture_output=True, text=True, timeout=60,
                         cwd=unit_dir)
    # verify exits 0 on unknown keys and bad values but prints them: no line may name our files.
    ours = [ln for ln in (res.stdout + res.stderr).splitlines()
            if any(f.name.split("@")[0].removesuffix(".service") in ln for f in files)]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_verify_would_catch_a_bad_unit(tmp_path):
    """The check above can fail: a typo in a unit is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bad = tmp_path / "bad.service"
    bad.write_text(f"[Service]\nExecStart={BIN}/l2crypt status\nProtectSystem=bogus\n")
    res = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "bad.service" in res.stdout + res.stderr


def test_units_ship_with_the_package(tmp_path):
    """``pip install .`` copies what setuptools' build_py copies: the units must be in it."""
    res = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                          "build_py", "--build-lib", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    built = {p.name for p in (tmp_path / "l2crypt" / "systemd").glob("*.service")}
    assert built == set(shipped_units())
