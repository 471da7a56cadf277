"""How a keyserverd worker's requests meet its store: the ones that only read
are answered at once, the ones that write are committed together.

1. ``add(conn, msgs)``: the whole messages read from a connection (a batch).
   The batches read in one turn of the event loop are handled at the end of
   it (``_run``), in order.
2. If the store's turn is free (``store.take_turn``: on SQLite the workers
   take turns to write) and nothing waits for it, every batch is handled in
   one store group (4): one snapshot, one commit for all.
3. Else (another worker is writing, or this one waits for its turn) each
   batch is first handled inside ``store.reads_only()``.  A request that
   only reads (a pair key that exists, a ping: most of them) reads committed
   rows and nothing else, so its answer goes out at once: it waits for no
   commit and no other worker.  A request that needs a write (a new pair, a
   rotation, a binding) stops before it writes (``WritesDeferred``; the
   service takes back what it counted).  It and the rest of its batch wait
   for a write group, and so do later batches of its connection, so every
   connection is answered in the order it asked.  A worker whose turn it is
   not asks again ``TURN_RETRY_S`` later, reading on meanwhile.
4. A store group: every request is handled inside one ``store.group()``, so
   the writes are committed with one fsync.  Only then are their actions
   carried out: no answer leaves before the write it reports is durable.
   If the commit fails, each of those connections is told
   ``store_unavailable`` and closed (its client reconnects and asks again).
   ``KeyService.begin_group``/``end_group`` bracket it.
5. What a request does is ``KeyService.handle``'s actions; an exception in it
   other than the store's is an ``internal`` error answer, logged.
This module owns no socket: the server carries the actions out (``act``)
and resumes or closes the connection (``done``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from keyserverd.store.protocol import StoreUnavailable, WritesDeferred
from l2crypt.ops.logs import fields

log = logging.getLogger("keyserverd")

#: How soon a worker asks again for its turn to write (``store.take_turn``).
TURN_RETRY_S = 0.0005


class RequestGroups:
    """The batches of messages waiting to be handled (see the module docstring)."""

    def __init__(self, service, act: Callable, done: Callable):
        self.service = service
        #: ``act(conn, actions)`` carries out one request's actions; False: close ``conn``.
        self._act = act
        #: ``done(conn, keep_open)``: one batch of ``conn`` is answered.
        self._done = done
        #: Batches read since the last run: (connection, messages).
        self._queued: list[tuple[object, list[dict]]] = []
        #: Batches waiting for a write group, and their connections.
        self._writes: list[tuple[object, list[dict]]] = []
        self._writing: set = set()
        self._writes_due = False
        #: Seconds each request took in ``KeyService.handle`` (set by the metrics module).
        self.observe_request = None
        #: Answered without a write, committed groups, failed ones, and the requests they held.
        self.answered_at_once = 0
        self.group_commits = 0
        self.group_commits_failed = 0
        self.grouped_requests = 0

    def add(self, conn, msgs: list[dict]) -> None:
        """A batch of ``conn``'s messages, to be handled at the end of this loop turn."""
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._run)
        self._queued.append((conn, msgs))

    def _run(self) -> None:
        """One group if the store's turn is free; else answer what only reads and
        leave the rest for a write group (module docstring, 2 to 4)."""
        queued, self._queued = self._queued, []
        if not self._writes_due and self.service.store.take_turn():
            self._group(queued)
            return
        with self.service.store.reads_only():
            self.service.begin_group()
            try:
                for conn, msgs in queued:
                    self._answer_at_once(conn, msgs)
            finally:
                self.service.end_group()
        if self._writes and not self._writes_due:
            self._run_writes()

    def _answer_at_once(self, conn, msgs: list[dict]) -> None:
        """Inside ``reads_only()``: answer ``conn``'s messages up to the first that writes."""
        if conn in self._writing:  # an earlier batch waits for a write: keep the order
            self._writes.append((conn, msgs))
            return
        if conn.link.closing:
            self._done(conn, False)
            return
        answers, rest = self._handle(conn, msgs, reads_only=True)
        self.answered_at_once += len(answers)
        keep_open = all(self._act(conn, actions) for actions in answers)
        if rest and keep_open:
            self._writes.append((conn, rest))
            self._writing.add(conn)
        else:
            self._done(conn, keep_open)

    def _run_writes(self) -> None:
        """Handle every waiting batch in one store group once the turn is ours."""
        self._writes_due = False
        if not self.service.store.take_turn():  # another worker is writing: read on, try again
            self._writes_due = True
            asyncio.get_running_loop().call_later(TURN_RETRY_S, self._run_writes)
            return
        writes, self._writes = self._writes, []
        self._writing.clear()
        self._group(writes)

    def _group(self, writes: list) -> None:
        """With the store's turn: handle ``writes`` in one store group, then act (module docstring, 4)."""
        handled, closing = [], set()
        try:
            with self.service.store.group():
                self.service.begin_group()
                for conn, msgs in writes:
                    skip = conn in closing or conn.link.closing
                    answers = [] if skip else self._handle(conn, msgs, reads_only=False)[0]
                    if any(target == "close" for actions in answers for target, _ in actions):
                        closing.add(conn)  # its later batches are not handled
                    handled.append((conn, answers))
        except StoreUnavailable as exc:
            self.group_commits_failed += 1
            for conn, msgs in writes:
                for msg in msgs:
                    conn.send({"t": "error", "rid": msg.get("rid", 0), "code": exc.code, "msg": str(exc)})
                self._done(conn, False)
            return
        finally:
            self.service.end_group()
        self.group_commits += 1
        self.grouped_requests += sum(len(msgs) for _, msgs in writes)
        for conn, answers in handled:
            self._done(conn, all(self._act(conn, actions) for actions in answers))

    def _handle(self, conn, msgs: list[dict], reads_only: bool) -> tuple[list[list], list[dict]]:
        """The service's actions for each message, up to the first that closes the
        connection; and the messages left for a write group (``reads_only``)."""
        answers = []
        for index, msg in enumerate(msgs):
            started = time.perf_counter()
            try:
                actions = self.service.handle(conn.session, msg, now=time.time())
            except WritesDeferred:
                return answers, msgs[index:]
            except StoreUnavailable as exc:
                if not reads_only:
                    raise  # the group cannot commit
                actions = [("reply", {"t": "error", "rid": msg.get("rid", 0), "code": exc.code, "msg": str(exc)}),
                           ("close", {})]
            except Exception:
                log.exception("request_internal_error", extra=fields(type=msg.get("t"), host=conn.session.who))
                actions = [("reply", {"t": "error", "rid": msg.get("rid", 0), "code": "internal",
                                      "msg": "internal error; see the key server log"})]
            if self.observe_request is not None:
                self.observe_request(msg.get("t"), time.perf_counter() - started)
            answers.append(actions)
            if any(target == "close" for target, _ in actions):
                break
        return answers, []
