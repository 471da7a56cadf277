"""keyserverd's full garbage collections run on a timer (``daemon.FULL_GC_S``),
not whenever CPython decides: with 10,000 hosts connected one took 50-130 ms,
and no request was answered meanwhile."""

import asyncio
import gc

from keyserverd import daemon


def test_full_collections_run_on_the_timer_only(monkeypatch):
    saved = gc.get_threshold()
    monkeypatch.setattr(daemon, "FULL_GC_S", 0.05)
    try:
        async def main() -> int:
            daemon._full_gc_on_timer(asyncio.get_running_loop())
            assert gc.get_threshold()[:2] == saved[:2]  # the young generations are untouched
            assert gc.get_threshold()[2] >= 2**30       # CPython starts no full collection itself
            before = gc.get_stats()[2]["collections"]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while gc.get_stats()[2]["collections"] - before < 2 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            return gc.get_stats()[2]["collections"] - before

        assert asyncio.run(main()) >= 2  # the timer's (every 0.05 s), again and again
    finally:
        gc.set_threshold(*saved)
