# Operations on a running segment (issue 7, "Acceptance"): metrics move with
# traffic and with forged frames, the status commands answer, and no key or
# token bytes reach the logs through enrollment and a rekey.
#
#            l2c-ks-<s>: keyserverd 10.67.0.1:7788, metrics 127.0.0.1:9479 (in its netns)
#            |  management veths                                    |
#      +-----------+          +-----------+          +-----------+
#      | h1 agent  |          | h2 agent  |          | h3 agent  |   metrics 127.0.0.1:9478
#      +----|------+          +----|------+          +----|------+   in each host's netns
#           +-------------- br0 (l2c-sw-<s>) ---------------+
#                                |
#                    l2c-in-<s>: the intruder injects forged frames
#
# Scrapes run inside the daemon's namespace (``ip netns exec`` + urllib).

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import KeyServerClient, forged_frame, mac_bytes, peer, ping, stored_keys, wait_for
from l2crypt.lab import segment as L

pytestmark = pytest.mark.lab

AGENT_METRICS = "http://127.0.0.1:9478/metrics"
KS_METRICS = "http://127.0.0.1:9479/metrics"
SCRAPE = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n")


def scrape(lab, role: str, url: str) -> dict:
    res = lab.exec(role, [sys.executable, "-c", SCRAPE, url], timeout=20)
    assert res.returncode == 0, f"scrape of {url} in {role} failed: {res.stderr[-800:]}"
    out = {}
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")
            out[key] = s.value
    return out


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_move_with_traffic_and_forged_frames(lab):
    b1, b2 = scrape(lab, "h1", AGENT_METRICS), scrape(lab, "h2", AGENT_METRICS)
    res = ping(lab, "h1", L.tap_ipv4("h2"), count=5, extra=["-s", "500"])
    assert res.returncode == 0, res.stdout + res.stderr
    a1, a2 = scrape(lab, "h1", AGENT_METRICS), scrape(lab, "h2", AGENT_METRICS)
    # Five echo requests sealed by h1 and opened by h2 (plus ARP), and the replies back.
    for after, before in ((a1, b1), (a2, b2)):
        assert delta(after, before, "l2crypt_frames_sealed_total") >= 5
        assert delta(after, before, "l2crypt_frames_opened_total") >= 5
        assert delta(after, before, "l2crypt_bytes_sealed_total") >= 5 * 528
        assert delta(after, before, "l2crypt_bytes_opened_total") >= 5 * 528
    assert a1["l2crypt_keyserver_connected"] == 1
    assert a1[f"l2crypt_key_age_seconds{{peer={lab.tap_mac_of('h2')}}}"] >= 0
    assert a1["l2crypt_agent_info{cipher=aes-256-gcm,id=h1,mac=%s,port=eth0,tap=l2c0}" % lab.tap_mac_of("h1")] == 1
    # Someone asked for the h1-h2 key, and the key client timed the answer.
    timed = sum(scrape(lab, h, AGENT_METRICS).get("l2crypt_key_request_duration_seconds_count", 0)
                for h in lab.hosts)
    assert timed >= 1

    # Forged frames (right header, no valid tag) from the intruder raise h2's bad_tag.
    pw_id = (peer(lab.status("h2"), lab.tap_mac_of("h1")) or {"pw_id": 1})["pw_id"]
    frames = [forged_frame(lab.tap_mac_of("h2"), lab.tap_mac_of("h1"), pw_id, os.urandom(80)) for _ in range(7)]
    assert lab.inject(frames) == 7
    key = "l2crypt_frames_dropped_total{reason=bad_tag}"
    after = wait_for("h2's bad_tag metric to count the forged frames",
                     lambda: (m := scrape(lab, "h2", AGENT_METRICS)) and delta(m, a2, key) >= 7 and m,
                     timeout_s=15)
    # Each frame meets one fate: every drop since the pings is one of the seven,
    # under bad_tag, so none of them was opened (the pings above were).
    dropped = sum(v - a2.get(k, 0) for k, v in after.items() if k.startswith("l2crypt_frames_dropped_total{"))
    assert delta(after, a2, key) == 7 and dropped == 7, {k: v for k, v in after.items() if "dropped" in k}

    ks = scrape(lab, "ks", KS_METRICS)
    assert ks["keyserverd_connected_hosts"] == len(lab.hosts)
    assert ks["keyserverd_hosts{state=enrolled}"] >= len(lab.hosts)
    assert ks["keyserverd_key_requests_total"] >= 1
    assert ks["keyserverd_pair_keys"] >= 1


