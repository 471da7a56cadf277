"""The agent's control socket: ``state_dir/agent.sock`` (mode 0600 from its creation).

Protocol: the client sends one line (``status``), the agent answers one JSON
document and closes.  ``l2crypt status`` is the client.  keyserverd serves
its admin socket (``keyserverd status``) with the same two functions.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Callable

from l2crypt.core.errors import LocalError
from l2crypt.io.aio_timeout import wait_for

MAX_REQUEST = 256
CLIENT_TIMEOUT_S = 5.0
#: The socket is created under this umask, so it is never group- or world-accessible.
SOCKET_UMASK = 0o177


async def serve_control(path: Path, snapshot: Callable[[], dict]) -> asyncio.AbstractServer:
    """Start answering status requests at ``path``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await wait_for(reader.readline(), CLIENT_TIMEOUT_S)
            if line.strip() == b"status":
                writer.write(json.dumps(snapshot()).encode() + b"\n")
            else:
                writer.write(json.dumps({"error": "unknown command"}).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    if path.exists() or path.is_symlink():
        path.unlink()
    # bind() creates the socket file with the umask's mode: 0600 from the first instant.
    old_umask = os.umask(SOCKET_UMASK)
    try:
        return await asyncio.start_unix_server(handle, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old_umask)


def query_status(path: Path, who: str = "agent") -> dict:
    """Ask a running daemon (``who``: the agent, or keyserverd) for its status;
    LocalError if none answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CLIENT_TIMEOUT_S)
            sock.connect(str(path))
            sock.sendall(b"status\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except FileNotFoundError:
        raise LocalError(f"no {who} is running here: {path} does not exist") from None
    except OSError as exc:
        raise LocalError(f"cannot reach the {who} at {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise LocalError(f"the {who} at {path} sent an unreadable answer") from None
