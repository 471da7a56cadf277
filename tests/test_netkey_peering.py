"""NETKEY peering between two key servers on loopback (mutual TLS, pinned CAs)."""

import asyncio
from pathlib import Path
import socket

import pytest

from keyserverd.ca import CertificateAuthority
from keyserverd.peering.netkey import NetkeyBook, NetkeyPeering
from keyserverd.store.kek import Kek

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


# --- a peer's messages are checked field by field (issue 15, low) ------------------

import math  # noqa: E402
import ssl  # noqa: E402

from keyserverd.peering import netkey as nk  # noqa: E402
from l2crypt.core.constants import KEYSERVER_TLS_NAME  # noqa: E402


async def _read_all(reader, timeout_s=3.0) -> list[dict]:
    """Every message until the leader closes (or goes quiet)."""
    out = []
    try:
        while True:
            out.append(await asyncio.wait_for(nk.read_message(reader), timeout_s))
    except (EOFError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
        return out


def test_a_sync_above_32_bits_is_refused_and_the_leader_keeps_serving(tmp_path):
    ca_a = CertificateAuthority.open(tmp_path / "a", ())
    ca_b = CertificateAuthority.open(tmp_path / "b", ())
    pa, pb = free_port(), free_port()
    got = {"a": [], "b": []}
    a = NetkeyPeering(ca_a, tmp_path / "a", ("127.0.0.1", pa), ("127.0.0.1", pb), ca_b.ca_fingerprint(),
                      3600.0, lambda p, k: got["a"].append(p), kek=KEK["a"])
    b = NetkeyPeering(ca_b, tmp_path / "b", ("127.0.0.1", pb), ("127.0.0.1", pa), ca_a.ca_fingerprint(),
                      3600.0, lambda p, k: got["b"].append(p), kek=KEK["b"])
    leader, follower = (a, b) if a.leader else (b, a)
    lead_port = pa if leader is a else pb

    async def as_follower(pw_id) -> list[dict]:
        """A sync from the follower's genuine peering certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=leader.ca.ca_cert_pem.decode())
        ctx.load_cert_chain(follower.cert_path, follower.key_path)
        reader, writer = await asyncio.open_connection("127.0.0.1", lead_port, ssl=ctx,
                                                       server_hostname=KEYSERVER_TLS_NAME)
        try:
            writer.write(nk.encode({"t": "sync", "pw_id": pw_id}))
            return await _read_all(reader)
        finally:
            writer.close()

    async def body():
        await follower.start()  # its listener answers "ca" for the leader to pin
        task = asyncio.ensure_future(leader.run())
        try:
            for _ in range(100):
                if leader.peer_ca_pem is not None and leader.book.newest_pw_id() >= 1:
                    break
                await asyncio.sleep(0.1)
            assert leader.book.newest_pw_id() == 1
            for bad in (2**32 + 5, 2**64 - 1, -1, 2.5, True, "7"):
                assert await as_follower(bad) == [], bad  # refused: the connection closes, nothing sent
            assert leader.book.newest_pw_id() == 1
            # A well-formed sync ahead of the leader is served: a version above it.
            answer = await as_follower(7)
            assert [m["pw_id"] for m in answer] == [1, 8]
            assert all(p < 2**32 for p in got["a" if leader is a else "b"])
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await leader.close()
            await follower.close()

    asyncio.run(asyncio.wait_for(body(), 60))


KEY = bytes(32)


@pytest.mark.parametrize("msg", [
    {"t": "sync"}, {"t": "sync", "pw_id": 2**32}, {"t": "sync", "pw_id": -1}, {"t": "sync", "pw_id": None},
    {"t": "sync", "pw_id": 1, "extra": 1}, {"t": "ca", "x": 1}, {"t": "ca_cert", "cert": "pem"},
    {"t": "ca_cert", "cert": b"x" * (nk.MAX_CERT_BYTES + 1)}, {"t": "hello"},
    {"t": "netkey", "pw_id": 0, "key": KEY, "created_at": 1.0},
    {"t": "netkey", "pw_id": nk.PW_ID_MAX + 1, "key": KEY, "created_at": 1.0},
    {"t": "netkey", "pw_id": 1, "key": KEY[:31], "created_at": 1.0},
    {"t": "netkey", "pw_id": 1, "key": KEY, "created_at": math.nan},
    {"t": "netkey", "pw_id": 1, "key": KEY, "created_at": "now"},
    {"t": "netkey", "pw_id": 1, "key": KEY},
])
def test_malformed_peering_messages_are_refused(msg):
    with pytest.raises(ValueError):
        nk.check_message(msg)


def test_well_formed_peering_messages_pass():
    for msg in ({"t": "ca"}, {"t": "ca_cert", "cert": b"-----BEGIN"}, {"t": "sync", "pw_id": 0},
                {"t": "sync", "pw_id": nk.PW_ID_MAX}, {"t": "netkey", "pw_id": 3, "key": KEY, "created_at": 5}):
        assert nk.check_message(msg) is msg
    book = nk.NetkeyBook(Path("/nonexistent/netkey.json"), KEK["a"])
    assert book.add(nk.PW_ID_MAX + 1, KEY, 1.0) is False
