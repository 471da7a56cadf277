"""The control sockets (agent, layer-3 agent, gateway, keyserverd admin) are
0600 from the instant they exist: created under a umask, not chmod-ed after
(issue 15, low items)."""

import asyncio
import os
import stat

from l2crypt.ops import control
from l2crypt.ops.control import query_status, serve_control


def test_the_socket_is_never_group_or_world_accessible(tmp_path, monkeypatch):
    path = tmp_path / "agent.sock"
    modes = []
    real_start = asyncio.start_unix_server

    async def start_and_look(*args, **kw):  # look at the file the moment bind() made it
        server = await real_start(*args, **kw)
        modes.append(stat.S_IMODE(os.stat(kw["path"]).st_mode))
        return server

    monkeypatch.setattr(control.asyncio, "start_unix_server", start_and_look)
    old_umask = os.umask(0)  # the worst a daemon could inherit
    try:
        async def body():
            server = await serve_control(path, lambda: {"id": "h1"})
            try:
                assert os.umask(0) == 0  # the daemon's own umask is back as it was
                return await asyncio.to_thread(query_status, path)
            finally:
                server.close()

        doc = asyncio.run(body())
    finally:
        os.umask(old_umask)
    assert doc == {"id": "h1"}  # the socket works
    assert modes == [0o600], [oct(m) for m in modes]
