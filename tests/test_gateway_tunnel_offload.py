"""The tunnel socket with UDP GSO and GRO (``tunnel_offload``): the pure runs and splits,
then real sockets on loopback (the kernel's UDP GSO and GRO, no root)."""

import socket
import time

import pytest

from gateway.ports import TunnelPorts, TunnelSocket, gso_runs, split_gro


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


def test_paths_from_two_local_addresses_arrive_named_by_peer_and_path():
    """Issue 17: one socket per local address of the paths; a datagram is named by the
    path whose addresses it came by, and one from an address of no path is counted."""
    from gateway.path_config import PathSpec

    pa1, pa2, pb1, pb2 = free_port(), free_port(), free_port(), free_port()
    a = TunnelPorts([PathSpec("gB", 1, ("127.0.0.1", pa1), ("127.0.0.3", pb1)),
                     PathSpec("gB", 2, ("127.0.0.2", pa2), ("127.0.0.4", pb2))])
    b = TunnelPorts([PathSpec("gA", 1, ("127.0.0.3", pb1), ("127.0.0.1", pa1)),
                     PathSpec("gA", 2, ("127.0.0.4", pb2), ("127.0.0.2", pa2))])
    try:
        assert len(a.sockets) == 2 and len(b.sockets) == 2
        assert a.send_batch("gB", 1, [b"one"]) == 1 and a.send_batch("gB", 2, [b"two", b"2b"]) == 2
        assert a.send_batch("gB", 7, [b"no such path"]) == 0
        assert received(b.sockets[0], 1) == [(("gA", 1), b"one")]
        assert received(b.sockets[1], 2) == [(("gA", 2), b"two"), (("gA", 2), b"2b")]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.9", 0))
            stranger.sendto(b"who", ("127.0.0.3", pb1))
        deadline = time.monotonic() + 5
        while b.unknown_sender == 0 and time.monotonic() < deadline:
            b.sockets[0].read(8)
            time.sleep(0.01)
        assert b.unknown_sender == 1
    finally:
        a.close()
        b.close()
