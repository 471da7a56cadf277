"""Load-independent cost measurements of the data path (used by ``scripts/bench``).

Wall-clock throughput depends on what else the machine runs; these do not:

1. ``engine_cost``: CPU time (``time.process_time``) per frame of
   ``seal_from_tap`` and of ``open_from_wire`` for frames of one size, between
   two in-memory engines holding a pair key.  No I/O, so it is the floor the
   agent's interpreter and cipher work put under every frame.
2. ``peer_table_rss``: the resident memory of a fresh process that loads the
   agent's modules, builds an engine, installs ``n`` peers (pair keys, as the key client would) and seals
   and opens one frame per peer, against the same process with no peers.

3. ``instructions_per_frame``: user-space instructions per seal or open,
   counted by ``valgrind --tool=callgrind`` (the difference between a run
   with ``frames`` frames and one with none, divided by ``frames``).  Exact
   and independent of load, but it leaves out the kernel and cache misses.

Nothing here touches the network or a real key; the keys are random.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from l2crypt.core.engine import EngineSettings, FrameEngine
from l2crypt.core.replay_floor import FloorBook

MAC_A = bytes.fromhex("024c49000001")
MAC_B = bytes.fromhex("024c49000002")


def _pair(n_peers: int = 0) -> tuple[FrameEngine, FrameEngine]:
    """Two engines as the agent runs them: each with a saved replay-floor book."""
    engines = []
    for mac in (MAC_A, MAC_B):
        book = FloorBook()
        book.save([], 0.0)
        engines.append(FrameEngine(mac, EngineSettings(), pn_start=1, floors=book, now0=0.0))
    a, b = engines
    key = os.urandom(32)
    a.install_pair_key(MAC_B, "h2", key, 1, 0.0)
    b.install_pair_key(MAC_A, "h1", key, 1, 0.0)
    return a, b


def plain_frame(size: int, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    """An IPv4-looking Ethernet frame of ``size`` bytes (MAC header included)."""
    return dst + src + b"\x08\x00" + bytes((i * 7) & 0xFF for i in range(size - 14))


def engine_cost(size: int = 1414, frames: int = 20000, rounds: int = 3) -> dict:
    """CPU microseconds per frame to seal and to open a ``size``-byte frame (best of ``rounds``)."""
    a, b = _pair()
    frame = plain_frame(size)
    seal, open_ = a.seal_from_tap, b.open_from_wire
    best_seal = best_open = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        sealed = [seal(frame, 1.0) for _ in range(frames)]
        t1 = time.process_time()
        opened = [open_(s, 1.0) for s in sealed]
        t2 = time.process_time()
        if any(o != frame for o in opened):
            raise AssertionError("engine_cost: a frame did not round-trip")
        best_seal = min(best_seal, (t1 - t0) / frames * 1e6)
        best_open = min(best_open, (t2 - t1) / frames * 1e6)
    return {"frame_bytes": size, "frames": frames, "seal_us": round(best_seal, 3),
            "open_us": round(best_open, 3)}


def _ir_child(what: str, size: int, frames: int) -> None:
    a, b = _pair()
    frame = plain_frame(size)
    warm = [a.seal_from_tap(frame, 1.0) for _ in range(100)]
    for s in warm:
        b.open_from_wire(s, 1.0)
    sealed = [a.seal_from_tap(frame, 1.0) for _ in range(frames if what == "open" else 0)]
    if what == "seal":
        for _ in range(frames):
            a.seal_from_tap(frame, 1.0)
        return
    # The sealing above is the same in both runs only in count; subtract it separately.
    for s in sealed:
        b.open_from_wire(s, 1.0)


def _child_env() -> dict:
    """The environment of a measuring child: it imports this very copy of l2crypt."""
    here = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))}


def _instructions(what: str, size: int, frames: int) -> int:
    code = f"from l2crypt.lab.perf_probe import _ir_child; _ir_child({what!r}, {size}, {frames})"
    res = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=_child_env())
    for line in res.stderr.splitlines():
        if "I   refs:" in line or "I refs:" in line:
            return int(line.split(":")[1].replace(",", "").strip())
    raise RuntimeError(f"callgrind gave no count: {res.stderr[-500:]}")


def instructions_per_frame(size: int = 1414, frames: int = 2000) -> dict:
    """User-space instructions per seal and per open of a ``size``-byte frame (needs valgrind)."""
    base = _instructions("seal", size, 0)
    seal = (_instructions("seal", size, frames) - base) / frames
    both = (_instructions("open", size, frames) - base) / frames  # seal (into a list) + open
    return {"frame_bytes": size, "seal_instr": round(seal), "open_instr": round(both - seal)}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _table_child(n_peers: int) -> None:
    """Run in a fresh interpreter: build the table, print RSS in KiB."""
    from l2crypt.agent import agent  # noqa: F401  - what an agent process has loaded (asyncio, ssl, key client)

    a = FrameEngine(MAC_A, EngineSettings(), pn_start=1)
    a.install_multicast_key(os.urandom(32), 1, 0.0)
    for i in range(n_peers):
        mac = bytes.fromhex("025e00") + i.to_bytes(3, "big")
        a.install_pair_key(mac, f"peer{i}", os.urandom(32), 1, 0.0)
        frame = plain_frame(100, dst=mac)
        if a.seal_from_tap(frame, 0.0) is None:
            raise AssertionError("peer_table_rss: a frame was not sealed")
    print(_rss_kib())


def peer_table_rss(n_peers: int = 1000) -> dict:
    """RSS (MiB) of an agent-sized process holding ``n_peers`` peers, and with none."""
    out = {}
    for n in (0, n_peers):
        res = subprocess.run([sys.executable, "-c", f"from l2crypt.lab.perf_probe import _table_child; _table_child({n})"],
                             capture_output=True, text=True, timeout=120, check=True, env=_child_env())
        out[n] = int(res.stdout.strip()) / 1024
    # The agent process also imports the key client, TLS and asyncio.
    return {"peers": n_peers, "rss_mib": round(out[n_peers], 1), "rss_mib_no_peers": round(out[0], 1),
            "per_peer_kib": round((out[n_peers] - out[0]) * 1024 / max(1, n_peers), 2)}


if __name__ == "__main__":
    print(engine_cost(), engine_cost(size=64), peer_table_rss())
