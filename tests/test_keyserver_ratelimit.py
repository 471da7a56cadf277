"""Per-host key-request limit of keyserverd and its quiet logging (no sockets)."""

import logging
import re

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.ratelimit import HostBuckets
from keyserverd.service import KeyService, Session
from keyserverd.store.sqlite import SqliteStore
from keyserverd.tokens import hash_token
from l2crypt.ops.logs import TextFormatter

NOW = 1_700_000_000.0
MACS = {h: bytes.fromhex(f"0200000000{i:02x}") for i, h in enumerate(("a", "b", "c"), 1)}


@pytest.fixture
def service(tmp_path):
    ca = CertificateAuthority.open(tmp_path, ())
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    for host_id in MACS:
        store.add_host(host_id, None, "host", hash_token("t" * 20), NOW + 60, NOW)
    svc = KeyService(store, "aes-256-gcm", "ks", ca, key_requests_per_s=10, key_request_burst=20)
    yield svc
    store.close()


def bound(service, host_id):
    s = Session(identity=host_id)
    out = service.handle(s, {"t": "hello", "rid": 1, "mac": MACS[host_id]}, NOW)
    assert out[0][1]["t"] == "welcome"
    return s


def unknown_req(rid):
    return {"t": "key_req", "rid": rid, "peer_mac": bytes.fromhex("02aa0000") + rid.to_bytes(2, "big")}


def test_buckets():
    b = HostBuckets(rate_per_s=2, burst=3)
    assert [b.take("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take("y", 0.0)  # another host has its own bucket
    assert not b.take("x", 0.1)
    assert b.take("x", 0.6)  # 2/s refill
    assert not b.take("x", 0.6)
    assert b.take("x", -100.0) is False  # a clock step back never adds tokens


def test_flooding_host_is_refused_others_are_served(service, caplog):
    a, b, _ = bound(service, "a"), bound(service, "b"), bound(service, "c")
    caplog.set_level(logging.INFO, logger="keyserverd")
    answers = [service.handle(a, unknown_req(rid), NOW)[0][1] for rid in range(1, 1001)]
    kinds = [m["t"] if m["t"] != "error" else m["code"] for m in answers]
    assert kinds.count("unknown") == 20
    assert kinds.count("rate_limited") == 980
    assert all(m["rid"] == rid for rid, m in enumerate(answers, 1))
    # b is not affected and gets its pair key at once.
    out = service.handle(b, {"t": "key_req", "rid": 5, "peer_mac": MACS["c"]}, NOW)
    assert out[0][1]["t"] == "key"
    # a gets tokens back with time.
    out = service.handle(a, {"t": "key_req", "rid": 6, "peer_mac": MACS["c"]}, NOW + 1.0)
    assert out[0][1]["t"] == "key"
    # The log stays short: one refusal line and one unknown-MAC line in 10 s.
    text = TextFormatter().format
    refused = [r for r in caplog.records if "code=rate_limited" in text(r)]
    unknown = [r for r in caplog.records if "key_req_unknown_mac" in text(r)]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert len(unknown) == 1
    service.handle(a, unknown_req(7), NOW + 0.5)
    for rid in range(8, 40):
        service.handle(a, unknown_req(rid), NOW + 20.0)
    later = [text(r) for r in caplog.records if "code=rate_limited" in text(r)]
    assert len(later) == 2 and re.search(r"suppressed=[1-9]", later[-1])


def test_limit_is_per_host_over_all_connections(service):
    a1, a2 = bound(service, "a"), bound(service, "a")
    codes = [service.handle(s, unknown_req(r), NOW)[0][1].get("code")
             for r in range(1, 41) for s in (a1, a2)]
    assert codes.count("rate_limited") == 60


def test_ping_and_hello_are_not_limited(service):
    a = bound(service, "a")
    for rid in range(1, 500):
        assert service.handle(a, {"t": "ping", "rid": rid}, NOW)[0][1]["t"] == "pong"