def test_status_commands(lab):
    res = lab.keyserverd("status", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["hosts_connected"] == len(lab.hosts) and doc["listen"] == lab.keyserver_addr
    assert {h["id"] for h in doc["hosts"] if h["connections"]} == set(lab.hosts)
    text = lab.keyserverd("status")
    assert text.returncode == 0 and "h1" in text.stdout and "connected" in text.stdout

    pinger = lab.popen("h1", ["ping", "-c", "40", "-i", "0.1", L.tap_ipv4("h2")], name="ping-watch")
    try:
        res = lab.exec("h1", [lab.cmd("l2crypt"), "status", "--state-dir", lab.host_dir("h1"), "--watch",
                              "--json", "--count", "2", "--interval", "1"], timeout=30)
    finally:
        lab.stop(pinger)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert len(lines) == 2
    assert max(ln["peers"][lab.tap_mac_of("h2")]["frames_out_per_s"] for ln in lines) > 1

    # Without --count it runs until Ctrl-C, then exits cleanly.
    watch = subprocess.Popen(["ip", "netns", "exec", lab.ns("h1"), lab.cmd("l2crypt"), "status", "--state-dir",
                              str(lab.host_dir("h1")), "--watch", "--interval", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "COLUMNS": "120"})
    try:
        try:
            watch.wait(timeout=2.5)
        except subprocess.TimeoutExpired:
            pass
        assert watch.poll() is None, "status --watch ended by itself"
        os.killpg(watch.pid, signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=5)
    assert watch.returncode == 0 and "Traceback" not in err, err
    assert "frames/s" in out


def _secrets(lab, tokens: list[str], key_files: list) -> dict[str, bytes]:
    """Every key the key server holds, the tokens, and the private keys' PEM bodies."""
    keys = list(stored_keys(lab.ks_dir).values())
    out = {f"key{i}": k for i, k in enumerate(keys)}
    out.update({f"token{i}": t.encode() for i, t in enumerate(tokens)})
    for path in key_files:
        body = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("-----")]
        out.update({f"{path.name}:{i}": ln.encode() for i, ln in enumerate(body)})
    return out


def _forms(secret: bytes) -> list[str]:
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), repr(secret)]
    if secret.isascii():
        forms.append(secret.decode())
    return [f for f in forms if len(f) >= 16]


