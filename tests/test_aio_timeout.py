"""wait_for: a cancellation is never lost, its own expiry is TimeoutError."""

import asyncio

import pytest

from l2crypt.io.aio_timeout import wait_for


def test_a_slow_awaitable_times_out():
    async def main():
        with pytest.raises(TimeoutError):
            await wait_for(asyncio.sleep(5), 0.05)

    asyncio.run(main())


def test_a_result_in_time_is_returned():
    async def main():
        async def answer():
            await asyncio.sleep(0)
            return 42

        assert await wait_for(answer(), 1.0) == 42
        assert await wait_for(answer(), None) == 42

    asyncio.run(main())


def test_cancelling_while_the_inner_awaitable_fails_still_cancels():
    """The 3.11 wait_for bug: an error that lands with the cancellation won.

    A retry loop that catches the error and goes round again must end when
    its task is cancelled, whatever the inner awaitable did at that moment.
    """

    async def main():
        loop = asyncio.get_running_loop()
        attempts = 0
        task = None

        async def failing_connect():
            nonlocal attempts
            attempts += 1
            fut = loop.create_future()

            def fail_and_cancel():
                # The failure and the cancellation land in the same loop turn.
                fut.set_exception(ConnectionError("refused"))
                if attempts == 3:
                    task.cancel()

            loop.call_soon(fail_and_cancel)
            await fut

        async def retry_forever():
            while True:
                try:
                    await wait_for(failing_connect(), 1.0)
                except ConnectionError:
                    await asyncio.sleep(0.001)

        task = asyncio.create_task(retry_forever())
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert task in done, f"the retry loop did not stop on cancel ({attempts} attempts)"
        assert task.cancelled()
        assert attempts == 3

    asyncio.run(main())
