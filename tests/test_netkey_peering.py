"""NETKEY peering between two key servers on loopback (mutual TLS, pinned CAs)."""

import asyncio
import socket

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.kek import Kek
from keyserverd.netkey_peering import NetkeyBook, NetkeyPeering

KEK = {"a": Kek(bytes(range(32))), "b": Kek(bytes(range(1, 33)))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _pair(tmp_path, pin_b=None, rekey_after_s=3600.0, run_s=8.0, until=None):
    ca_a = CertificateAuthority.open(tmp_path / "a", ())
    ca_b = CertificateAuthority.open(tmp_path / "b", ())
    pa, pb = free_port(), free_port()
    got = {"a": [], "b": []}
    a = NetkeyPeering(ca_a, tmp_path / "a", ("127.0.0.1", pa), ("127.0.0.1", pb),
                      pin_b or ca_b.ca_fingerprint(), rekey_after_s, lambda p, k: got["a"].append((p, k)), kek=KEK["a"])
    b = NetkeyPeering(ca_b, tmp_path / "b", ("127.0.0.1", pb), ("127.0.0.1", pa),
                      ca_a.ca_fingerprint(), rekey_after_s, lambda p, k: got["b"].append((p, k)), kek=KEK["b"])
    tasks = [asyncio.ensure_future(a.run()), asyncio.ensure_future(b.run())]
    try:
        for _ in range(int(run_s / 0.1)):
            await asyncio.sleep(0.1)
            if until is not None and until(a, b):
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.close()
        await b.close()
    return a, b, got


def test_peers_agree_on_netkey_and_rotate(tmp_path):
    def agreed(a, b):
        return a.book.newest_pw_id() >= 2 and a.book.versions() == b.book.versions()
    a, b, got = asyncio.run(_pair(tmp_path, rekey_after_s=2.0, run_s=20.0, until=agreed))
    assert a.leader != b.leader
    assert agreed(a, b), (a.book.versions(), b.book.versions())
    assert [p for p, _ in got["a"]][:2] == [1, 2] and [p for p, _ in got["b"]][-1] == b.book.newest_pw_id()
    # Both kept the versions on disk (mode 0600).
    for side in ("a", "b"):
        path = tmp_path / side / "netkey.json"
        assert path.stat().st_mode & 0o077 == 0
        assert NetkeyBook(path, KEK[side]).versions() == a.book.versions()


def test_a_wrong_pinned_fingerprint_never_agrees(tmp_path):
    wrong = "sha256:" + "00" * 32
    a, b, got = asyncio.run(_pair(tmp_path, pin_b=wrong, run_s=4.0))
    # a refuses b's CA: b (whoever leads) never gets a key to or from a.
    assert a.peer_ca_pem is None
    assert not (a.book.versions() and a.book.versions() == b.book.versions())
