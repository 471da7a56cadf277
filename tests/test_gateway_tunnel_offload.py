"""The tunnel socket with UDP GSO and GRO (``tunnel_offload``): the pure runs and splits,
then real sockets on loopback (the kernel's UDP GSO and GRO, no root)."""

import socket
import time

import pytest

from gateway.ports import TunnelSocket, gso_runs, split_gro


def sizes(runs):
    return [[len(d) for d in run] for run in runs]


@pytest.mark.parametrize("lengths, expected", [
    ([], []),
    ([100], [[100]]),
    ([100, 100, 100], [[100, 100, 100]]),
    ([100, 100, 40], [[100, 100, 40]]),            # the last one may be shorter ...
    ([100, 40, 100], [[100, 40], [100]]),          # ... and ends the run
    ([100, 40, 40], [[100, 40], [40]]),
    ([40, 100, 100], [[40], [100, 100]]),          # a longer one starts a new run
    ([100] * 5, [[100] * 3, [100] * 2]),           # max_segments = 3
    ([400] * 4, [[400, 400], [400, 400]]),         # max_bytes = 1000
])
def test_gso_runs(lengths, expected):
    runs = gso_runs([bytes([i % 256]) * n for i, n in enumerate(lengths)], max_bytes=1000, max_segments=3)
    assert sizes(runs) == expected
    assert [d for run in runs for d in run] == [bytes([i % 256]) * n for i, n in enumerate(lengths)]  # order kept


def test_split_gro():
    data = b"a" * 10 + b"b" * 10 + b"c" * 4
    assert split_gro(data, 10) == [b"a" * 10, b"b" * 10, b"c" * 4]
    assert split_gro(data, 0) == [data] and split_gro(b"x" * 5, 10) == [b"x" * 5]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def received(sock: TunnelSocket, count: int) -> list:
    out, deadline = [], time.monotonic() + 5
    while len(out) < count and time.monotonic() < deadline:
        out += sock.read(64)
        time.sleep(0.01)
    return out


@pytest.mark.parametrize("receiver_offload", [True, False], ids=["gro", "plain-receiver"])
def test_a_batch_crosses_in_one_gso_send_and_arrives_as_the_same_datagrams(receiver_offload):
    pa, pb = free_port(), free_port()
    a = TunnelSocket(("127.0.0.1", pa), {"gB": ("127.0.0.2", pb)}, offload=True)
    b = TunnelSocket(("127.0.0.2", pb), {"gA": ("127.0.0.1", pa)}, offload=receiver_offload)
    try:
        assert a.path == "batched: UDP GSO and GRO"
        assert b.path == ("batched: UDP GSO and GRO" if receiver_offload else "simple: not asked for")
        datagrams = [bytes([i]) * 1450 for i in range(20)] + [b"short-last"]
        assert a.send_batch("gB", datagrams) == len(datagrams)
        got = received(b, len(datagrams))
        assert got == [("gA", d) for d in datagrams]
        # Runs of other sizes, one after the other, keep their order.
        mixed = [b"x" * 300, b"y" * 300, b"z" * 900, b"w" * 900, b"v" * 20]
        assert a.send_batch("gB", mixed) == len(mixed)
        assert received(b, len(mixed)) == [("gA", d) for d in mixed]
    finally:
        a.close()
        b.close()
