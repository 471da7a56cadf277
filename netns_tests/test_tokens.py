# Host keys and the CA key on SoftHSM2 tokens (issue 19), on real kernels.
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788, its CA key and its KEK
#                        ("ks-kek", AES-256) on token "ks-ca"
#            |  management veths (mgmt0 10.67.0.1x in each host)  |
#      +--------------------------+          +--------------------------+
#      | h1: host key on token    |          | h2: host key in host.key |
#      |   "h1" (SoftHSM2); TLS   |          |   (mutual TLS, as ever)  |
#      |   without a client cert, |          |                          |
#      |   then the challenge     |          |                          |
#      | l2c0 TAP .11 ::11, agent |          | l2c0 TAP .12 ::12, agent |
#      | eth0                     |          | eth0                     |
#      +----|---------------------+          +----|---------------------+
#           p1-<s>                                p2-<s>
#      +----|-------------------------------------|-----+
#      |        br0 in l2c-sw-<s> (the switch)          |
#      +------------------------------------------------+
#
# SOFTHSM2_CONF points into a temporary directory of this module (every lab
# process inherits it); the tokens live there and nowhere else.  One lab
# serves the module; h1's token is deleted by the last test but one, the key
# server's by the last.

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from helpers import iperf3, l2c_frames, ping, skip_reason, wait_for
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

MARKER = b"L2CRYPT-TOKEN-MARKER-5e1b7c"
PIN = "271828"
SO_PIN = "31415926"
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
MODULE = next((m for m in MODULES if os.path.exists(m)), MODULES[0])
HOST_TOKEN, CA_TOKEN = "h1", "ks-ca"
KEK_LABEL = "ks-kek"


def _softhsm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["softhsm2-util", *args], capture_output=True, text=True, timeout=30)


