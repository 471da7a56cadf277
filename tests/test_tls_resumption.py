"""Cheap reconnects: the agent's key client offers the TLS session it had
(TLS 1.3 ticket) when it connects again, and keyserverd resumes it -- even
when the new connection lands on another worker -- after a jittered wait."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from l2crypt.agent.keyclient import KeyClient
from l2crypt.lab.ks_hosts import client_context, free_port, mac_of, prepare, start_keyserverd


class Events:
    """The agent's side of the key client, counting welcomes."""

    def __init__(self):
        self.welcomes = 0

    def on_welcome(self, msg):
        self.welcomes += 1

    def __getattr__(self, name):  # on_key, on_disconnect, ...: nothing to do here
        return lambda *args, **kwargs: None


async def _wait(what, predicate, timeout_s=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_reconnect_resumes_the_tls_session(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    prepare(state, 1)
    port = free_port()
    proc = start_keyserverd(state, port, extra=("--workers", "2"))

    async def body():
        events = Events()
        client = KeyClient((f"127.0.0.1:{port}",), client_context(state, 0), mac_of(0), events,
                           probe_interval_s=5.0, reconnect_jitter_s=0.05)
        stop = asyncio.Event()
        task = asyncio.ensure_future(client.run(stop))
        try:
            for n in range(1, 4):  # the server end drops; the client comes back on its ticket
                await _wait(f"session {n}", lambda: client.connected and events.welcomes == n)
                if n < 3:
                    client._writer.transport.abort()  # the next welcome says it came back
            assert client.connects == 3
            assert client.resumed == 2  # every reconnect resumed: no certificate exchange
        finally:
            stop.set()
            task.cancel()

    try:
        asyncio.run(body())
        deadline = time.monotonic() + 5
        while True:  # the server side counts them too (worker 1 reports every second)
            status = subprocess.run([str(Path(sys.executable).parent / "keyserverd"), "status", "--json",
                                     "--state-dir", str(state)], capture_output=True, text=True, timeout=10)
            resumed = json.loads(status.stdout)["tls_resumed"]
            if resumed == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert resumed == 2
    finally:
        proc.terminate()
        proc.wait(10)