def _state_copy(lab) -> bytes:
    """What a copy of the key server's state without its KEK holds: the
    database's SQL dump and the raw bytes of the file and its WAL."""
    db_path = lab.ks_dir / "keyserver.db"
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        out = "\n".join(db.iterdump()).encode()
    finally:
        db.close()
    wal = db_path.with_name(db_path.name + "-wal")
    return out + db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_kek_rotation_keeps_every_key_and_a_copy_of_the_state_opens_nothing(lab, tmp_path):
    """Issue 14.3 on a running lab: the keys real TLS clients are handed are not
    in a copy of the database; rotating the KEK (refused while keyserverd runs)
    changes no key and no PW_ID, for the clients and for the agents.  The
    clients are two identities of their own (kr1, kr2), so the agents' sessions
    are left alone."""
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0
    macs = {"kr1": mac_bytes("02:4b:52:00:00:01"), "kr2": mac_bytes("02:4b:52:00:00:02")}
    for ident, host in (("kr1", "h1"), ("kr2", "h2")):
        token = lab.host_add(ident)
        res = lab.enroll(host, token["token"], token["ca_fingerprint"], host_id=ident, state_dir=tmp_path / ident)
        assert res.returncode == 0, res.stdout + res.stderr

    def handed_out() -> dict[str, tuple[int, bytes]]:
        clients = {i: KeyServerClient(lab.ns(h), lab.keyserver_addr, tmp_path / i)
                   for i, h in (("kr1", "h1"), ("kr2", "h2"))}
        try:
            welcome = {i: c.request({"t": "hello", "rid": 1, "mac": macs[i]}) for i, c in clients.items()}
            pair = clients["kr1"].request({"t": "key_req", "rid": 2, "peer_mac": macs["kr2"]})
        finally:
            for c in clients.values():
                c.close()
        assert welcome["kr1"]["t"] == welcome["kr2"]["t"] == "welcome" and pair["t"] == "key", (welcome, pair)
        return {"multicast": (welcome["kr1"]["multicast_pw_id"], welcome["kr1"]["multicast_key"]),
                "pair": (pair["pw_id"], pair["key"])}

    keys = handed_out()
    held = stored_keys(lab.ks_dir)  # opened with the KEK: the control
    assert held[("multicast", keys["multicast"][0])] == keys["multicast"][1]
    assert held[("pair", "kr1", "kr2", keys["pair"][0])] == keys["pair"][1]
    copy = _state_copy(lab)
    assert [name for name, (_, key) in keys.items() for f in _forms(key) if f.encode() in copy] == []
    assert all(key not in copy for key in held.values())

    old_kek = lab.ks_dir / "kek"
    old_copy = tmp_path / "old.kek"
    old_copy.write_bytes(old_kek.read_bytes())
    old_copy.chmod(0o600)
    new_kek = tmp_path / "new.kek"
    busy = lab.keyserverd("kek", "rotate", "--new-kek-file", str(new_kek))
    assert busy.returncode == 1 and "stop it" in busy.stderr and len(busy.stderr.splitlines()) == 1
    assert old_kek.read_bytes() == old_copy.read_bytes()
    lab.kill_keyserver(signal.SIGTERM)
    rotated = lab.keyserverd("kek", "rotate", "--new-kek-file", str(new_kek))
    assert rotated.returncode == 0, rotated.stderr
    assert old_kek.read_bytes() == new_kek.read_bytes() != old_copy.read_bytes()
    lab.start_keyserver()
    refused = lab.keyserverd("host", "list", "--kek-file", str(old_copy))
    assert refused.returncode == 1 and "does not open it" in refused.stderr

    assert handed_out() == keys
    assert stored_keys(lab.ks_dir) == held
    for host in ("h1", "h2"):
        wait_for(f"{host} back on the key server", lambda h=host: lab.status(h).get("connected"), timeout_s=30)
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=3).returncode == 0
    copy = _state_copy(lab)
    assert all(key not in copy and key.hex().encode() not in copy for key in held.values())


def test_no_key_or_token_in_the_logs_through_enrollment_and_rekey(lab, tmp_path):
    h1_log_before = len(lab.log_text("agent-h1"))
    token = lab.host_add("h7")
    enrolled = lab.enroll("h3", token["token"], token["ca_fingerprint"], host_id="h7", state_dir=tmp_path / "h7")
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=2).returncode == 0  # the pair key exists
    before = scrape(lab, "h1", AGENT_METRICS)
    old = peer(lab.status("h1"), lab.tap_mac_of("h2"))["pw_id"]
    res = lab.keyserverd("rekey", "--pair", "h1", "h2")
    assert res.returncode == 0, res.stderr
    wait_for("h1 to hold the new pair key version",
             lambda: max(peer(lab.status("h1"), lab.tap_mac_of("h2"))["pw_ids_held"]) > old, timeout_s=20)
    assert ping(lab, "h1", L.tap_ipv4("h2"), count=3).returncode == 0
    assert delta(scrape(lab, "h1", AGENT_METRICS), before, "l2crypt_rekeys_total") >= 1

    logs = {name: lab.log_text(name) for name in ["keyserverd", *(f"agent-{h}" for h in lab.hosts)]}
    # The events did reach the logs (so the search below looks at the right lines) ...
    assert "host_enrolled" in logs["keyserverd"] and "host=h7" in logs["keyserverd"]
    assert "key_installed" in logs["agent-h1"][h1_log_before:]
    # ... and no key, token or private key is in any of them.
    key_files = [lab.ks_dir / "ca.key", lab.ks_dir / "server.key", tmp_path / "h7" / "host.key",
                 *(lab.host_dir(h) / "host.key" for h in lab.hosts)]
    secrets = _secrets(lab, [token["token"]], key_files)
    assert sum(1 for k in secrets if k.startswith("key")) >= 3
    leaks = [(name, what) for name, text in logs.items() for what, secret in secrets.items()
             for form in _forms(secret) if form in text]
    assert not leaks, leaks
