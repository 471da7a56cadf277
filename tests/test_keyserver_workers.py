"""keyserverd with ``workers = 2`` on real processes: two hosts whose
connections the kernel gave to different workers both get the new pair key
(relayed between the workers) and a rotation (through the event log); the
status counts every worker's connections; worker 0 stops the other."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyserverd.workers import Workers, workers_for
from keyserverd.config import load_config
from l2crypt.lab.ks_hosts import KsConnection, client_context, free_port, host_id, mac_of, prepare, start_keyserverd

HOSTS = 8


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _worker_of(conn: KsConnection, server_port: int, pids: list[int]) -> int:
    """The index in ``pids`` of the worker holding the server end of ``conn``."""
    client_port = conn.writer.get_extra_info("sockname")[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], f[9]
        if local.endswith(f":{server_port:04X}") and remote.endswith(f":{client_port:04X}"):
            for index, pid in enumerate(pids):
                if inode in _socket_inodes(pid):
                    return index
    raise AssertionError(f"no worker holds the connection from port {client_port}")


async def _scenario(state: Path, port: int, pids: list[int]) -> None:
    conns = [await KsConnection.open(port, client_context(state, n)) for n in range(HOSTS)]
    for n, conn in enumerate(conns):
        assert (await conn.call({"t": "hello", "mac": mac_of(n)}))["t"] == "welcome"
    where = [_worker_of(conn, port, pids) for conn in conns]
    if len(set(where)) < 2:
        pytest.skip(f"the kernel gave all {HOSTS} connections to one worker")
    a, b = where.index(0), where.index(1)

    answer = await conns[a].call({"t": "key_req", "peer_mac": mac_of(b)})
    assert answer["t"] == "key" and answer["pw_id"] == 1
    pushed = await asyncio.wait_for(conns[b].pushes.get(), 5)  # relayed from worker 0 to worker 1
    assert (pushed["t"], pushed["peer_id"], pushed["key"], pushed["pw_id"]) == ("key", host_id(a), answer["key"], 1)

    rekey = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "keyserverd"), "rekey", "--state-dir", str(state),
        "--pair", host_id(a), host_id(b), stdout=subprocess.DEVNULL)
    assert await rekey.wait() == 0
    got = [await asyncio.wait_for(conns[n].pushes.get(), 5) for n in (a, b)]  # from the event log, each worker
    assert [(m["t"], m["pw_id"]) for m in got] == [("key", 2), ("key", 2)]
    assert got[0]["key"] == got[1]["key"] != answer["key"]
    assert {got[0]["peer_id"], got[1]["peer_id"]} == {host_id(a), host_id(b)}

    deadline = time.monotonic() + 5
    while True:  # worker 1 reports its connections every second
        status = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "keyserverd"), "status", "--json", "--state-dir", str(state),
            stdout=subprocess.PIPE)
        doc = json.loads((await status.communicate())[0])
        if doc["connections"] == HOSTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert doc["connections"] == HOSTS
    for conn in conns:
        conn.close()


def test_two_workers_push_to_both_ends_and_stop_together(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    prepare(state, HOSTS)
    port = free_port()
    proc = start_keyserverd(state, port, extra=("--workers", "2"))
    try:
        children = _children(proc.pid)
        assert len(children) == 1
        asyncio.run(_scenario(state, port, [proc.pid, *children]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not Path(f"/proc/{children[0]}").exists() or "Z" in Path(f"/proc/{children[0]}/stat").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_count(tmp_path):
    def config(**kv):
        return load_config(None, {"state_dir": tmp_path, "listen": "127.0.0.1:7788", **kv})

    assert workers_for(config(workers=3)) == 3
    assert workers_for(config()) >= 1
    assert workers_for(config(listen="127.0.0.1:0", workers=4)) == 1
    assert workers_for(config(peer_listen="127.0.0.1:7790")) == 1
    with pytest.raises(Exception, match="workers: peer_listen runs in one process"):
        config(peer_listen="127.0.0.1:7790", workers=2)
    assert Workers.start(1).count == 1


def test_pushes_relayed_in_one_loop_turn_all_arrive_in_order_in_few_datagrams():
    """600 pushes relayed in one turn (more than one datagram holds) reach the
    other worker over a real socket pair, every one, in order, in a handful
    of datagrams instead of 600."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (mine, theirs):
        sock.setblocking(False)
    sender, receiver = Workers(0, 2, {1: mine}, []), Workers(1, 2, {0: theirs}, [])

    class Counted:
        """The receiving end, counting the datagrams read."""
        datagrams = 0

        def recv(self, size):
            data = theirs.recv(size)
            self.datagrams += 1
            return data

    class Server:
        def __init__(self):
            self.delivered = []

        def deliver(self, host_id, msg):
            self.delivered.append((host_id, msg["n"]))

    async def relay_600():
        sender.attach(asyncio.get_running_loop(), Server())
        for n in range(600):
            sender.relay(f"h{n % 7}", {"t": "key", "n": n, "key": bytes(128)})
        await asyncio.sleep(0)  # the end of the loop turn

    asyncio.run(relay_600())
    server, counted = Server(), Counted()
    receiver._receive(counted, server)
    assert server.delivered == [(f"h{n % 7}", n) for n in range(600)]
    assert 2 <= counted.datagrams <= 10 and sender.relay_failures == 0
    mine.close()
    theirs.close()
