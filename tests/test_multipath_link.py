"""Two gateways' tunnels over three paths, sans-I/O (issue 17): ``gateway.multipath``."""

from __future__ import annotations

import random

from gateway import multipath as M
from gateway import tunnel_wire as W
from gateway.path_scheduler import DOWN, UP
from gateway.tunnel import Tunnel
from l2crypt.core.tunnel_keys import Endpoint, link_keys

NETKEY = bytes(range(7, 39))
SEG = {"gA": "sha256:" + "a" * 64, "gB": "sha256:" + "b" * 64}
PATHS = (1, 2, 3)


def frame(i: int, port: int = 80) -> bytes:
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    ip = bytes([0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    return eth + ip + port.to_bytes(2, "big") + b"\x00\x09" + i.to_bytes(4, "big") + bytes(28)


def end(me: str, peer: str, **kw) -> M.Multipath:
    tun = Tunnel(me, (peer,), pn_start=1 << 40, paths={peer: PATHS})
    for path in PATHS:
        tun.install(peer, 1, *link_keys(NETKEY, 1, Endpoint(SEG[me], me), Endpoint(SEG[peer], peer), path=path),
                    0.0, path)
    return M.Multipath(tun, {peer: PATHS}, 1000, M.MultipathSettings(**kw))


def deliver(rx: M.Multipath, datagrams, now: float, drop=lambda path, d: False) -> tuple[list, list]:
    frames, replies = [], []
    for peer, path, d in datagrams:
        if not drop(path, d):
            got, back = rx.receive("gA" if peer == "gB" else "gB", path, d, now)
            frames += got
            replies += back
    return frames, replies


def test_split_mode_sends_each_frame_once_on_one_path_per_flow():
    ga, gb = end("gA", "gB"), end("gB", "gA")
    out = [d for i in range(40) for d in ga.send("gB", frame(i, port=1000 + i % 8), 1.0)]
    assert len(out) == 40 and len({p for _, p, _ in out}) == 3
    by_flow = {}
    for (_, path, _), i in zip(out, range(40)):
        by_flow.setdefault(i % 8, set()).add(path)
    assert all(len(paths) == 1 for paths in by_flow.values())
    frames, _ = deliver(gb, out, 1.0)
    assert frames == [frame(i, port=1000 + i % 8) for i in range(40)]


def test_redundant_mode_delivers_each_frame_once_whatever_one_path_loses():
    ga, gb = end("gA", "gB", mode="redundant"), end("gB", "gA", mode="redundant")
    rng = random.Random(3)
    out = [d for i in range(200) for d in ga.send("gB", frame(i), 1.0)]
    assert len(out) == 400 and all(len({p for _, p, _ in out[i:i + 2]}) == 2 for i in range(0, 400, 2))
    lossy = out[0][1]
    frames, _ = deliver(gb, out, 1.0, drop=lambda path, d: path == lossy and rng.random() < 0.2)
    assert frames == [frame(i) for i in range(200)]
    assert gb.drops[M.DUPLICATE] > 100  # the second copies


def test_a_replayed_data_datagram_is_not_delivered_twice():
    ga, gb = end("gA", "gB"), end("gB", "gA")
    out = ga.send("gB", frame(1), 1.0)
    assert deliver(gb, out, 1.0)[0] == [frame(1)]
    assert deliver(gb, out, 1.0)[0] == []


def test_fec_mode_rebuilds_one_lost_frame_per_group():
    ga, gb = end("gA", "gB", mode="fec", fec_k=4), end("gB", "gA", mode="fec", fec_k=4)
    out = [d for i in range(40) for d in ga.send("gB", frame(i, port=2000 + i % 3), 1.0)]
    parity = [d for d in out if W.decode_header(d[2]).kind == W.KIND_PARITY]
    assert len(parity) == 10 and ga.counters["tunnel_parity_sent"] == 10
    data = [d for d in out if d not in parity]
    lost = {data[i][2] for i in range(1, 40, 4)}  # one frame of each group of 4
    frames, _ = deliver(gb, out, 1.0, drop=lambda path, d: d in lost)
    assert sorted(frames) == sorted(frame(i, port=2000 + i % 3) for i in range(40))
    assert gb.counters["tunnel_fec_recovered"] == 10


def test_sprayed_frames_come_out_in_order_after_taking_paths_of_different_delay():
    ga, gb = end("gA", "gB", spray=True), end("gB", "gA", spray=True)
    out = [d for i in range(60) for d in ga.send("gB", frame(i), 1.0)]
    assert len({p for _, p, _ in out}) == 3
    slow = [d for d in out if d[1] == 3]
    fast = [d for d in out if d[1] != 3]
    frames = deliver(gb, fast, 1.0)[0] + deliver(gb, slow, 1.01)[0]
    assert frames == [frame(i) for i in range(60)]


def test_probes_bring_paths_up_and_a_silent_path_goes_down():
    ga, gb = end("gA", "gB"), end("gB", "gA")
    now = 10.0
    while now < 11.0:
        _, probes = ga.on_timer(now)
        _, echoes = deliver(gb, probes, now, drop=lambda path, d: path == 2 and now > 10.3)
        deliver(ga, echoes, now + 0.001)
        now = round(now + 0.05, 3)
    states = {p["id"]: p["state"] for p in ga.snapshot()}
    assert states == {1: UP, 2: DOWN, 3: UP}
    assert {p["pw_id"] for p in ga.snapshot()} == {1}
    assert all(p["rtt_ms"] is not None for p in ga.snapshot())


def test_probes_and_parity_on_a_one_path_link_are_dropped():
    tun = Tunnel("gB", ("gA",), pn_start=1 << 40)
    tun.install("gA", 1, *link_keys(NETKEY, 1, Endpoint(SEG["gB"], "gB"), Endpoint(SEG["gA"], "gA")), 0.0)
    gb = M.Multipath(tun, {"gA": (0,)}, 1000)
    sender = Tunnel("gA", ("gB",), pn_start=1 << 41)
    sender.install("gB", 1, *link_keys(NETKEY, 1, Endpoint(SEG["gA"], "gA"), Endpoint(SEG["gB"], "gB")), 0.0)
    probe = sender.seal("gB", bytes(28), 1.0, 0, W.KIND_PROBE)
    short = sender.seal("gB", bytes(15), 1.0)
    assert gb.receive("gA", 0, probe, 1.0) == ([], []) and gb.drops[M.BAD_PROBE] == 1
    assert gb.receive("gA", 0, short, 1.0) == ([], []) and gb.drops[M.SHORT_MESSAGE] == 1
    assert gb.on_timer(2.0) == ([], [])  # no probes on a one-path link
