"""A revocation made while keyserverd is down is pushed when it starts
(issue 15, finding 2: ``run_events`` used to start at the newest event).

The real ``keyserverd`` runs on 127.0.0.1 with a SQLite store; ``keyserverd
host revoke`` writes the store while it is stopped; after the restart the
server's own status counts the revocation event it pushed."""

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest

from keyserverd.event_cursor import CURSOR_FILE, EventCursor
from keyserverd.store.sqlite import SqliteStore
from l2crypt.core.errors import LocalError

NOW = 1_700_000_000.0


def keyserverd(state, *args, timeout=30):
    return subprocess.run([sys.executable, "-c", "from keyserverd.cli import main; main()",
                           "--state-dir", str(state), *args], capture_output=True, text=True, timeout=timeout)


def serve(state):
    proc = subprocess.Popen(
        [sys.executable, "-c", "from keyserverd.cli import main; main()", "--state-dir", str(state),
         "--listen", "127.0.0.1:0", "--metrics-listen", "", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert re.match(r"keyserverd: listening on 127\.0\.0\.1:\d+ ", line), line + proc.stderr.read()
    return proc


def stop(proc):
    proc.terminate()
    try:
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


def events_pushed(state) -> dict:
    res = keyserverd(state, "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["events"]


def test_a_revocation_written_while_keyserverd_is_down_is_pushed_when_it_starts(tmp_path):
    state = tmp_path / "ks"
    for host_id, mac in (("a", "02:00:00:00:00:0a"), ("b", "02:00:00:00:00:0b")):
        assert keyserverd(state, "host", "add", host_id, "--mac", mac).returncode == 0
    stop(serve(state))  # it ran once: it knows where it stopped

    res = keyserverd(state, "host", "revoke", "b")  # while it is down
    assert res.returncode == 0 and "host b revoked" in res.stdout, res.stdout + res.stderr

    proc = serve(state)
    try:
        deadline = time.monotonic() + 5
        while events_pushed(state).get("revoke", 0) == 0:
            assert time.monotonic() < deadline, f"the revocation was never pushed: {events_pushed(state)}"
            time.sleep(0.2)
        pushed = events_pushed(state)
        # The revocation and the rotation of the multicast key, once each.
        assert pushed.get("revoke") == 1 and pushed.get("multicast") == 1, pushed
    finally:
        stop(proc)
    # Pushed, and remembered: a third start pushes nothing again.
    proc = serve(state)
    try:
        time.sleep(1.0)  # five polls of the event log
        assert events_pushed(state) == {}
    finally:
        stop(proc)


def test_the_cursor_starts_at_the_newest_event_and_never_above_it(tmp_path):
    store = SqliteStore.open(tmp_path / "keyserver.db", NOW)
    try:
        store.add_host("a", None, "host", b"x" * 32, 4e9, NOW)
        store.rotate_multicast_key(NOW)
        store.rotate_multicast_key(NOW)
        newest = store.last_event_seq()
        path = tmp_path / CURSOR_FILE
        assert EventCursor(path).start(store) == newest  # first start: nothing old is pushed
        assert path.read_text() == f"{newest}\n" and path.stat().st_mode & 0o077 == 0
        EventCursor(path).save(newest - 1)
        assert EventCursor(path).start(store) == newest - 1  # the one event after it is pushed
        EventCursor(path).save(newest + 50)  # a store restored from an older backup
        assert EventCursor(path).start(store) == newest
        assert EventCursor(None).start(store) == newest
        path.write_text("garbage\n")
        with pytest.raises(LocalError, match="not an event number"):
            EventCursor(path).start(store)
    finally:
        store.close()


def test_saving_in_the_background_leaves_the_loop_free_and_ends_with_the_newest(tmp_path, monkeypatch):
    """The fsync of a save took up to 160 ms on a busy disk: the event loop
    goes on meanwhile, and the seqs asked during a write end in the file."""
    cursor = EventCursor(tmp_path / CURSOR_FILE)
    slow_save = cursor.save

    def save(seq):
        time.sleep(0.2)
        slow_save(seq)
    monkeypatch.setattr(cursor, "save", save)

    async def main():
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for seq in (5, 6, 7):
            cursor.save_in_background(seq, loop)
        asked_s = time.monotonic() - started
        await asyncio.wait_for(cursor._writing, 5)
        return asked_s

    assert asyncio.run(main()) < 0.1
    assert (tmp_path / CURSOR_FILE).read_text().strip() == "7"