class TokenLab(L.Lab):
    """The segment lab (h1, h2) with h1's host key on a token and the CA key on another."""

    def __init__(self, state_dir: Path, pin_file: Path):
        super().__init__(state_dir=state_dir, hosts=("h1", "h2"), capture_from_start=True)
        self.pin_file = pin_file
        self.keyserver_args = ["--pkcs11-module", MODULE, "--pkcs11-token-label", CA_TOKEN,
                               "--pkcs11-pin-file", str(pin_file), "--pkcs11-kek-label", KEK_LABEL]

    def keyserverd(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        return super().keyserverd(*args, *self.keyserver_args, timeout=timeout)  # the store needs the token KEK

    def serve_once(self, *args: str) -> subprocess.CompletedProcess:
        """keyserverd started with ``args`` in place of the token options, expected to stop at once."""
        return self.exec("ks", [self.cmd("keyserverd"), "--state-dir", self.ks_dir, "--listen",
                                self.keyserver_addr, "--workers", "1", *args], timeout=20)

    def enroll(self, host: str, *args, **kw) -> subprocess.CompletedProcess:
        if host == "h1":
            kw["extra"] = ("--pkcs11-module", MODULE, "--token-label", HOST_TOKEN, "--pin-file", str(self.pin_file))
        return super().enroll(host, *args, **kw)

    def start_agent(self, host: str, extra_args: tuple[str, ...] = ()):
        if host == "h1":
            extra_args = (*extra_args, "--pkcs11-pin-file", str(self.pin_file))
        return super().start_agent(host, extra_args)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("softhsm2-util") is None or not os.path.exists(MODULE):
        pytest.skip("SoftHSM2 is not installed (scripts/setup installs softhsm2)")
    pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed (pip install -e '.[pkcs11]')")
    hsm = tmp_path_factory.mktemp("softhsm")
    (hsm / "tokens").mkdir()
    conf = hsm / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {hsm / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin_file = hsm / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    old_conf = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    L.install_signal_cleanup()
    the_lab = TokenLab(tmp_path_factory.mktemp("lab"), pin_file)
    try:
        for label in (HOST_TOKEN, CA_TOKEN):
            made = _softhsm("--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN)
            assert made.returncode == 0, made.stdout + made.stderr
        kek = subprocess.run([the_lab.cmd("keyserverd"), "kek", "generate", *the_lab.keyserver_args],
                             capture_output=True, text=True, timeout=30)  # the explicit step before a first start
        assert kek.returncode == 0 and f"new KEK key {KEK_LABEL!r} on token {CA_TOKEN!r}" in kek.stdout, kek.stderr
        the_lab.up(timeout_s=60)
        yield the_lab
    finally:
        the_lab.down()
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old_conf


def test_status_says_where_the_host_key_is(lab):
    token_host, file_host = lab.status("h1"), lab.status("h2")
    assert token_host["host_key"] == "token" and f"token {HOST_TOKEN!r}" in token_host["host_key_token"]
    assert file_host["host_key"] == "file" and "host_key_token" not in file_host
    assert token_host["connected"] and file_host["connected"]
    shown = lab.exec("h1", [lab.cmd("l2crypt"), "status", "--state-dir", str(lab.host_dir("h1"))])
    assert f"host key: token {HOST_TOKEN!r}" in shown.stdout, shown.stdout + shown.stderr
    assert "authenticated by challenge" in shown.stdout
    assert "host_authenticated" in lab.log_text("keyserverd") and "auth=token" in lab.log_text("keyserverd")


def test_token_host_state_dir_holds_no_private_key(lab):
    token_dir, file_dir = lab.host_dir("h1"), lab.host_dir("h2")
    assert not (token_dir / "host.key").exists() and (file_dir / "host.key").exists()
    texts = {p.name: p.read_bytes() for p in token_dir.rglob("*") if p.is_file()}
    assert {"host.crt", "ca.crt", "host.token"} <= set(texts)
    assert not [name for name, data in texts.items() if b"PRIVATE KEY" in data]
    assert b"PRIVATE KEY" in (file_dir / "host.key").read_bytes()  # the check sees a key where there is one
    ref = json.loads(texts["host.token"])
    assert set(ref) == {"module", "token_label", "key_label", "key_id"} and PIN not in texts["host.token"].decode()
    # The key on the token cannot be read out.
    import pkcs11

    with pkcs11.lib(MODULE).get_token(token_label=HOST_TOKEN).open(user_pin=PIN) as session:
        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=bytes.fromhex(ref["key_id"]))
        assert key[pkcs11.Attribute.EXTRACTABLE] is False and key[pkcs11.Attribute.SENSITIVE] is True


def test_token_host_and_file_host_share_the_segment_sealed(lab):
    switch = lab.capture("br0", name="tcpdump-token-br0")
    pattern = MARKER[:16].hex()
    try:
        for src, dst in (("h1", "h2"), ("h2", "h1")):
            res = ping(lab, src, L.tap_ipv4(dst), count=4, extra=["-s", "600", "-p", pattern])
            assert res.returncode == 0, f"{src} -> {dst}: {res.stdout}{res.stderr}"
        assert ping(lab, "h1", L.tap_ipv6("h2"), count=2).returncode == 0
        result = iperf3(lab, "h1", "h2", seconds=2)
        assert result["end"]["sum_received"]["bits_per_second"] > 1e6
    finally:
        frames = L.read_pcap(switch.stop())
    assert not [f for f in frames if MARKER[:16] in f]
    h1, h2 = lab.tap_mac_of("h1"), lab.tap_mac_of("h2")
    # The same exchange is on the switch, sealed, both ways.
    assert len(l2c_frames(frames, src=h1, dst=h2)) >= 4 and len(l2c_frames(frames, src=h2, dst=h1)) >= 4


def test_ca_on_a_token_signed_the_enrollments(lab):
    ks = lab.ks_dir
    assert (ks / "ca.token").exists() and (ks / "ca.crt").exists() and not (ks / "ca.key").exists()
    assert json.loads((ks / "ca.token").read_text())["token_label"] == CA_TOKEN
    ca = x509.load_pem_x509_certificate((ks / "ca.crt").read_bytes())
    ca.verify_directly_issued_by(ca)
    for host in ("h1", "h2"):
        cert = x509.load_pem_x509_certificate((lab.host_dir(host) / "host.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == host


def _token_kek(lab):
    """The key server's KEK on the token, used from this process."""
    from keyserverd.store.kek import KekToken, TokenKek

    return TokenKek(KekToken(MODULE, CA_TOKEN, KEK_LABEL, str(lab.pin_file)))


def _stored_keys(lab) -> dict[str, bytes]:
    """Every key in the key server's database, opened by the KEK on the token (from this process)."""
    from keyserverd.store import DB_FILE, open_store

    kek = _token_kek(lab)
    store = open_store("", lab.ks_dir, time.time(), create=False, kek=kek)
    try:
        with sqlite3.connect(lab.ks_dir / DB_FILE) as db:
            pairs = db.execute("SELECT id1, id2, pw_id FROM pair_keys").fetchall()
            groups = [p for (p,) in db.execute("SELECT pw_id FROM multicast_keys")]
        keys = {f"{a}/{b}/{p}": store.pair_key(a, b, p) for a, b, p in pairs}
        keys.update({f"multicast/{p}": store.multicast_key(p) for p in groups})
    finally:
        store.close()
        kek.close()
    return keys


def _h1_h2_keyed(lab) -> None:
    """h1 and h2 have talked, so the key server holds their pair key (h1/h2/1):
    a test that reads it runs alone too, not only after the traffic tests."""
    wait_for("h1 -> h2 answered", lambda: ping(lab, "h1", L.tap_ipv4("h2"), count=1).returncode == 0,
             timeout_s=20, every_s=0.5)


def test_the_kek_on_the_token_leaves_no_key_in_clear_in_the_database(lab):
    from keyserverd.store import DB_FILE
    from keyserverd.store.kek import KekError, pair_aad

    _h1_h2_keyed(lab)
    keys = _stored_keys(lab)
    assert "h1/h2/1" in keys and len(keys["h1/h2/1"]) == 32 and any(k.startswith("multicast/") for k in keys)
    with sqlite3.connect(lab.ks_dir / DB_FILE) as db:
        (kek_id,), = db.execute("SELECT kek_id FROM kek_check")
        stored = {bytes(v) for (v,) in db.execute("SELECT key FROM pair_keys UNION ALL SELECT key FROM multicast_keys")}
        (h1_h2,), = db.execute("SELECT key FROM pair_keys WHERE id1 = 'h1' AND id2 = 'h2' AND pw_id = 1")
    assert kek_id.startswith("pkcs11:") and not (lab.ks_dir / "kek").exists()  # no KEK file was made
    assert not set(keys.values()) & stored  # the column holds sealed values, not the keys
    raw = b"".join(p.read_bytes() for p in lab.ks_dir.iterdir() if p.name.startswith(DB_FILE) and p.is_file())
    for name, key in keys.items():
        assert key not in raw and key.hex().encode() not in raw, f"{name} is in clear in the database"
    kek = _token_kek(lab)  # the token opens a sealed value for its own row only
    try:
        assert kek.open(pair_aad("h1", "h2", 1), h1_h2, "h1/h2/1") == keys["h1/h2/1"]
        with pytest.raises(KekError, match="does not open under KEK id pkcs11:"):
            kek.open(pair_aad("h1", "h2", 2), h1_h2, "h1/h2/1 as pw_id 2")
    finally:
        kek.close()
    import pkcs11  # and the KEK cannot be read off the token

    with pkcs11.lib(MODULE).get_token(token_label=CA_TOKEN).open(user_pin=PIN) as session:
        kek = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=KEK_LABEL)
        assert kek[pkcs11.Attribute.EXTRACTABLE] is False and kek[pkcs11.Attribute.SENSITIVE] is True


def test_keys_sealed_on_the_token_are_read_back_after_a_restart(lab):
    _h1_h2_keyed(lab)
    before = _stored_keys(lab)
    lab.kill_keyserver(signal.SIGTERM)
    lab.start_keyserver()
    for host in ("h1", "h2"):
        lab.wait_connected(host, 30)
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0
    after = _stored_keys(lab)
    assert after["h1/h2/1"] == before["h1/h2/1"] and set(before) <= set(after)
    assert "sealed_key_unreadable" not in lab.log_text("keyserverd")


def test_deleting_the_token_fails_the_next_reconnect_closed(lab):
    gone = _softhsm("--delete-token", "--token", HOST_TOKEN)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    lab.kill_keyserver(signal.SIGTERM)  # every agent must reconnect
    lab.start_keyserver()
    wait_for("h2 (key file) back on the key server", lambda: lab.status("h2").get("connected"), timeout_s=30)
    line = wait_for("h1 logs that its host key cannot sign",
                    lambda: next((l for l in lab.log_text("agent-h1").splitlines() if "host_key_unavailable" in l),
                                 None), timeout_s=30)
    assert f"token {HOST_TOKEN!r}" in line and "fail closed" in line, line
    status = lab.status("h1")
    assert status["connected"] is False and status["host_key"] == "token"
    assert lab.proc("agent-h1").alive()  # it keeps trying; it did not crash


def test_a_wrong_pin_or_a_deleted_kek_token_stops_keyserverd_with_one_line(lab):
    lab.kill_keyserver(signal.SIGTERM)
    wrong = lab.pin_file.with_name("wrong-pin")
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    refused = lab.serve_once(*[str(wrong) if a == str(lab.pin_file) else a for a in lab.keyserver_args])
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        f"keyserverd: error: pkcs11_kek_label {KEK_LABEL!r}: the PIN of token {CA_TOKEN!r} is wrong"]
    gone = _softhsm("--delete-token", "--token", CA_TOKEN)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    refused = lab.serve_once(*lab.keyserver_args)
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        f"keyserverd: error: pkcs11_kek_label {KEK_LABEL!r}: token {CA_TOKEN!r} is not present in {MODULE} "
        f"(removed, or another label?)"]
