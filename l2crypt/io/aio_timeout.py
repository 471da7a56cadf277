"""``wait_for``: ``asyncio.wait_for`` without Python 3.11's lost cancellation.

On Python 3.11 (Debian 12), ``asyncio.wait_for(aw, timeout)`` runs ``aw`` in
a task of its own.  When the caller is cancelled while that task finishes at
the same moment (a TLS handshake that fails, a read that returns), it hands
back the task's result or error instead of the cancellation (CPython
gh-86296, fixed in 3.12).  A loop that retries after an error then never
stops: a key-server peering kept retrying after ``close()`` and a test hung.
``asyncio.timeout`` (3.11+) awaits ``aw`` in the caller's own task, so a
cancellation always arrives, and only its own expiry becomes ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``; ``TimeoutError`` after ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(timeout):
        return await aw
