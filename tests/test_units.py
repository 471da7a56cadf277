"""The shipped systemd units: installed by ``l2crypt install-units``, accepted by
``systemd-analyze verify``, hardened, and shipped in the wheel."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l2crypt.agent.cli import main
from l2crypt.ops.units import shipped_network_files, shipped_units

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
    built = {p.name for p in (tmp_path / "l2crypt" / "ops" / "systemd").iterdir()}
    assert built == set(shipped_units()) | set(shipped_network_files())


# --- the host's TAP set-up for systemd-networkd (issue 14, section 2) -----------------------
# `systemd-analyze verify` reads units only, not .netdev/.network files; the
# real check is netns_tests/test_tap_restart.py, where systemd-networkd itself
# makes the TAP from these files and the agent restarts under it.  Here: what
# install-units writes, and that the files use only keys networkd knows.

NETWORKD_KEYS = {  # section -> keys (systemd.netdev(5), systemd.network(5), systemd 252)
    "NetDev": {"Name", "Kind", "Description"},
    "Tap": {"MultiQueue", "KeepCarrier"},
    "Match": {"Name"},
    "Link": {"RequiredForOnline"},
    "Network": {"Address", "DHCP", "ConfigureWithoutCarrier", "IgnoreCarrierLoss"},
}


def _sections(text: str) -> dict[str, list[tuple[str, str]]]:
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        out[section].append((key, value))
    return out


def test_install_units_writes_the_networkd_pair(tmp_path, capsys):
    code, out, err = run(capsys, "install-units", "--prefix", str(tmp_path), "--bin-dir", str(BIN), "--networkd",
                         "--tap", "l2c1", "--address", "10.66.0.11/24", "--address", "fd66::11/64")
    assert code == 0, err
    net = tmp_path / "etc" / "systemd" / "network"
    assert sorted(p.name for p in net.iterdir()) == ["l2c1.netdev", "l2c1.network"]
    assert f"wrote {net}/l2c1.network" in out and "networkctl reload" in out
    netdev = _sections((net / "l2c1.netdev").read_text())
    assert ("Name", "l2c1") in netdev["NetDev"] and ("Kind", "tap") in netdev["NetDev"]
    assert ("MultiQueue", "no") in netdev["Tap"] and ("KeepCarrier", "no") in netdev["Tap"]
    network = _sections((net / "l2c1.network").read_text())
    assert network["Match"] == [("Name", "l2c1")]
    assert [v for k, v in network["Network"] if k == "Address"] == ["10.66.0.11/24", "fd66::11/64"]
    for key in ("ConfigureWithoutCarrier", "IgnoreCarrierLoss"):
        assert (key, "yes") in network["Network"]
    assert ("RequiredForOnline", "no") in network["Link"]
    assert oct((net / "l2c1.network").stat().st_mode & 0o777) == "0o644"


def test_networkd_files_use_only_keys_networkd_knows():
    for name, text in shipped_network_files().items():
        for section, items in _sections(text).items():
            assert section in NETWORKD_KEYS, (name, section)
            for key, _ in items:
                assert key in NETWORKD_KEYS[section], (name, section, key)


def test_install_units_networkd_with_dhcp_and_dry_run(tmp_path, capsys):
    code, out, _ = run(capsys, "install-units", "--prefix", str(tmp_path), "--networkd", "--dhcp", "--dry-run")
    assert code == 0 and f"would write {tmp_path}/etc/systemd/network/l2c0.network" in out
    assert not (tmp_path / "etc").exists()
    assert run(capsys, "install-units", "--prefix", str(tmp_path), "--bin-dir", str(BIN),
               "--networkd", "--dhcp")[0] == 0
    network = _sections((tmp_path / "etc/systemd/network/l2c0.network").read_text())
    assert ("DHCP", "yes") in network["Network"] and not [k for k, _ in network["Network"] if k == "Address"]


def test_install_units_keeps_an_edited_network_file_unless_forced(tmp_path, capsys):
    args = ("install-units", "--prefix", str(tmp_path), "--bin-dir", str(BIN), "--networkd")
    assert run(capsys, *args, "--address", "10.66.0.11/24")[0] == 0
    edited = tmp_path / "etc/systemd/network/l2c0.network"
    assert run(capsys, *args, "--address", "10.66.0.11/24")[0] == 0  # the same again: fine
    code, _, err = run(capsys, *args, "--address", "10.66.0.99/24")
    assert code == 1 and "l2c0.network exists and differs; --force replaces it" in err
    assert "Address=10.66.0.11/24" in edited.read_text()
    assert run(capsys, *args, "--address", "10.66.0.99/24", "--force")[0] == 0
    assert "Address=10.66.0.99/24" in edited.read_text()


@pytest.mark.parametrize("args, words", [
    (("--networkd",), "needs the host's addresses"),
    (("--networkd", "--address", "10.66.0.11"), "want ADDR/PREFIX"),
    (("--networkd", "--address", "10.66.0.300/24"), "not an address with a prefix"),
    (("--networkd", "--tap", "a/b", "--dhcp"), "--tap: not an interface name"),
    (("--address", "10.66.0.11/24"), "go with --networkd"),
])
def test_install_units_networkd_refuses_bad_arguments(tmp_path, capsys, args, words):
    code, _, err = run(capsys, "install-units", "--prefix", str(tmp_path), *args)
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "etc").exists()


def test_the_readme_shows_the_shipped_host_set_ups():
    """The README's networkd and ifupdown blocks say what the shipped files say."""
    readme = (ROOT / "README.md").read_text()
    ini = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    for name, text in shipped_network_files().items():
        for line in text.splitlines():
            if line and not line.startswith("#") and not line.startswith("Description="):
                assert line in ini, (name, line)
    example = (ROOT / "docs" / "examples" / "ifupdown-l2c0").read_text()
    stanzas = example[example.index("auto l2c0"):]
    assert f"```\n{stanzas}```" in readme
