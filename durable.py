"""durable.py: durable execution for Python services, in one file.

One file, standard library only, Python 3.11 or newer. Copy it into your project.

A *workflow* is a function whose steps are checkpointed, one by one, in a SQLite
file in WAL mode (the journal). A step that raises is retried with backoff; a step
that finished never runs again; the same workflow id submitted twice runs once; and
after the process is killed, the next start resumes every unfinished workflow from
its first unfinished step. No server, no broker.

    from durable import Durable

    dur = Durable("orders.db")

    @dur.register
    def process_order(ctx, order):
        yield ctx.run(reserve_stock, order)
        charge_id = yield ctx.run(charge_card, order, f"{ctx.id}/charge")
        return {"orderId": order["id"], "chargeId": charge_id}

    async with dur:                               # opens, resumes unfinished work
        handle = await dur.run("order/42", process_order, order)
        print(await handle.result())

A step's body runs at least once; its result is recorded exactly once. A step with
an outside effect passes a stable key (like ``f"{ctx.id}/charge"``) to the outside
system, so a re-run after a crash does not repeat the effect. Several processes may
share one journal: each holds its workflows under a lease, and takes over those of
a process that died. From a shell:

    python durable.py orders.db list|show ID|retry ID|cancel ID|prune 7d [--json]

SPDX-License-Identifier: MIT
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import queue
import random
import secrets
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, NoReturn, TypeVar, overload

__version__ = "0.1.0"
__all__ = [
    "Context",
    "Durable",
    "DurableError",
    "Handle",
    "IdempotencyConflict",
    "InvalidInput",
    "JournalError",
    "NonDeterminismError",
    "NotFound",
    "Permanent",
    "RetryPolicy",
    "Status",
    "StepFailed",
    "StepRecord",
    "WorkflowCancelled",
    "WorkflowFailed",
]

_log = logging.getLogger("durable")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

# CONSTANTS AND SQL.

_APPLICATION_ID = 0x44757261  # "Dura" in the SQLite file header: this file is a journal.
_MAX_ID_LENGTH = 255
_MAX_BATCH = 1024  # most writes committed together in one transaction
_UNFINISHED = ("pending", "running")
_FINISHED = ("done", "failed", "cancelled")

State = Literal["pending", "running", "done", "failed", "cancelled"]
StepState = Literal["running", "done", "failed"]

# Each entry is one schema version; entry i takes a journal from version i to i + 1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE workflows (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            input       TEXT NOT NULL,
            input_hash  TEXT NOT NULL,
            state       TEXT NOT NULL,
            result      TEXT,
            error       TEXT,
            owner       TEXT,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            finished_at REAL
        )""",
        """CREATE INDEX workflows_unfinished ON workflows (state)
            WHERE state IN ('pending', 'running')""",
        """CREATE TABLE steps (
            workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
            seq         INTEGER NOT NULL,
            name        TEXT NOT NULL,
            state       TEXT NOT NULL,
            attempts    INTEGER NOT NULL,
            result      TEXT,
            error       TEXT,
            failures    TEXT,
            started_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            finished_at REAL,
            PRIMARY KEY (workflow_id, seq)
        ) WITHOUT ROWID""",
        # One row per open Durable: its lease, renewed while it runs. A workflow whose
        # owner's lease ran out (or whose owner has no row) may be taken over.
        """CREATE TABLE owners (
            id          TEXT PRIMARY KEY,
            expires_at  REAL NOT NULL
        ) WITHOUT ROWID""",
    ),
)

_INSERT_WORKFLOW = """
    INSERT INTO workflows (id, name, input, input_hash, state, owner, created_at, updated_at)
    VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)
    ON CONFLICT (id) DO NOTHING"""
_SELECT_IDENTITY = "SELECT name, input_hash, state, owner FROM workflows WHERE id = ?"
# Many at once: the ids, and the new rows, as one JSON array each.
_SELECT_IDENTITIES = """
    SELECT id, name, input_hash, state, owner FROM workflows
    WHERE id IN (SELECT value FROM json_each(?))"""
_INSERT_WORKFLOWS = """
    INSERT INTO workflows (id, name, input, input_hash, state, owner, created_at, updated_at)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
           json_extract(value, '$[2]'), json_extract(value, '$[3]'), 'pending',
           json_extract(value, '$[4]'), ?, ?
    FROM json_each(?) WHERE true"""
# Fencing: every checkpoint matches only while the writer owns the workflow and the
# workflow is unfinished. A workflow's first checkpoint in a process marks it running;
# later ones write their step rows only under the same condition (one statement).
_TOUCH_WORKFLOW = """
    UPDATE workflows SET state = 'running', updated_at = ?
    WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""
_FINISH_WORKFLOW = """
    UPDATE workflows SET state = ?, result = ?, error = ?, updated_at = ?, finished_at = ?
    WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""
# A step row written whole: the start of an attempt, or the step's end. An existing row
# keeps its name and first start. `failures` is a JSON list of the step's failed
# attempts (attempt, times, error); a durable sleep's result is its wake time.
_STEP_COLUMNS = ("workflow_id, seq, name, state, attempts, result, error, failures, "
                 "started_at, updated_at, finished_at")
_STEP_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_STEP_UPSERT = """
    ON CONFLICT (workflow_id, seq) DO UPDATE SET
        state = excluded.state, attempts = excluded.attempts, result = excluded.result,
        error = excluded.error, failures = excluded.failures,
        updated_at = excluded.updated_at, finished_at = excluded.finished_at"""


@functools.lru_cache(maxsize=16)
def _put_steps(count: int, fenced: bool) -> str:
    """SQL writing `count` step rows; fenced: only while (id, owner) holds the workflow
    unfinished (the two last parameters), so that zero rows change when it does not."""
    values = ", ".join([_STEP_VALUES] * count)
    if not fenced:
        return f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES {values} {_STEP_UPSERT}"
    return (f"INSERT INTO steps ({_STEP_COLUMNS}) SELECT * FROM (VALUES {values}) "
            "WHERE EXISTS (SELECT 1 FROM workflows WHERE id = ? AND owner = ? "
            f"AND state IN ('pending', 'running')) {_STEP_UPSERT}")


_SELECT_WORKFLOW = """
    SELECT w.id, w.name, w.state, w.result, w.error, w.created_at, w.updated_at,
           w.finished_at, w.owner, o.expires_at
    FROM workflows w LEFT JOIN owners o ON o.id = w.owner WHERE w.id = ?"""
_SELECT_STEPS = """
    SELECT seq, name, state, attempts, result, error, failures, started_at, updated_at,
           finished_at
    FROM steps WHERE workflow_id = ? ORDER BY seq"""
_SELECT_OUTCOME = "SELECT state, result, error FROM workflows WHERE id = ?"
_SELECT_ORPHANS = """
    SELECT w.id, w.name, w.owner, o.expires_at
    FROM workflows w LEFT JOIN owners o ON o.id = w.owner
    WHERE w.state IN ('pending', 'running') AND (w.owner IS NULL OR w.owner != ?)"""
# Takes a workflow from the owner seen a moment ago, only if that owner is still its
# owner and is known dead (first ?) or holds no live lease (second ?: now).
_CLAIM = """
    UPDATE workflows SET owner = ?, updated_at = ?
    WHERE id = ? AND owner IS ? AND state IN ('pending', 'running')
      AND (? OR owner IS NULL OR NOT EXISTS (
          SELECT 1 FROM owners WHERE owners.id = workflows.owner AND owners.expires_at >= ?))"""
_RENEW_OWNER = """
    INSERT INTO owners (id, expires_at) VALUES (?, ?)
    ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"""
_DELETE_OWNER = "DELETE FROM owners WHERE id = ?"
_FORGET_OWNERS = """
    DELETE FROM owners WHERE expires_at < ? AND id NOT IN (
        SELECT owner FROM workflows
        WHERE state IN ('pending', 'running') AND owner IS NOT NULL)"""
_SELECT_OWNED = """
    SELECT id, name, input FROM workflows
    WHERE owner = ? AND state IN ('pending', 'running')"""
_SELECT_OWNED_STEPS = """
    SELECT s.workflow_id, s.seq, s.name, s.state, s.attempts, s.result, s.error, s.failures,
           s.updated_at
    FROM steps s JOIN workflows w ON w.id = s.workflow_id
    WHERE w.owner = ? AND w.state IN ('pending', 'running')"""
_SELECT_INPUT = "SELECT id, name, input FROM workflows WHERE id = ?"
_SELECT_REPLAY = """
    SELECT workflow_id, seq, name, state, attempts, result, error, failures, updated_at
    FROM steps WHERE workflow_id = ?"""
_SELECT_LIST = """
    SELECT w.id, w.name, w.state, w.created_at, w.updated_at, w.finished_at,
           (SELECT count(*) FROM steps s WHERE s.workflow_id = w.id)
    FROM workflows w WHERE (? IS NULL OR w.state = ?)
    ORDER BY w.created_at DESC LIMIT ?"""
_SELECT_STATES = "SELECT state, owner FROM workflows WHERE id = ?"
_CANCEL = """
    UPDATE workflows SET state = 'cancelled', error = ?, updated_at = ?, finished_at = ?
    WHERE id = ? AND state IN ('pending', 'running')"""
_LAST_FAILED_STEP = "SELECT max(seq) FROM steps WHERE workflow_id = ? AND state = 'failed'"
_DELETE_STEPS_FROM = "DELETE FROM steps WHERE workflow_id = ? AND seq >= ?"
_REOPEN = """
    UPDATE workflows SET state = 'pending', result = NULL, error = NULL, finished_at = NULL,
                         owner = ?, updated_at = ?
    WHERE id = ? AND state = 'failed'"""
_PRUNE = """
    DELETE FROM workflows WHERE rowid IN (
        SELECT rowid FROM workflows
        WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ? LIMIT ?)"""
_RELEASE = """
    UPDATE workflows SET owner = NULL
    WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""

# ERRORS.


class DurableError(Exception):
    """Root of every error durable.py raises."""


class JournalError(DurableError):
    """The journal file cannot be used: not a journal, a newer schema, or a failed write."""


class InvalidInput(DurableError, ValueError):
    """A call was given something it cannot accept; nothing was written."""


class NotFound(DurableError, LookupError):
    """No workflow has this id."""


class IdempotencyConflict(DurableError):
    """The id is taken by a workflow with another function or other arguments."""


class NonDeterminismError(DurableError):
    """The workflow's code no longer matches its journal."""


class WorkflowCancelled(DurableError):
    """The workflow was cancelled."""


class StepFailed(DurableError):
    """A step failed for good: out of attempts, or it raised `Permanent`.

    Raised inside the workflow, live and on replay alike, so the workflow may catch
    it and compensate. `error_type` and `message` describe the step's last error.
    """

    def __init__(self, step: str, error_type: str, message: str, attempts: int) -> None:
        super().__init__(
            f"step {step!r} failed after {attempts} attempt(s): {error_type}: {message}"
        )
        self.step = step
        self.error_type = error_type
        self.message = message
        self.attempts = attempts


class WorkflowFailed(DurableError):
    """The workflow ended with an error; `error_type` and `message` say which."""

    def __init__(self, workflow_id: str, error: dict[str, Any]) -> None:
        self.workflow_id = workflow_id
        self.error_type = str(error.get("type", "Error"))
        self.message = str(error.get("message", ""))
        self.step: str | None = error.get("step")
        where = f" in step {self.step!r}" if self.step else ""
        super().__init__(
            f"workflow {workflow_id!r} failed{where}: {self.error_type}: {self.message}"
        )


class Permanent(Exception):
    """Raise from a step (or subclass) for a failure that retrying cannot fix."""


class _Interrupted(BaseException):
    """The workflow must stop without an outcome: its journal could not be written,
    or another process holds it now. A BaseException, so workflow code that catches
    `Exception` cannot swallow it; the workflow stays unfinished in the journal."""


class _Fenced(_Interrupted):
    """The workflow must stop here for good: it was cancelled, finished elsewhere, or
    another process holds it now. Nothing more is recorded from this process."""

    def __init__(self, workflow_id: str, why: str, level: int = logging.WARNING) -> None:
        super().__init__(f"workflow {workflow_id!r} is no longer held by this process: {why}; "
                         "nothing more is recorded from here")
        self.level = level


def _why_fenced(conn: sqlite3.Connection, workflow_id: str) -> _Fenced:
    row = conn.execute(_SELECT_STATES, (workflow_id,)).fetchone()
    if row is None:
        return _Fenced(workflow_id, "it was pruned from the journal")
    if row[0] == "cancelled":
        return _Fenced(workflow_id, "it was cancelled", logging.INFO)
    if row[0] in _FINISHED:
        return _Fenced(workflow_id, f"it is {row[0]} already")
    return _Fenced(workflow_id, "another process took it over (this one was paused, stuck "
                                "or cut off past its lease)")


def _check_id(workflow_id: object) -> None:
    if not isinstance(workflow_id, str):
        raise InvalidInput(f"a workflow id must be a string, not {type(workflow_id).__name__}")
    if not workflow_id:
        raise InvalidInput("a workflow id must not be empty")
    try:
        workflow_id.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"a workflow id must be valid Unicode, not {workflow_id!r}") from None
    if len(workflow_id) > _MAX_ID_LENGTH:
        raise InvalidInput(
            f"a workflow id must be at most {_MAX_ID_LENGTH} characters, not {len(workflow_id)}"
        )
    if "\x00" in workflow_id:  # SQLite's JSON functions would cut it short there
        raise InvalidInput(f"a workflow id must not contain NUL, as {workflow_id!r} does")


def _name_of(fn: Callable[..., Any]) -> str:
    # "Order.charge" for a method, "charge" for a function defined inside another.
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return str(name).rpartition("<locals>.")[2]


# CODEC: JSON only, never pickle, so whoever can write the file cannot run code.


# Compact, strict JSON (no NaN). Canonical form also sorts keys, so that equal values
# hash equally; stored values keep the caller's key order. Made once, not per call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_ENCODE_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=False).encode


def _dumps(value: Any, *, canonical: bool = False) -> str:
    try:
        text = _ENCODE_CANONICAL(value) if canonical else _ENCODE(value)
    except RecursionError:  # refused like any other value JSON cannot hold
        raise ValueError("it is nested too deeply") from None
    text.encode()  # a lone surrogate cannot be stored: refuse it here, not in the writer
    return text


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, StepFailed):
        return {"type": exc.error_type, "message": exc.message, "step": exc.step,
                "attempts": exc.attempts}
    return {"type": type(exc).__name__, "message": str(exc)}


# OWNER IDENTITY: which process holds a workflow, and whether it is still alive.


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """A token that changes when `pid` is reused, or None if no such process runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS, BSD): the pid alone, so a reused pid looks alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    # Field 3 is the state (Z: exited, not yet reaped) and field 22 the start time in
    # clock ticks since boot; the name (field 2) may hold spaces and parentheses, so
    # count from its closing parenthesis. https://man7.org/linux/man-pages/man5/proc.5.html
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else _boot_id() + ":" + fields[19]


def _owner_is_dead(owner: str, host: str) -> bool:
    """True only when `owner` is a process on this host that has exited."""
    parts = owner.split("|")
    if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
        return False  # another machine: only its lease can tell
    current = _process_start(int(parts[1]))
    return current is None or (current != "" and current != parts[2])


# JOURNAL: connections, schema, transactions, and the one writer thread.


# What to do about an SQLite error, by its primary result code.
_ADVICE = {
    "SQLITE_READONLY": "the journal file or its folder is read-only; make both writable",
    "SQLITE_CANTOPEN": "the journal cannot be opened; its folder must exist and be writable "
                       "(WAL mode keeps -wal and -shm files beside it)",
    "SQLITE_FULL": "the disk, or the journal's size limit, is full; free some space",
    "SQLITE_BUSY": "another connection held the write lock longer than busy_timeout",
    "SQLITE_LOCKED": "another connection held the write lock longer than busy_timeout",
    "SQLITE_CORRUPT": "the journal file is damaged; restore it from a backup",
    "SQLITE_NOTADB": "the file is not an SQLite database",
    "SQLITE_IOERR": "the disk reported an I/O error",
}


def _journal_error(what: str, exc: sqlite3.Error) -> JournalError:
    code = getattr(exc, "sqlite_errorname", "").split("_")[:2]
    advice = _ADVICE.get("_".join(code))
    return JournalError(f"{what}: {exc}" + (f" ({advice})" if advice else ""))


def _connect(path: str, synchronous: str, busy_timeout: float, *,
             create: bool = True) -> sqlite3.Connection:
    """Open the journal, refuse a file that is not one, and bring its schema up to date.
    With create=False an empty file is refused too, and left as it is."""
    try:
        # isolation_level=None: no implicit transactions; _transaction() opens them.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise _journal_error(f"cannot open journal {path!r}", exc) from None
    try:
        # Wait this long for another process's write lock instead of failing at once.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        version = _check_schema(conn, path)
        if not create and version == 0:
            raise JournalError(f"{path!r} is not a durable.py journal (it holds no journal "
                               "yet); give the path of a journal a service has written")
        # WAL: readers never block the writer, the writer never blocks readers, and a
        # commit is one append to the log. https://www.sqlite.org/wal.html
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL syncs the log at every commit (survives power loss); NORMAL syncs only
        # at checkpoints (survives a process crash). https://www.sqlite.org/pragma.html#pragma_synchronous
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Steps are deleted with their workflow (ON DELETE CASCADE).
        conn.execute("PRAGMA foreign_keys = ON")
        if version < len(_MIGRATIONS):
            _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise _journal_error(f"cannot use journal {path!r}", exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, path: str) -> int:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.OperationalError as exc:  # locked, or cannot be opened as it should
        raise _journal_error(f"cannot use journal {path!r}", exc) from None
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"{path!r} is not a durable.py journal ({exc}); give Durable a new file "
            "or the journal you meant"
        ) from None
    if app_id != _APPLICATION_ID and (app_id or version or tables):
        raise JournalError(
            f"{path!r} is a SQLite database but not a durable.py journal; "
            "keep the journal in a file of its own"
        )
    if version > len(_MIGRATIONS):
        raise JournalError(
            f"journal {path!r} has schema version {version}, newer than this durable.py "
            f"{__version__} knows ({len(_MIGRATIONS)}); upgrade durable.py to open it"
        )
    return int(version)


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    with _transaction(conn):
        version = _check_schema(conn, path)  # again: another process may have migrated
        for statements in _MIGRATIONS[version:]:
            for sql in statements:
                conn.execute(sql)
        # PRAGMA takes no parameters; both values are this module's own integers.
        conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The one way into a write transaction: BEGIN IMMEDIATE takes the write lock up
    front (waiting up to busy_timeout), so a transaction never fails halfway for
    want of it. Any exception rolls everything back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_Op = Callable[[sqlite3.Connection], Any]
_Row = tuple[Any, ...]  # a step row, in the order of _STEP_COLUMNS
_Outcome = tuple[str, str | None, str | None]  # a finished workflow's state, result, error


class _Writer:
    """The journal's write connection, and the thread that commits for the event loop.

    Coroutines queue operations; the writer thread takes every operation waiting and
    commits them in one transaction, so they share one fsync (group commit). A step
    thread may commit its own checkpoint in place (`commit_here`) when no batch is
    being committed, taking whatever else is queued along; when one is, it queues and
    waits like everyone else. An operation may refuse (raise) only before it writes
    anything: its caller gets the exception and the others stand. An SQLite error
    fails the whole batch, rolled back, and every caller in it gets a JournalError.
    Each caller resumes only after its commit returned.
    """

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        # Writes wait here in order, and leave only under _lock, in that order: so one
        # workflow's writes commit in the order it queued them, whoever commits them.
        self._queue: collections.deque[tuple[_Op, _Target] | None] = collections.deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()  # one per queued item
        self._lock = threading.Lock()  # held while a batch commits
        self._gate = threading.Lock()  # orders queueing against stopping
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name="durable-writer", daemon=True)
        self._thread.start()

    def submit(self, op: _Op, then: Callable[[bool, Any], None] | None = None
               ) -> asyncio.Future[Any]:
        """Queue `op` for the writer thread (call from the event loop). `then(ok,
        value)` runs on the loop with the outcome just before the future gets it, even
        if the future was cancelled meanwhile."""
        future = self._loop.create_future()
        self._enqueue(op, future if then is None else _Then(future, then))
        return future

    def commit_here(self, op: _Op, alone: bool) -> tuple[bool, Any]:
        """Commit `op` from the calling thread (never the event loop's: it blocks) and
        return (ok, result or exception). In place only when the caller is `alone` (no
        other step running) and nothing else waits to be written; otherwise through the
        writer thread, so that concurrent checkpoints still share commits."""
        if alone and not self._queue and self._lock.acquire(blocking=False):
            try:
                if self._stopped:
                    return False, DurableError("the journal is closed")
                return self._commit_batch([(op, None)])[0]
            finally:
                self._lock.release()
        waiter = _Waiter()
        self._enqueue(op, waiter)
        return waiter.wait()

    def stop(self) -> None:
        """Commit what is queued, then end the thread (blocks: call from a thread)."""
        with self._gate:
            self._stopped = True  # nothing is queued after the end mark
            self._queue.append(None)
            self._wake.put(None)
        self._thread.join()

    def _enqueue(self, op: _Op, target: _Target) -> None:
        with self._gate:
            if not self._stopped:
                self._queue.append((op, target))
                self._wake.put(None)
                return
        _deliver(self._loop, [target], [(False, DurableError("the journal is closed"))])

    def _main(self) -> None:
        while True:
            self._wake.get()
            with contextlib.suppress(queue.Empty):
                while True:  # every item these stand for is queued already: take it now
                    self._wake.get_nowait()
            with self._lock:
                while self._queue and self._queue[0] is not None:  # else: taken along
                    self._commit_batch([])
                if self._queue:  # the end mark, after everything queued before it
                    return

    def _commit_batch(self, batch: list[tuple[_Op, _Target | None]]) -> list[tuple[bool, Any]]:
        """Commit `batch` and whatever else is queued; deliver the queued callers'
        outcomes and return the outcomes of `batch`. Call with the lock held."""
        mine = len(batch)
        while len(batch) < _MAX_BATCH and self._queue and self._queue[0] is not None:
            item = self._queue.popleft()  # the end mark stays for the writer thread
            assert item is not None
            batch.append(item)
        outcomes = self._commit([op for op, _ in batch])
        waiting = [(target, outcome) for (_, target), outcome in zip(batch, outcomes, strict=True)
                   if target is not None]
        if waiting:
            _deliver(self._loop, [t for t, _ in waiting], [o for _, o in waiting])
        return outcomes[:mine]

    def _commit(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with _transaction(self._conn) as conn:
                # run()'s inserts go first, all together: two statements for any number.
                inserts = [op for op in ops if isinstance(op, _Insert)]
                together: list[tuple[bool, Any]] = []
                if len(inserts) > 1:
                    try:
                        together = _Insert.all(conn, inserts)
                    except Exception as exc:
                        if isinstance(exc, sqlite3.Error):
                            raise
                        together = [(False, exc)] * len(inserts)  # refused before writing
                inserted = iter(together)
                for op in ops:
                    if len(inserts) > 1 and isinstance(op, _Insert):
                        outcomes.append(next(inserted))
                        continue
                    try:
                        outcomes.append((True, op(conn)))
                    except (Exception, _Interrupted) as exc:
                        if isinstance(exc, sqlite3.Error):
                            raise  # the journal failed: the whole batch is rolled back
                        # An op refuses (conflict, fenced, not found) before it writes,
                        # so the others in the batch stand.
                        outcomes.append((False, exc))
        except sqlite3.Error as exc:  # nothing of the batch was committed
            error = _journal_error("journal write failed", exc)
            return [(False, error)] * len(ops)
        return outcomes


class _Insert:
    """run()'s write: record a new workflow, or report the one already under its id
    as (created, state, owner), refusing (IdempotencyConflict) another function or
    other arguments under the same id. Alone it is called as an operation; several in
    one batch are written by `all` in two statements, because every statement costs the
    writer thread the GIL again, and an HTTP server's event loop rarely lets go of it."""

    __slots__ = ("digest", "id", "name", "owner", "text")

    def __init__(self, workflow_id: str, name: str, text: str, digest: str, owner: str) -> None:
        self.id, self.name, self.text, self.digest, self.owner = (
            workflow_id, name, text, digest, owner)

    def __call__(self, conn: sqlite3.Connection) -> tuple[bool, str, str | None]:
        now = time.time()
        values = (self.id, self.name, self.text, self.digest, self.owner, now, now)
        if conn.execute(_INSERT_WORKFLOW, values).rowcount:
            return True, "pending", self.owner
        return self._known(*conn.execute(_SELECT_IDENTITY, (self.id,)).fetchone())

    def _known(self, name: str, digest: str, state: str,
               owner: str | None) -> tuple[bool, str, str | None]:
        if name != self.name:
            raise IdempotencyConflict(
                f"workflow {self.id!r} already exists as {name!r}, not {self.name!r}; "
                "use a new id")
        if digest != self.digest:
            raise IdempotencyConflict(
                f"workflow {self.id!r} already exists with different arguments; use a new "
                "id or the same arguments")
        return False, state, owner

    @staticmethod
    def all(conn: sqlite3.Connection, inserts: list[_Insert]) -> list[tuple[bool, Any]]:
        """Write `inserts` as if one after another; (ok, result or refusal) for each.
        The ids and rows travel as one JSON parameter, so the statements' text never
        changes with their number (SQLite's statement cache keeps two, not hundreds)."""
        ids = _dumps(list(dict.fromkeys(insert.id for insert in inserts)))
        known: dict[str, tuple[str, str, str, str | None]] = {
            wf_id: (name, digest, state, owner)
            for wf_id, name, digest, state, owner in conn.execute(_SELECT_IDENTITIES, (ids,))}
        now = time.time()
        outcomes: list[tuple[bool, Any]] = []
        new: list[tuple[str, str, str, str, str]] = []
        for insert in inserts:
            if insert.id in known:
                try:
                    outcomes.append((True, insert._known(*known[insert.id])))
                except IdempotencyConflict as exc:
                    outcomes.append((False, exc))
            else:
                known[insert.id] = (insert.name, insert.digest, "pending", insert.owner)
                new.append((insert.id, insert.name, insert.text, insert.digest, insert.owner))
                outcomes.append((True, (True, "pending", insert.owner)))
        if new:
            conn.execute(_INSERT_WORKFLOWS, (now, now, _dumps(new)))
        return outcomes


class _Waiter:
    """A thread waiting for its commit (lighter than a threading.Event)."""

    __slots__ = ("_lock", "outcome")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.outcome: tuple[bool, Any] = (False, None)

    def set(self, outcome: tuple[bool, Any]) -> None:
        self.outcome = outcome
        self._lock.release()

    def wait(self) -> tuple[bool, Any]:
        self._lock.acquire()
        return self.outcome


class _Then:
    """A loop future and a callback that gets its outcome first, cancelled or not."""

    __slots__ = ("callback", "future")

    def __init__(self, future: asyncio.Future[Any],
                 callback: Callable[[bool, Any], None]) -> None:
        self.future, self.callback = future, callback


_Target = asyncio.Future[Any] | _Waiter | _Then


def _deliver(loop: asyncio.AbstractEventLoop, targets: list[_Target],
             outcomes: list[tuple[bool, Any]]) -> None:
    """Hand outcomes to waiting threads at once, and to the loop in one callback."""
    futures, results = [], []
    for target, outcome in zip(targets, outcomes, strict=True):
        if isinstance(target, _Waiter):
            target.set(outcome)
        else:
            futures.append(target)
            results.append(outcome)
    if futures:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, futures, results)


class _StepThreads:
    """Worker threads for sync steps, started as needed up to `size`. Lighter than a
    ThreadPoolExecutor (no concurrent.futures.Future per call): each outcome goes
    straight back to the event loop as one callback."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self._size = size
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0

    @property
    def busy(self) -> int:
        """Steps submitted and not yet returned."""
        return self._busy

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               done: Callable[[bool, Any], None],
               begin: Callable[[], BaseException | None] | None = None,
               after: Callable[[Any], Any] | None = None,
               context: contextvars.Context | None = None) -> None:
        """Run fn(*args, **kwargs) in a worker, in `context` (default: a copy of the
        caller's); then done(ok, value) on the loop. If `begin` is given it runs first
        in the same worker (the step's checkpoint); when it returns an exception, fn
        does not run and done gets _BeginFailed. If `after` is given and fn returned,
        done gets after(value) instead."""
        self._queue.put((context or contextvars.copy_context(), fn, args, kwargs, done, begin,
                         after))
        with self._lock:
            self._busy += 1
            if self._busy > self._threads and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"durable-step-{self._threads}",
                                 daemon=True).start()

    def shutdown(self) -> None:
        """Drop steps not yet started (each `done` gets an error); workers end after
        their current step. Call from the event loop."""
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if item is not None:
                    _, _, _, _, done, _, _ = item
                    with self._lock:
                        self._busy -= 1
                    done(False, DurableError("the journal is closed"))
        self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            context, fn, args, kwargs, done, begin, after = item
            value: Any
            try:
                failed = begin() if begin is not None else None
            except BaseException as exc:  # a bug, not the journal: the step must not run
                failed = exc
            if failed is not None:
                ok, value = False, _BeginFailed(failed)
            else:
                try:
                    ok, value = True, context.run(fn, *args, **kwargs)
                except BaseException as exc:  # handed to the workflow as it is
                    ok, value = False, exc
                if ok and after is not None:
                    try:
                        value = after(value)
                    except BaseException as exc:  # a bug: fail the workflow, not the thread
                        value = _Ahead(None, error=exc)
            with self._lock:
                self._busy -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(done, ok, value)
        self._queue.put(None)  # let the next worker see the end too


def _step_error(exc: BaseException) -> BaseException:
    """What a sync step's exception is to its workflow: the exception itself, or a
    RuntimeError for one that a future or the retry loop cannot carry: StopIteration,
    or a BaseException such as CancelledError raised by the step's own code, which
    would otherwise pass for a cancellation of the workflow."""
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        return exc
    return RuntimeError(f"the step raised {exc!r}")


class _BeginFailed(Exception):
    """A step's checkpoint failed in its step thread; the step did not run."""


class _Ahead:
    """What a step thread did after its step, running a generator workflow on: the
    last finished step's row not yet written (`done`), and where the generator is now:
    it yielded `call` (which the thread may have `begun`: (seq, attempt, start, ok,
    value or exception)), returned (`stop`), or raised (`error`); or the thread
    committed the workflow's end (`finished`); or a checkpoint failed (`write_error`),
    which stops the workflow."""

    __slots__ = ("begun", "call", "done", "error", "finished", "stop", "write_error")

    def __init__(self, done: _Row | None, *, call: _Call | None = None,
                 begun: tuple[int, int, float, bool, Any] | None = None,
                 stop: StopIteration | None = None, error: BaseException | None = None,
                 finished: _Outcome | None = None,
                 write_error: BaseException | None = None) -> None:
        self.done, self.call, self.begun = done, call, begun
        self.stop, self.error, self.finished, self.write_error = stop, error, finished, \
            write_error


_NOT_STARTED = object()  # _drive's answer for a workflow run() did not start here


class _Committed:
    """_drive's answer when a step thread committed the workflow's end itself."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: _Outcome) -> None:
        self.outcome = outcome


def _settle(futures: list[asyncio.Future[Any] | _Then],
            outcomes: list[tuple[bool, Any]]) -> None:
    for target, (ok, value) in zip(futures, outcomes, strict=True):
        if isinstance(target, _Then):
            try:
                target.callback(ok, value)
            except Exception:  # a bug: the other callers in the batch still get theirs
                _log.exception("a callback on a committed write failed")
            target = target.future
        future = target
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


# RETRY POLICY.


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failing step is tried, and how long to wait in between.

    The wait after failed attempt n is ``initial_delay * backoff ** (n - 1)``, capped
    at `max_delay`, less a random share of up to `jitter` of it, so that many
    workflows failing together do not retry in step. With the defaults a step is
    tried 5 times over about 7 seconds.
    """

    max_attempts: int = 5
    initial_delay: float = 0.5
    backoff: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            raise InvalidInput(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        for field, low in (("initial_delay", 0.0), ("backoff", 1.0), ("max_delay", 0.0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
                raise InvalidInput(f"{field} must be a number >= {low}, not {value!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int | float) \
                or not 0 <= self.jitter <= 1:
            raise InvalidInput(f"jitter must be between 0 and 1, not {self.jitter!r}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (counting from 1)."""
        try:
            base = min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1))
        except OverflowError:
            base = self.max_delay
        return float(base * (1 - self.jitter * rand()))


# RECORDS: what the journal says about a workflow, for any process to read.


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One journaled step. Times are Unix timestamps; `started_at` is the first attempt's."""

    seq: int
    name: str
    state: StepState
    attempts: int
    result: Any
    error: dict[str, Any] | None
    failed_attempts: tuple[dict[str, Any], ...]  # attempt, started_at, finished_at, error
    started_at: float
    updated_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class Status:
    """A workflow as the journal has it, with one `StepRecord` per journaled step."""

    id: str
    name: str
    state: State
    result: Any
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    finished_at: float | None
    steps: tuple[StepRecord, ...]
    # The process holding it ("host|pid|start|nonce"), and when that one's lease ends.
    owner: str | None = None
    lease_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class _JournaledStep:
    name: str
    state: str
    attempts: int
    result: str | None
    error: str | None
    failures: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class _Workflow:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    retry: RetryPolicy | None
    signature: inspect.Signature
    # How many positional arguments (after ctx) the function takes when it takes
    # exactly those (no defaults, *args, **kwargs or keyword-only): run() with that
    # many and no keywords fits without binding.
    arity: int | None


def _arity(signature: inspect.Signature) -> int | None:
    params = list(signature.parameters.values())
    simple = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or any(p.kind not in simple or p.default is not p.empty for p in params):
        return None
    return len(params) - 1


# OPERATIONS: one implementation each, used by Durable and by the command line.


def _read_status(conn: sqlite3.Connection, workflow_id: str) -> Status:
    conn.execute("BEGIN")  # one snapshot for the workflow and its steps
    try:
        rows = conn.execute(_SELECT_WORKFLOW, (workflow_id,)).fetchall()
        steps = conn.execute(_SELECT_STEPS, (workflow_id,)).fetchall()
    finally:
        conn.execute("COMMIT")
    if not rows:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    wf_id, name, state, result, error, created, updated, finished, owner, expires = rows[0]
    return Status(
        wf_id, name, state, _loads(result), _loads(error), created, updated, finished,
        tuple(StepRecord(seq, step, st, attempts, _loads(res), _loads(err),
                         tuple(_loads(fails) or ()), started, step_updated, step_finished)
              for seq, step, st, attempts, res, err, fails, started, step_updated,
              step_finished in steps),
        owner, expires,
    )


def _cancel(conn: sqlite3.Connection, workflow_id: str) -> bool:
    """In a write transaction: cancel the workflow; False if it had finished already."""
    row = conn.execute(_SELECT_STATES, (workflow_id,)).fetchone()
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    if row[0] in _FINISHED:
        return False
    now = time.time()
    error = _dumps({"type": "WorkflowCancelled", "message": "cancelled by request"})
    conn.execute(_CANCEL, (error, now, now, workflow_id))
    return True


def _retry(conn: sqlite3.Connection, workflow_id: str) -> int:
    """In a write transaction: put a failed workflow back to run, from its last failed
    step (dropped from the journal with the steps after it: fresh attempts). Returns
    that step's position, or 0 when no step failed (it replays from the top). The
    steps before it are not run again, so a workflow that compensated them (released
    what it reserved) must be started anew under a new id instead."""
    row = conn.execute(_SELECT_STATES, (workflow_id,)).fetchone()
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    if row[0] != "failed":
        raise InvalidInput(f"workflow {workflow_id!r} is {row[0]}; only a failed workflow "
                           "can be retried")
    seq = conn.execute(_LAST_FAILED_STEP, (workflow_id,)).fetchone()[0]
    if seq is not None:
        conn.execute(_DELETE_STEPS_FROM, (workflow_id, seq))
    conn.execute(_REOPEN, (None, time.time(), workflow_id))
    return int(seq or 0)


def _prune(conn: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """In a write transaction: delete up to `limit` workflows (and, by cascade, their
    steps) that finished before `cutoff`. Unfinished workflows are never touched."""
    return int(conn.execute(_PRUNE, (cutoff, limit)).rowcount)


def _seconds(value: float | timedelta, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise InvalidInput(f"{what} must be seconds >= 0 or a timedelta, not {value!r}")
    return float(seconds)


# CONTEXT: what a workflow receives as its first argument.


class _Call:
    """A step about to run: yield it (generator workflow) or await it (async workflow)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def __await__(self) -> Generator[Any, None, Any]:
        return self._ctx._execute(self).__await__()


class _StepCall(_Call):
    __slots__ = ("args", "fn", "is_async", "kwargs", "name", "retry")

    def __init__(self, ctx: Context, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], name: str | None, retry: RetryPolicy | None) -> None:
        if not callable(fn):
            raise InvalidInput(f"ctx.run() needs a function, not {fn!r}")
        super().__init__(ctx)
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)  # asked once, not at every turn
        self.args = args
        self.kwargs = kwargs
        self.name = name or _name_of(fn)
        self.retry = retry


class _SleepCall(_Call):
    __slots__ = ("seconds",)
    name = "ctx.sleep"

    def __init__(self, ctx: Context, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 <= seconds < float("inf"):
            raise InvalidInput(f"ctx.sleep() needs seconds >= 0, not {seconds!r}")
        super().__init__(ctx)
        self.seconds = float(seconds)


class _StepOptions:
    __slots__ = ("_ctx", "_name", "_retry")

    def __init__(self, ctx: Context, name: str | None, retry: RetryPolicy | None) -> None:
        self._ctx, self._name, self._retry = ctx, name, retry

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _StepCall:
        """Like `Context.run`, with these options."""
        return _StepCall(self._ctx, fn, args, kwargs, self._name, self._retry)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Context:
    """Handed to a workflow as its first argument; `run` makes its steps."""

    __slots__ = ("_abort", "_durable", "_flush_due", "_gen", "_id", "_inflight",
                 "_journal", "_napping", "_new", "_outcome", "_owner", "_pending", "_retry",
                 "_seq", "_steps_due", "_touched", "_vars", "_waiters")

    def __init__(self, durable: Durable, workflow_id: str, retry: RetryPolicy,
                 journal: dict[int, _JournaledStep]) -> None:
        self._durable = durable
        self._id = workflow_id
        self._owner = durable._owner
        self._retry = retry
        self._journal = journal  # steps recorded before this (re)start, consumed by replay
        self._seq = 0
        self._abort: BaseException | None = None
        self._pending: list[_Row] = []  # finished steps, written with the next checkpoint
        self._touched = False  # whether a checkpoint has marked the workflow running yet
        self._gen: Generator[Any, Any, Any] | None = None  # a generator workflow's, in _drive
        self._inflight: list[asyncio.Future[Any]] = []  # deferred writes already queued
        self._flush_due = False
        self._napping: asyncio.Future[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []  # result() calls waiting here
        self._outcome: _Outcome | None = None  # committed when the workflow ended here
        self._new = True  # False while run()'s insert has not said the workflow is new
        self._steps_due = 0  # step threads' outcomes awaited (close() lets them arrive)
        # A generator workflow's code runs in this one context wherever it runs (on the
        # loop, in a step thread), one place at a time: what it sets, and the tokens to
        # reset it, stay valid throughout. A copy of the context it was started from.
        self._vars = contextvars.copy_context()

    @property
    def id(self) -> str:
        """The workflow's id: the base for keys passed to outside systems."""
        return self._id

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _StepCall:
        """A step calling ``fn(*args, **kwargs)``: ``yield`` it in a generator workflow,
        ``await`` it in an async one. Sync functions run in a worker thread, which may
        also run a generator workflow's code up to its next sync step."""
        return _StepCall(self, fn, args, kwargs, None, None)

    def options(self, *, name: str | None = None,
                retry: RetryPolicy | None = None) -> _StepOptions:
        """Step options that cannot collide with the step's own arguments:
        ``yield ctx.options(retry=RetryPolicy(max_attempts=10)).run(charge, order)``.
        `name` is the step's name in the journal (default: the function's name)."""
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"retry must be a RetryPolicy, not {retry!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInput(f"a step name must be a non-empty string, not {name!r}")
        return _StepOptions(self, name, retry)

    def sleep(self, seconds: float) -> _SleepCall:
        """A durable timer: ``yield ctx.sleep(3600)`` (or ``await``). The wake time is
        journaled, so after a restart the workflow sleeps only what is left. A sleeping
        workflow holds no thread."""
        return _SleepCall(self, seconds)

    def _stop(self, reason: _Interrupted) -> None:
        """Stop the workflow at its next step, checkpoint or wake-up (cancel, close)."""
        self._abort = reason
        for future in (self._napping, *self._waiters):
            if future is not None:
                _wake(future)

    def _ended(self, outcome: _Outcome | None) -> _Outcome | None:
        """The workflow's task ends with `outcome` committed (None: unfinished): hand
        it to the result() calls waiting, which need neither the task nor the journal."""
        self._outcome = outcome
        for future in self._waiters:
            _wake(future)
        return outcome

    @property
    def _stopped(self) -> bool:
        return isinstance(self._abort, _Fenced)

    async def _nap(self, seconds: float) -> None:
        """Sleep, unless the workflow is stopped first."""
        if seconds > 0 and self._abort is None and not self._durable._closing:
            loop = asyncio.get_running_loop()
            self._napping = loop.create_future()
            timer = loop.call_later(seconds, _wake, self._napping)
            try:
                await self._napping
            finally:
                timer.cancel()
                self._napping = None
        if isinstance(self._abort, _Interrupted):
            raise self._abort

    def _replayed(self, call: _StepCall | _SleepCall) -> tuple[int, _JournaledStep | None]:
        """The step's position, and its record from before this (re)start, if any."""
        if call._ctx is not self:
            raise InvalidInput("a step made by another workflow's ctx was awaited here")
        if self._abort is not None:
            raise self._abort
        if self._durable._closing:
            self._stop(_Interrupted("the journal is closing"))
            raise self._abort  # type: ignore[misc]
        self._seq += 1
        recorded = self._journal.pop(self._seq, None)
        if recorded is not None and recorded.name != call.name:
            self._abort = NonDeterminismError(
                f"workflow {self._id!r} step {self._seq} is {call.name!r} in the code but "
                f"{recorded.name!r} in the journal: the code changed under a running "
                "workflow. Deploy new steps under a new workflow name, or let in-flight "
                "workflows finish first."
            )
            raise self._abort
        return self._seq, recorded

    async def _execute(self, call: _Call,
                       begun: tuple[int, int, float, bool, Any] | None = None) -> Any:
        """Run a step (or a sleep) and return its result, or an _Ahead when its step
        thread went on with the workflow. `begun`: a step thread already began this
        step and ran its first attempt (seq, attempt, start, ok, value or exception)."""
        if isinstance(call, _SleepCall):
            return await self._sleep(call)
        assert isinstance(call, _StepCall)
        name, attempts = call.name, 0
        failures: list[dict[str, Any]] = []
        seq, recorded = (begun[0], None) if begun is not None else self._replayed(call)
        if recorded is not None:
            if recorded.state == "done":
                return _loads(recorded.result)
            if recorded.state == "failed":
                err = _loads(recorded.error) or {}
                raise StepFailed(name, err.get("type", "Error"), err.get("message", ""),
                                 recorded.attempts)
            attempts, failures = recorded.attempts, _loads(recorded.failures) or []
            if not failures or failures[-1]["attempt"] != attempts:
                # The process stopped during that attempt (else its failure is recorded:
                # the journal closed before the next attempt began).
                failures.append({"attempt": attempts, "started_at": recorded.updated_at,
                                 "finished_at": None, "error": {
                                     "type": "Interrupted",
                                     "message": "the process stopped during this attempt"}})
        policy = call.retry or self._retry
        error: dict[str, Any] = failures[-1]["error"] if failures else {}
        while attempts < policy.max_attempts:
            attempts += 1
            start = time.time()
            history = _dumps(failures) if failures else None
            permanent = False
            try:
                if begun is not None:
                    _, attempts, start, ok, value = begun
                    begun = None
                    if not ok:
                        raise _step_error(value)
                    if inspect.isawaitable(value):
                        value = await value
                else:
                    value = await self._attempt(call, (self._id, seq, name, "running",
                                                       attempts, None, None, history, start,
                                                       start, None))
            except Exception as exc:
                error, permanent = _error_of(exc), isinstance(exc, Permanent)
            else:
                if isinstance(value, _Ahead):
                    return value
                try:
                    text = _dumps(value)
                except (TypeError, ValueError) as exc:
                    error, permanent = {"type": "TypeError", "message":
                                        f"the step returned a value that is not JSON: {exc}"}, True
                else:
                    if isinstance(self._abort, _Interrupted):  # cancelled meanwhile
                        raise self._abort
                    done = time.time()
                    # Written with the next checkpoint (the next step's start or the
                    # workflow's end): the next step cannot start before it is durable.
                    self._defer((self._id, seq, name, "done", attempts, text, None, history,
                                 start, done, done))
                    return _loads(text)
            failures.append({"attempt": attempts, "started_at": start,
                             "finished_at": time.time(), "error": error})
            if permanent or attempts >= policy.max_attempts:
                break
            # Closing: the failed attempt is recorded, and the next runs at reopen.
            self._stop_if_closing((self._id, seq, name, "running", attempts, None, None,
                                   _dumps(failures), start, time.time(), None))
            delay = policy.delay(attempts)
            _log.warning("workflow %r step %r attempt %d/%d failed (%s: %s); retrying in %.2fs",
                         self._id, name, attempts, policy.max_attempts, error["type"],
                         error["message"], delay)
            await self._nap(delay)
        now = time.time()
        failed = (self._id, seq, name, "failed", attempts, None, _dumps(error),
                  _dumps(failures), now, now, now)
        self._stop_if_closing(failed)
        await self._write([failed])
        raise StepFailed(name, error["type"], error["message"], attempts)

    async def _sleep(self, call: _SleepCall) -> None:
        seq, recorded = self._replayed(call)
        if recorded is not None and recorded.state == "done":
            return
        if recorded is not None:
            wake = float(_loads(recorded.result))
        else:
            now = time.time()
            wake = now + call.seconds
            await self._write([(self._id, seq, call.name, "running", 1, _dumps(wake), None,
                                None, now, now, None)])
        await self._nap(wake - time.time())
        done = time.time()
        if done < wake:  # woken early: the workflow is stopped, or the journal closing
            self._check_writable()
            raise self._abort or _Interrupted("the workflow stopped during a sleep")
        self._defer((self._id, seq, call.name, "done", 1, _dumps(wake), None, None, done, done,
                     done))

    async def _attempt(self, call: _StepCall, begin: _Row) -> Any:
        """Checkpoint the attempt (its step row `begin`), then run the step.

        A sync step's thread commits the checkpoint just before running the step (in
        place when nothing else is going on, else through the writer thread, waiting):
        one trip from the event loop instead of two. With more workflows running than
        there are threads, the checkpoint goes to the writer thread from the loop."""
        durable = self._durable
        if self._inflight or call.is_async \
                or not durable._threads_checkpoint():
            await self._write([begin])
            return await durable._invoke(self._id, call)
        self._check_writable()
        ahead = None if self._gen is None else functools.partial(self._run_ahead, begin)
        pending = self._pending
        try:
            return await durable._invoke(self._id, call, self._checkpoint([begin]), ahead,
                                         lambda: self._abort is not None)
        except _BeginFailed as failed:
            # Not written: finished steps' rows go back, for close() to record.
            self._pending = pending + self._pending
            self._write_failed(failed.args[0])

    def _checkpoint(self, rows: list[_Row], outcome: _Outcome | None = None) -> _Op:
        """The write of `rows` (after the deferred ones) and, if given, the workflow's
        outcome, fenced on this process holding the workflow unfinished."""
        rows, self._pending = self._pending + rows, []
        touch, self._touched = not self._touched, True
        return self._durable._fenced(self._id, self._owner, rows, outcome, touch)

    def _run_ahead(self, begin: _Row, value: Any, stopped: Callable[[], bool]) -> Any:
        """In the step thread, after a generator workflow's sync step returned `value`:
        go on with the workflow there while its next calls are sync steps that begin
        afresh, committing each checkpoint from this thread, so that the event loop is
        not needed between one step and the next. Returns `value` untouched if it did
        not go on, else an _Ahead for `_drive` to continue from."""
        gen, durable = self._gen, self._durable
        writer, pool = durable._writer, durable._pool
        if gen is None or writer is None or pool is None:  # ended or closed meanwhile
            return value
        seq, name, attempt, history, start = begin[1], begin[2], begin[4], begin[7], begin[8]
        went_on, call = False, None
        while True:
            if (self._abort is not None or self._journal or stopped()
                    or not durable._threads_checkpoint() or inspect.isawaitable(value)):
                return _Ahead(None, begun=(seq, attempt, start, True, value),
                              call=call) if went_on else value
            try:
                text = _dumps(value)
            except (TypeError, ValueError):
                return _Ahead(None, begun=(seq, attempt, start, True, value),
                              call=call) if went_on else value
            now = time.time()
            done = (self._id, seq, name, "done", attempt, text, None, history, start, now, now)
            try:
                call = self._vars.run(gen.send, _loads(text))
            except StopIteration as stop:
                return self._finish_here(done, stop, stopped)
            except BaseException as exc:
                return _Ahead(done, error=exc)
            finally:
                self._close_if_abandoned(gen)
            if not self._begins_here(call) or stopped():
                return _Ahead(done, call=call)
            seq, name, attempt, history, start = self._seq + 1, call.name, 1, None, time.time()
            self._seq = seq
            op = durable._fenced(self._id, self._owner, [done, (
                self._id, seq, name, "running", 1, None, None, None, start, start, None)],
                None, False)
            ok, result = writer.commit_here(op, pool.busy <= 1)
            if not ok:
                return _Ahead(None, write_error=result)
            went_on = True
            try:
                value = self._vars.copy().run(call.fn, *call.args, **call.kwargs)
            except BaseException as exc:
                return _Ahead(None, call=call, begun=(seq, attempt, start, False, exc))

    def _close_if_abandoned(self, gen: Generator[Any, Any, Any]) -> None:
        """In a step thread, after running the generator: if `_drive` ended meanwhile
        (it could not close the generator while this thread ran it), close it here, in
        its context, so that its `finally` runs as it would have there."""
        if self._gen is None:
            with contextlib.suppress(RuntimeError, ValueError):
                self._vars.run(gen.close)

    def _begins_here(self, call: object) -> bool:
        """Whether a step thread may begin `call` itself: a sync step of this workflow,
        which is not stopped."""
        return (isinstance(call, _StepCall) and call._ctx is self
                and not call.is_async and self._abort is None)

    def _start_here(self, inserted: tuple[bool, Any], stopped: Callable[[], bool]
                    ) -> _Ahead | None:
        """In a step thread, once run()'s insert is committed (`inserted`): start the
        new generator workflow there, beginning and running its first sync step and
        going on as `_run_ahead` does. None when the workflow is not to start here
        (not new, refused, or stopped meanwhile); else an _Ahead for `_drive`."""
        ok, value = inserted
        gen, durable = self._gen, self._durable
        if not ok or not value[0] or stopped() or self._abort is not None or gen is None:
            return None
        try:
            call = self._vars.run(gen.send, None)
        except StopIteration as stop:
            return _Ahead(None, stop=stop)
        except BaseException as exc:
            return _Ahead(None, error=exc)
        finally:
            self._close_if_abandoned(gen)
        writer, pool = durable._writer, durable._pool
        if not self._begins_here(call) or stopped() or writer is None or pool is None:
            return _Ahead(None, call=call)
        seq, start = self._seq + 1, time.time()
        self._seq = seq
        begin = (self._id, seq, call.name, "running", 1, None, None, None, start, start, None)
        ok, result = writer.commit_here(self._checkpoint([begin]), pool.busy <= 1)
        if not ok:
            return _Ahead(None, write_error=result)
        try:
            value = self._vars.copy().run(call.fn, *call.args, **call.kwargs)
        except BaseException as exc:
            return _Ahead(None, call=call, begun=(seq, 1, start, False, exc))
        went_on = self._run_ahead(begin, value, stopped)
        return went_on if isinstance(went_on, _Ahead) else _Ahead(
            None, call=call, begun=(seq, 1, start, True, value))

    def _finish_here(self, done: _Row, stop: StopIteration, stopped: Callable[[], bool]
                     ) -> _Ahead:
        """In the step thread, the generator returned: commit the last step's result and
        the workflow's, unless something needs the event loop's care."""
        durable = self._durable
        try:
            outcome: _Outcome = ("done", _dumps(stop.value), None)
        except (TypeError, ValueError):  # the loop fails the workflow with a clear error
            return _Ahead(done, stop=stop)
        if self._abort is not None or stopped() or durable._writer is None \
                or durable._pool is None:
            return _Ahead(done, stop=stop)
        ok, result = durable._writer.commit_here(
            durable._fenced(self._id, self._owner, [done], outcome, False),
            durable._pool.busy <= 1)
        return _Ahead(None, finished=outcome) if ok else _Ahead(None, write_error=result)

    def _check_writable(self) -> None:
        if isinstance(self._abort, _Interrupted):
            raise self._abort
        if self._durable._closing:
            self._stop(_Interrupted("the journal is closing"))
            raise self._abort  # type: ignore[misc]

    def _stop_if_closing(self, row: _Row) -> None:
        """While closing (which waited for this step), keep the step's `row` for
        _record_pending to commit, and stop the workflow here."""
        if self._durable._closing:
            self._pending.append(row)
            self._check_writable()

    def _write_failed(self, exc: BaseException) -> NoReturn:
        if not isinstance(self._abort, _Interrupted):  # a stop (cancel, close) says why
            self._abort = exc if isinstance(exc, _Interrupted) else _Interrupted(exc)
        raise self._abort from None

    async def _write(self, rows: list[_Row], outcome: _Outcome | None = None) -> None:
        """Commit step `rows` (after any deferred ones) and the workflow's `outcome`, if
        this process still owns the workflow; otherwise stop it with _Interrupted."""
        self._check_writable()
        future = self._durable._open_writer().submit(self._checkpoint(rows, outcome))
        future.add_done_callback(_retrieve)
        inflight, self._inflight = self._inflight, []
        try:
            for earlier in inflight:  # committed no later than `future`, in queue order
                await earlier
            await future
        except (DurableError, _Interrupted) as exc:
            self._write_failed(exc)

    async def _record_pending(self) -> None:
        """Commit the finished steps not yet written, fenced, even while closing: a step
        that returned is not to run again at the next start."""
        if self._pending and not isinstance(self._abort, _Fenced):
            with contextlib.suppress(DurableError, _Interrupted):
                await self._durable._open_writer().submit(self._checkpoint([]))

    def _defer(self, row: _Row) -> None:
        """Write a finished step's row with the next checkpoint: the next step cannot
        start before it is durable."""
        self._pending.append(row)
        if not self._flush_due:
            self._flush_due = True
            # Runs only if the workflow awaits something other than a step first.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._pending and self._abort is None:
            future = self._durable._open_writer().submit(self._checkpoint([]))
            future.add_done_callback(_retrieve)
            self._inflight.append(future)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a failure here is seen again by the workflow's next write


async def _drive(gen: Generator[Any, Any, Any], ctx: Context,
                 started: asyncio.Future[_Ahead | None] | None = None) -> Any:
    """Run a generator workflow: each yielded step runs, and its result (or its
    StepFailed) is sent back in. A step thread may have run the generator further
    (an _Ahead): the loop goes on from where it stopped. `started`: a step thread
    was given the workflow from its start (Durable._run_at_once); None from it
    means the workflow is not to run here, and _drive returns _NOT_STARTED."""
    ctx._gen = gen
    value: Any = None
    failure: StepFailed | None = None
    ahead: _Ahead | None = None
    try:
        if started is not None:
            ctx._steps_due += 1
            try:
                ahead = await started
            finally:
                ctx._steps_due -= 1
            if ahead is None:
                return _NOT_STARTED
        while True:
            begun = None
            if ahead is not None:
                if ahead.write_error is not None:
                    ctx._write_failed(ahead.write_error)
                if ahead.finished is not None:
                    return _Committed(ahead.finished)
                if ahead.done is not None:
                    ctx._defer(ahead.done)
                if ahead.stop is not None:
                    return ahead.stop.value
                if ahead.error is not None:
                    raise ahead.error
                call, begun, ahead = ahead.call, ahead.begun, None
            else:
                try:
                    call = (ctx._vars.run(gen.send, value) if failure is None
                            else ctx._vars.run(gen.throw, failure))
                except StopIteration as stop:
                    return stop.value
            value, failure = None, None
            if not isinstance(call, _Call):
                raise TypeError(f"the workflow yielded {call!r}; yield ctx.run(step, ...) "
                                "or ctx.sleep(seconds)")
            try:
                result = await ctx._execute(call, begun)
            except StepFailed as exc:
                failure = exc
            else:
                if isinstance(result, _Ahead):
                    ahead = result
                else:
                    value = result
    finally:
        ctx._gen = None
        try:
            ctx._vars.run(gen.close)
        except RuntimeError as exc:
            # A step thread still runs it (the workflow was cancelled): its context is
            # entered there, or the generator executing.
            if inspect.getgeneratorstate(gen) != inspect.GEN_RUNNING \
                    and "cannot enter context" not in str(exc):
                # it yielded again in a `finally`: keep the first error
                _log.warning("workflow %r ignored its shutdown: %s", ctx.id, exc)
        except ValueError:  # a step thread still runs it (the workflow was cancelled)
            pass


# HANDLE: a workflow seen from outside.


class Handle:
    """A workflow started (or found) by `Durable.run` or `Durable.get`."""

    __slots__ = ("_durable", "created", "id")

    def __init__(self, durable: Durable, workflow_id: str, created: bool) -> None:
        self._durable = durable
        self.id = workflow_id
        self.created = created  # False when run() found the workflow already recorded

    def __repr__(self) -> str:
        return f"Handle(id={self.id!r}, created={self.created})"

    async def done(self) -> bool:
        """Whether the workflow has finished (done, failed or cancelled). Never waits."""
        ctx = self._durable._contexts.get(self.id)
        if ctx is not None and not ctx._stopped and ctx._new:
            return False
        row = await self._durable._read(_SELECT_OUTCOME, (self.id,))
        return bool(row) and row[0][0] in _FINISHED

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the workflow to finish and return its result.

        Raises WorkflowFailed or WorkflowCancelled, or TimeoutError after `timeout`
        seconds (the workflow goes on)."""
        if timeout is None:
            state, result, error = await self._durable._wait(self.id)
        else:
            async with asyncio.timeout(timeout):
                state, result, error = await self._durable._wait(self.id)
        if state == "done":
            return _loads(result)
        if state == "cancelled":
            raise WorkflowCancelled(f"workflow {self.id!r} was cancelled")
        raise WorkflowFailed(self.id, _loads(error) or {})

    async def status(self) -> Status:
        """The workflow and its steps as the journal has them now."""
        return await self._durable._status(self.id)


# DURABLE: registry, runner, recovery.


class Durable:
    """A journal file and the workflows registered with it.

    Args:
        path: the SQLite file; created if missing. Keep it on a local disk.
        synchronous: "FULL" (default) syncs every commit to disk and survives power
            loss. "NORMAL" survives a crash of the process but may lose the last
            commits if the machine loses power; it is faster on slow disks.
        busy_timeout: seconds to wait for another process's write lock.
        retry: the default RetryPolicy for steps (per workflow: `register(retry=)`,
            per step: `ctx.options(retry=)`).
        max_threads: worker threads for sync steps; more steps wait their turn.
        max_running: at most this many workflows run at once in this process (None:
            no limit). The others wait their turn in order, already recorded: run()
            still returns at once. A limit keeps a burst of new workflows from
            crowding out the rest of the event loop (an HTTP endpoint accepting them).
        lease: seconds a process holds its workflows without renewing (it renews every
            lease/3 s, at most every 2 s). Another process takes a workflow over when
            its owner's lease ran out (the owner was paused, stuck, or on a machine that
            died or was cut off); on the same machine a dead owner is noticed at once.
            Keep it well above the clock skew between machines sharing the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 busy_timeout: float = 5.0, retry: RetryPolicy | None = None,
                 max_threads: int = 32, max_running: int | None = None,
                 lease: float = 30.0) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise InvalidInput(f"the journal must be a file path, not {self.path!r}")
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidInput(f'synchronous must be "FULL" or "NORMAL", not {synchronous!r}')
        if not isinstance(busy_timeout, int | float) or busy_timeout < 0:
            raise InvalidInput(f"busy_timeout must be seconds >= 0, not {busy_timeout!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"retry must be a RetryPolicy, not {retry!r}")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise InvalidInput(f"max_threads must be an integer >= 1, not {max_threads!r}")
        if max_running is not None and (isinstance(max_running, bool) or not isinstance(
                max_running, int) or max_running < 1):
            raise InvalidInput(f"max_running must be an integer >= 1 or None, "
                               f"not {max_running!r}")
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0:
            raise InvalidInput(f"lease must be seconds > 0, not {lease!r}")
        self.synchronous = synchronous
        self.busy_timeout = float(busy_timeout)
        self._default_retry = retry or RetryPolicy()
        self.max_threads = max_threads
        self.max_running = max_running
        self.lease = float(lease)
        # How often the lease is renewed and orphaned workflows are looked for.
        self._tick = min(self.lease / 3, 2.0)
        self._registry: dict[str, _Workflow] = {}
        self._names: dict[Callable[..., Any], str] = {}
        self._running: dict[str, asyncio.Task[_Outcome | None]] = {}
        self._contexts: dict[str, Context] = {}
        # Workflows waiting for one of `max_running` places, in order: id -> (workflow
        # name, input, journal). Plain values, no task: the garbage collector has
        # nothing to walk in a backlog of thousands.
        self._queued: dict[str, tuple[str, str, dict[int, _JournaledStep] | None]] = {}
        self._stepping: dict[str, int] = {}  # workflow id -> sync steps in threads
        self._stalls: dict[str, int] = {}  # workflow id -> failed journal writes in a row
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._closing = False
        self._host = socket.gethostname()
        self._owner = ""
        self._writer: _Writer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None
        self._pool: _StepThreads | None = None

    def __repr__(self) -> str:
        return f"Durable({self.path!r}, synchronous={self.synchronous!r})"

    # Registry.

    @overload
    def register(self, fn: _F) -> _F: ...
    @overload
    def register(self, *, name: str | None = None,
                 retry: RetryPolicy | None = None) -> Callable[[_F], _F]: ...

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 retry: RetryPolicy | None = None) -> Any:
        """Register a workflow: a generator function (steps are ``yield ctx.run(...)``)
        or an ``async def`` (steps are ``await ctx.run(...)``), taking ``ctx`` first.

        Use bare (``@dur.register``) or with options (``@dur.register(name="orders.v2",
        retry=RetryPolicy(max_attempts=3))``). `name` is what the journal records
        (default: the function's qualified name, without ``<locals>``). Returns the
        function unchanged."""
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"retry must be a RetryPolicy, not {retry!r}")
        if isinstance(fn, str):
            raise InvalidInput(f"register() takes the workflow function; to name it "
                               f"{fn!r}, write @dur.register(name={fn!r})")

        def decorate(f: _F) -> _F:
            if inspect.isgeneratorfunction(f):
                is_async = False
            elif inspect.iscoroutinefunction(f):
                is_async = True
            else:
                raise InvalidInput(
                    f"{f!r} is not a workflow: write it as a generator (yield ctx.run(...)) "
                    "or as an async def (await ctx.run(...))"
                )
            wf_name = name if name is not None else _name_of(f)
            if not isinstance(wf_name, str) or not wf_name or "\x00" in wf_name:
                raise InvalidInput(f"a workflow name must be a non-empty string without NUL, "
                                   f"not {wf_name!r}")
            known = self._registry.get(wf_name)
            if known is not None and known.fn is not f:
                raise InvalidInput(
                    f"a workflow named {wf_name!r} is already registered ({known.fn!r}); "
                    "pass register(name=...) to give this one another name"
                )
            if self._names.get(f, wf_name) != wf_name:
                raise InvalidInput(f"{f!r} is already registered as {self._names[f]!r}")
            signature = inspect.signature(f)
            self._registry[wf_name] = _Workflow(wf_name, f, is_async, retry, signature,
                                                _arity(signature))
            self._names[f] = wf_name
            return f

        return decorate if fn is None else decorate(fn)

    def _workflow(self, fn: object) -> _Workflow:
        if isinstance(fn, str):
            workflow = self._registry.get(fn)
        elif callable(fn):
            name = self._names.get(fn)
            workflow = self._registry.get(name) if name is not None else None
        else:
            raise InvalidInput(f"a workflow is a registered function or its name, not {fn!r}")
        if workflow is None:
            raise InvalidInput(f"{fn!r} is not a registered workflow; decorate it with "
                               "@dur.register first")
        return workflow

    # Lifecycle.

    async def __aenter__(self) -> Durable:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the journal and resume every unfinished workflow that is registered
        here and whose owner is gone. `async with dur:` calls this."""
        if self._writer is not None:
            raise DurableError(f"{self!r} is already open")
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(1, thread_name_prefix="durable-reader")
        connect = functools.partial(_connect, self.path, self.synchronous, self.busy_timeout)
        try:
            write_conn = await loop.run_in_executor(reader, connect)
            self._reader_conn = await loop.run_in_executor(reader, connect)
        except BaseException:
            reader.shutdown(wait=False)
            raise
        pid = os.getpid()
        self._owner = f"{self._host}|{pid}|{_process_start(pid)}|{secrets.token_hex(4)}"
        self._closing = False
        self._reader = reader
        self._writer = _Writer(write_conn, loop)
        self._pool = _StepThreads(self.max_threads, loop)
        try:
            await self._renew(forget=True)
            await self._adopt_orphans(opening=True)
        except BaseException:
            await self.close()  # leave nothing running behind a failed open
            raise
        self._maintenance = loop.create_task(self._maintain(), name="durable:maintenance")

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop running workflows (they stay unfinished in the journal and resume at the
        next open), hand them back so another process may take them, and close.

        A sync step cannot be interrupted: close() waits up to `grace` seconds for step
        threads to return, and records the results of those that do (their workflows
        stop before their next step). A workflow whose step thread is still running
        then stays held by this process: another process takes it over when this
        process exits (at once, on this machine) or, if it lives on, when its lease runs
        out; the stray thread's result is refused either way."""
        writer, reader, pool = self._writer, self._reader, self._pool
        if writer is None or reader is None or pool is None or self._closing:
            return
        self._closing = True  # from here no step begins, and no workflow starts
        self._queued.clear()  # they stay unfinished, released below like the rest
        for timer in self._timers:
            timer.cancel()
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Workflows in a sync step (or with its outcome on its way to them) go on until
        # they have it: they record its result and stop before the next step. The others
        # stop now; so do those past the grace.
        contexts = self._contexts
        tasks = [task for wf_id, task in self._running.items() if wf_id not in self._stepping
                 and not (wf_id in contexts and contexts[wf_id]._steps_due)]
        for task in [*tasks, *self._background]:
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=grace)
        while self._running or self._background:
            tasks = [*self._running.values(), *self._background]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        while self._stepping and loop.time() < deadline:
            await asyncio.sleep(0.01)
        owner, stepping, lease = self._owner, set(self._stepping), self.lease

        def release(conn: sqlite3.Connection) -> None:
            # In the writer, after every queued insert: none is left held by nobody.
            owned = [row[0] for row in conn.execute(_SELECT_OWNED, (owner,))]
            conn.executemany(_RELEASE, [(i, owner) for i in owned if i not in stepping])
            if stepping:  # held on: let the lease run out instead
                conn.execute(_RENEW_OWNER, (owner, time.time() + lease))
            else:
                conn.execute(_DELETE_OWNER, (owner,))

        with contextlib.suppress(DurableError):
            await writer.submit(release)
        await loop.run_in_executor(None, writer.stop)
        writer._conn.close()
        if self._reader_conn is not None:
            await loop.run_in_executor(reader, self._reader_conn.close)
        reader.shutdown(wait=True)
        pool.shutdown()
        self._writer = self._reader = self._pool = self._reader_conn = None
        self._timers.clear()
        self._stalls.clear()

    def _open_writer(self) -> _Writer:
        if self._writer is None:
            raise DurableError(f"{self!r} is not open; use 'async with dur:' or 'await dur.open()'")
        return self._writer

    # Journal access.

    async def _query(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn` on the reader connection, in the reader thread."""
        self._open_writer()
        conn, reader = self._reader_conn, self._reader
        assert conn is not None and reader is not None

        def query() -> _T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise _journal_error("journal read failed", exc) from None

        try:
            return await asyncio.get_running_loop().run_in_executor(reader, query)
        except RuntimeError:  # the executor shut down under us
            raise DurableError(f"{self!r} was closed") from None

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return await self._query(lambda conn: conn.execute(sql, params).fetchall())

    def _threads_checkpoint(self) -> bool:
        """Whether sync steps' threads commit their own checkpoints: only while every
        running workflow could have a thread waiting on its commit. With more running
        workflows than threads, waiting threads would cap each batch below the number
        of workflows ready to share it."""
        return len(self._running) <= self.max_threads

    def _fenced(self, workflow_id: str, owner: str, rows: list[_Row],
                outcome: _Outcome | None, touch: bool) -> _Op:
        """An operation writing step `rows` and the workflow's `outcome` (if any) only if
        `owner` holds the workflow unfinished; `touch` marks it running first."""
        flat = tuple(itertools.chain.from_iterable(rows))

        def op(conn: sqlite3.Connection) -> None:
            if outcome is not None or touch:
                now = time.time()
                fence = (conn.execute(_FINISH_WORKFLOW, (*outcome, now, now, workflow_id, owner))
                         if outcome is not None
                         else conn.execute(_TOUCH_WORKFLOW, (now, workflow_id, owner)))
                if fence.rowcount != 1:
                    raise _why_fenced(conn, workflow_id)
                if rows:
                    conn.execute(_put_steps(len(rows), False), flat)
            elif rows and conn.execute(_put_steps(len(rows), True),
                                       (*flat, workflow_id, owner)).rowcount != len(rows):
                raise _why_fenced(conn, workflow_id)

        return op

    # Running.

    async def run(self, id: str, fn: Callable[..., Any] | str, /,
                  *args: Any, **kwargs: Any) -> Handle:
        """Record workflow `fn(ctx, *args, **kwargs)` under `id` and start it.

        Returns once the workflow is committed to the journal. The id is the
        idempotency key: the same id with the same function and arguments returns
        the existing workflow's handle (``created`` is False) and starts nothing;
        with another function or other arguments it raises IdempotencyConflict.
        Arguments must be JSON; the workflow receives them as JSON gives them back.
        When the journal cannot be written (JournalError), a run() of a workflow
        already recorded is still answered, from a read.
        """
        writer = self._open_writer()
        if self._closing:
            raise DurableError(f"{self!r} is closing; no new workflow can start")
        workflow = self._workflow(fn)
        _check_id(id)
        if kwargs or len(args) != workflow.arity:
            try:
                workflow.signature.bind(None, *args, **kwargs)
            except TypeError as exc:
                raise InvalidInput(
                    f"arguments do not fit workflow {workflow.name!r}: {exc}") from None
        try:
            text = _dumps({"args": list(args), "kwargs": kwargs})
            canonical = _dumps([workflow.name, list(args), kwargs], canonical=True)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f"arguments of workflow {workflow.name!r} must be JSON-serializable: {exc}"
            ) from None
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        insert = _Insert(id, workflow.name, text, digest, self._owner)
        if not workflow.is_async and not self._running and not self._queued \
                and self._pool is not None and not self._pool.busy:
            return await self._run_at_once(id, workflow, text, insert)

        caller = contextvars.copy_context()  # the workflow runs in a copy of it

        def start(ok: bool, value: Any) -> None:
            # Not code after the await: the workflow starts even if the caller of
            # run() is cancelled once the insert is queued.
            if ok and value[0]:
                caller.run(self._start, id, workflow, text, {})

        try:
            created, state, known_owner = await writer.submit(insert, start)
        except JournalError as failure:
            created, state, known_owner = await self._recorded(insert, failure)
        if not created and state in _UNFINISHED and not self._here(id) and (
                known_owner is None or known_owner == self._owner
                or _owner_is_dead(known_owner, self._host)):
            await self._resume([(id, known_owner, True)])  # recorded, but nobody runs it
        return Handle(self, id, created)

    async def _run_at_once(self, workflow_id: str, workflow: _Workflow, text: str,
                           insert: _Insert) -> Handle:
        """run() of a generator workflow when nothing else runs here: a step thread
        commits the insert, answers run(), and starts the workflow there at once
        (Context._start_here), sparing the trips from the writer thread to the event
        loop and from the loop to a step thread."""
        writer, pool = self._open_writer(), self._pool
        assert pool is not None
        loop = asyncio.get_running_loop()
        inserted: asyncio.Future[tuple[bool, str, str | None]] = loop.create_future()
        started: asyncio.Future[_Ahead | None] = loop.create_future()
        ctx = Context(self, workflow_id, workflow.retry or self._default_retry, {})
        ctx._new = False  # until the insert says so: it may be a duplicate
        data = _loads(text)
        ctx._gen = gen = workflow.fn(ctx, *data["args"], **data["kwargs"])
        # Registered before the thread begins: a run() meanwhile finds it running here,
        # cancel() and close() can stop it, and max_running counts it.
        self._contexts[workflow_id] = ctx
        task = loop.create_task(
            self._run_workflow(workflow_id, workflow, text, {}, (ctx, gen, started)),
            name=f"durable:{workflow_id}")
        self._running[workflow_id] = task
        # Waiters on ctx are woken by the task's end even if it never got to run.
        task.add_done_callback(lambda _: ctx._ended(ctx._outcome))
        self._stepping[workflow_id] = self._stepping.get(workflow_id, 0) + 1

        def commit() -> tuple[bool, Any]:
            outcome = writer.commit_here(insert, True)
            ctx._new = outcome[0] and outcome[1][0]
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                targets: list[asyncio.Future[Any] | _Then] = [inserted]
                loop.call_soon_threadsafe(_settle, targets, [outcome])
            return outcome

        def go_on(outcome: tuple[bool, Any]) -> _Ahead | None:
            return ctx._start_here(outcome, lambda: started.cancelled()
                                   or self._closing or ctx._abort is not None)

        def done(ok: bool, value: Any) -> None:
            self._step_thread_done(workflow_id)
            targets: list[asyncio.Future[Any] | _Then] = [started]
            if not ok:  # dropped at close, before the insert: run() gets the error too
                targets.append(inserted)
            _settle(targets, [(ok, value)] * len(targets))

        pool.submit(commit, (), {}, done, None, go_on)
        # Not shielded: the thread goes on with its own copy of the outcome, whether
        # or not the caller of run() is still there to take it.
        try:
            created, state, known_owner = await inserted
        except DurableError as failure:  # refused: the task ends at once, starting nothing
            await asyncio.wait([task])
            if not isinstance(failure, JournalError):
                raise
            created, state, known_owner = await self._recorded(insert, failure)
        if not created:
            await asyncio.wait([task])  # it ends at once; then see who runs the workflow
            if state in _UNFINISHED and not self._here(workflow_id) and (
                    known_owner is None or known_owner == self._owner
                    or _owner_is_dead(known_owner, self._host)):
                await self._resume([(workflow_id, known_owner, True)])
        return Handle(self, workflow_id, created)

    async def _recorded(self, insert: _Insert, failure: JournalError
                        ) -> tuple[bool, str, str | None]:
        """run()'s insert failed (another process held the write lock past busy_timeout,
        say). A run() of a workflow already recorded needs no write: answer it from a
        read, which WAL allows meanwhile. Anything else raises the failure."""
        try:
            rows = await self._read(_SELECT_IDENTITY, (insert.id,))
        except JournalError:
            raise failure from None
        if not rows:
            raise failure
        return insert._known(*rows[0])

    async def get(self, id: str) -> Handle:
        """The handle of an existing workflow; raises NotFound for an unknown id."""
        _check_id(id)
        if not await self._read(_SELECT_OUTCOME, (id,)):
            raise NotFound(f"no workflow has id {id!r}")
        return Handle(self, id, False)

    def _here(self, workflow_id: str) -> bool:
        """Whether this process runs the workflow or has it waiting for its turn."""
        return workflow_id in self._running or workflow_id in self._queued

    def _start(self, workflow_id: str, workflow: _Workflow, text: str,
               journal: dict[int, _JournaledStep]) -> None:
        if self._closing or workflow_id in self._queued:
            return
        old = self._running.get(workflow_id)
        if old is not None:
            # A task of this id's earlier life (cancelled, then pruned) is still waiting
            # for its step thread: the new workflow starts when that task has ended.
            old.add_done_callback(
                lambda _: self._start(workflow_id, workflow, text, journal))
            return
        if self.max_running is not None and len(self._running) >= self.max_running:
            self._queued[workflow_id] = (workflow.name, text, journal or None)
            return
        task = asyncio.get_running_loop().create_task(
            self._run_workflow(workflow_id, workflow, text, journal),
            name=f"durable:{workflow_id}",
        )
        self._running[workflow_id] = task

    async def _run_workflow(self, workflow_id: str, workflow: _Workflow, text: str,
                            journal: dict[int, _JournaledStep],
                            started: tuple[Context, Generator[Any, Any, Any],
                                           asyncio.Future[_Ahead | None]] | None = None
                            ) -> _Outcome | None:
        """Run the workflow to its end; return the outcome committed (state, result,
        error), or None if it stopped unfinished (or `started` did not start it)."""
        if started is None:
            ctx = Context(self, workflow_id, workflow.retry or self._default_retry, journal)
        else:
            ctx = started[0]
        self._contexts[workflow_id] = ctx
        try:
            try:
                if workflow.is_async:
                    data = _loads(text)
                    value = await workflow.fn(ctx, *data["args"], **data["kwargs"])
                else:
                    if started is None:
                        data = _loads(text)
                        value = await _drive(
                            workflow.fn(ctx, *data["args"], **data["kwargs"]), ctx)
                    else:
                        value = await _drive(started[1], ctx, started[2])
                        if value is _NOT_STARTED:
                            return None
                    if isinstance(value, _Committed):  # a step thread wrote the end
                        self._stalls.pop(workflow_id, None)
                        return ctx._ended(value.outcome)
                if ctx._abort is not None:
                    raise ctx._abort
                if ctx._journal:
                    seq = min(ctx._journal)
                    raise NonDeterminismError(
                        f"workflow {workflow_id!r} ended after {ctx._seq} step(s), but the "
                        f"journal has step {seq} {ctx._journal[seq].name!r}: the code changed "
                        "under a running workflow"
                    )
                try:
                    outcome: _Outcome = ("done", _dumps(value), None)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"the workflow returned a value that is not JSON: {exc}") \
                        from None
            except Exception as exc:
                # A NonDeterminismError wins even when the workflow code caught it.
                error = _error_of(ctx._abort if isinstance(ctx._abort, Exception) else exc)
                outcome = ("failed", None, _dumps(error))
                _log.error("workflow %r failed: %s: %s", workflow_id, error["type"],
                           error["message"])
            if isinstance(ctx._abort, _Interrupted):
                raise ctx._abort
            await ctx._write([], outcome)
            self._stalls.pop(workflow_id, None)
            return ctx._ended(outcome)  # committed: waiters here need no journal read
        except _Interrupted as stop:
            if isinstance(stop, _Fenced):
                _log.log(stop.level, "%s", stop)
            elif not self._closing:
                cause = stop.args[0] if stop.args else stop
                self._retry_later(workflow_id, cause)
            else:  # steps that returned while close() waited: record their results
                await ctx._record_pending()
            return None
        finally:
            if self._running.get(workflow_id) is asyncio.current_task():
                del self._running[workflow_id]
                del self._contexts[workflow_id]
            ctx._ended(ctx._outcome)  # stopped unfinished: waiters look at the journal
            self._start_queued()

    def _start_queued(self) -> None:
        """Start waiting workflows while there is room."""
        while self._queued and self.max_running is not None \
                and len(self._running) < self.max_running and not self._closing:
            workflow_id = next(iter(self._queued))
            name, text, journal = self._queued.pop(workflow_id)
            self._start(workflow_id, self._registry[name], text, journal or {})

    async def _invoke(self, workflow_id: str, call: _StepCall, begin: _Op | None = None,
                      ahead: Callable[[Any, Callable[[], bool]], Any] | None = None,
                      halted: Callable[[], bool] = lambda: False) -> Any:
        """Run a step. A sync step runs in a step thread; `begin`, its checkpoint,
        is then committed by that thread just before (one trip instead of two), and a
        failed commit raises _BeginFailed with fn not run. A generator workflow's steps
        run in copies of its context; an async workflow's, in its task's (a copy of it
        for a sync step)."""
        ctx = call._ctx
        if call.is_async:
            assert begin is None
            step = call.fn(*call.args, **call.kwargs)
            if ctx._gen is None:
                return await step
            return await asyncio.get_running_loop().create_task(step, context=ctx._vars.copy())
        assert self._pool is not None and self._writer is not None
        future = asyncio.get_running_loop().create_future()
        # Counted until the thread returns, even if the workflow is cancelled first:
        # close() must not hand a workflow to another process while its step still runs.
        self._stepping[workflow_id] = self._stepping.get(workflow_id, 0) + 1

        def done(ok: bool, value: Any) -> None:
            self._step_thread_done(workflow_id)
            if future.cancelled():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(_step_error(value))

        checkpoint: Callable[[], BaseException | None] | None = None
        if begin is not None:
            writer, pool = self._writer, self._pool

            def checkpoint() -> BaseException | None:
                # In the step thread. A workflow cancelled or closing meanwhile
                # neither checkpoints nor runs the step.
                if future.cancelled() or self._closing or halted():
                    return _Interrupted("the workflow stopped before the step began")
                ok, value = writer.commit_here(begin, pool.busy <= 1)
                return None if ok else value

        after: Callable[[Any], Any] | None = None
        if ahead is not None:
            def after(value: Any) -> Any:
                return ahead(value, lambda: future.cancelled() or self._closing or halted())

        self._pool.submit(call.fn, call.args, call.kwargs, done, checkpoint, after,
                          None if ctx._gen is None else ctx._vars.copy())
        ctx._steps_due += 1
        try:
            value = await future
        finally:
            ctx._steps_due -= 1
        if inspect.isawaitable(value):
            value = await value
        return value

    def _step_thread_done(self, workflow_id: str) -> None:
        left = self._stepping.pop(workflow_id, 1) - 1
        if left:
            self._stepping[workflow_id] = left

    async def _wait(self, workflow_id: str) -> _Outcome:
        """Wait until the workflow is finished; return its state, result and error."""
        delay = 0.01
        while True:
            if workflow_id in self._queued:  # waiting for its turn here
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            task, ctx = self._running.get(workflow_id), self._contexts.get(workflow_id)
            running_here = task is not None and ctx is not None and not ctx._stopped
            if running_here:
                assert ctx is not None
                waiter = asyncio.get_running_loop().create_future()
                ctx._waiters.append(waiter)  # woken when it ends here or is stopped
                try:
                    await waiter
                finally:
                    ctx._waiters.remove(waiter)
                if ctx._outcome is not None:
                    return ctx._outcome
            rows = await self._read(_SELECT_OUTCOME, (workflow_id,))
            if not rows:
                raise NotFound(f"no workflow has id {workflow_id!r}")
            if rows[0][0] in _FINISHED:
                return rows[0][0], rows[0][1], rows[0][2]
            if not running_here:
                # Running in another process, or waiting to be resumed: look again later.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _status(self, workflow_id: str) -> Status:
        return await self._query(lambda conn: _read_status(conn, workflow_id))

    # Operating it.

    async def cancel(self, id: str) -> bool:
        """Cancel an unfinished workflow, in this process or another: no further step
        starts; a step running now finishes, but its result is not recorded and does
        not resume the workflow; `result()` raises WorkflowCancelled. Returns False,
        changing nothing, when the workflow had finished already."""
        _check_id(id)
        cancelled = bool(await self._open_writer().submit(lambda conn: _cancel(conn, id)))
        ctx = self._contexts.get(id)
        if cancelled and ctx is not None:
            ctx._stop(_Fenced(id, "it was cancelled", logging.INFO))
        if cancelled:
            self._queued.pop(id, None)  # waiting for its turn: it never starts
        return cancelled

    async def retry(self, id: str) -> int:
        """Run a failed workflow again from its failed step: the steps before it stay
        journaled (not run again), the failed step gets fresh attempts. It starts here
        if registered here, else in the next process that registers it. Returns the
        position of the step it restarts from (0: from the top)."""
        _check_id(id)
        seq = int(await self._open_writer().submit(lambda conn: _retry(conn, id)))
        await self._adopt_orphans()
        return seq

    async def prune(self, older_than: float | timedelta) -> int:
        """Delete finished (done, failed, cancelled) workflows, with their steps, that
        finished more than `older_than` (seconds or a timedelta) ago; their ids may be
        used again. Unfinished workflows are never pruned. Returns how many."""
        cutoff = time.time() - _seconds(older_than, "older_than")
        writer, total = self._open_writer(), 0
        while True:  # in slices, so that other writes are not held up for long
            deleted = int(await writer.submit(lambda conn: _prune(conn, cutoff, 500)))
            total += deleted
            if deleted < 500:
                return total

    # Recovery.

    async def _renew(self, *, forget: bool = False) -> None:
        """Renew this process's lease: one row, however many workflows it holds."""
        me, lease = self._owner, self.lease

        def renew(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(_RENEW_OWNER, (me, now + lease))
            if forget:  # leases of processes long gone that hold nothing
                conn.execute(_FORGET_OWNERS, (now - 10 * lease,))

        await self._open_writer().submit(renew)

    async def _maintain(self) -> None:
        """Every tick: renew the lease, take over orphaned workflows, and wake sleeping
        workflows that were cancelled or taken over meanwhile."""
        while True:
            await asyncio.sleep(self._tick)
            try:
                await self._renew()
                await self._adopt_orphans()
                await self._check_sleepers()
            except DurableError as exc:
                _log.warning("could not renew the lease or look for orphaned workflows "
                             "(%s); trying again in %.1fs", exc, self._tick)

    async def _check_sleepers(self) -> None:
        napping = [wf_id for wf_id, ctx in self._contexts.items() if ctx._napping is not None]
        if not napping:
            return

        def read(conn: sqlite3.Connection) -> list[tuple[str, Any]]:
            return [(wf_id, conn.execute(_SELECT_STATES, (wf_id,)).fetchone())
                    for wf_id in napping]

        for wf_id, row in await self._query(read):
            ctx = self._contexts.get(wf_id)
            if ctx is not None and (row is None or row[0] not in _UNFINISHED
                                    or row[1] != self._owner):
                why = functools.partial(_why_fenced, workflow_id=wf_id)
                ctx._stop(await self._query(why))

    async def _adopt_orphans(self, *, opening: bool = False) -> int:
        """Take over every unfinished workflow registered here that no live process
        holds: no owner, an owner whose lease ran out, or a dead process on this
        machine (pid and start time tell). Returns how many were started."""
        now = time.time()
        candidates: list[tuple[str, str | None, bool]] = []
        strangers: dict[str, int] = {}
        verdicts: dict[str, bool] = {}
        for wf_id, name, owner, expires in await self._read(_SELECT_ORPHANS, (self._owner,)):
            dead = owner is not None and verdicts.setdefault(
                owner, _owner_is_dead(owner, self._host))
            if owner is not None and not dead and expires is not None and expires >= now:
                continue  # a live owner with a live lease
            if name in self._registry:
                candidates.append((wf_id, owner, dead))
            else:
                strangers[name] = strangers.get(name, 0) + 1
        if opening:
            for name, count in strangers.items():
                _log.warning("%d unfinished workflow(s) named %r are not registered here; "
                             "left for a process that registers them", count, name)
        started = await self._resume(candidates) if candidates else 0
        if opening and started:
            _log.info("resumed %d unfinished workflow(s) from %s", started, self.path)
        elif started:
            _log.info("took over %d workflow(s) whose owner died or whose lease ran out",
                      started)
        return started

    async def _resume(self, candidates: list[tuple[str, str | None, bool]]) -> int:
        """Claim each (id, owner seen, owner known dead) whose owner is unchanged and
        dead or without a live lease, then start it from its journal. Returns how many
        were started."""
        me = self._owner
        # Not while a task of ours for the id is still winding down: it must be fenced
        # and gone first, or it could write again under the claim renewed for it.
        candidates = [c for c in candidates if not self._here(c[0])]

        def claim(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            return [wf_id for wf_id, owner, dead in candidates
                    if conn.execute(_CLAIM, (me, now, wf_id, owner, dead, now)).rowcount]

        claimed = await self._open_writer().submit(claim)

        def load(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            conn.execute("BEGIN")
            try:
                if len(claimed) > 64:  # many: two scans beat a query per workflow
                    return (conn.execute(_SELECT_OWNED, (me,)).fetchall(),
                            conn.execute(_SELECT_OWNED_STEPS, (me,)).fetchall())
                workflows, steps = [], []
                for wf_id in claimed:
                    workflows += conn.execute(_SELECT_INPUT, (wf_id,)).fetchall()
                    steps += conn.execute(_SELECT_REPLAY, (wf_id,)).fetchall()
                return workflows, steps
            finally:
                conn.execute("COMMIT")

        workflows, steps = await self._query(load) if claimed else ([], [])
        journals: dict[str, dict[int, _JournaledStep]] = {}
        for wf_id, seq, *step in steps:
            journals.setdefault(wf_id, {})[seq] = _JournaledStep(*step)
        wanted = set(claimed)
        started = 0
        for wf_id, name, text in workflows:
            if wf_id in wanted and not self._here(wf_id) and name in self._registry:
                self._start(wf_id, self._registry[name], text, journals.get(wf_id, {}))
                started += 1
        return started

    def _retry_later(self, workflow_id: str, cause: object) -> None:
        """The journal refused a write (locked, full, read-only): the workflow stays
        unfinished and held here; resume it from its journal after a pause."""
        tries = self._stalls[workflow_id] = self._stalls.get(workflow_id, 0) + 1
        delay = min(30.0, 0.1 * 2 ** tries)
        _log.warning("workflow %r could not write its journal (%s); resuming it in %.1fs",
                     workflow_id, cause, delay)
        loop = asyncio.get_running_loop()

        def resume() -> None:
            self._timers.discard(timer)
            if not self._closing:
                task = loop.create_task(self._resume_held(workflow_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        timer = loop.call_later(delay, resume)
        self._timers.add(timer)

    async def _resume_held(self, workflow_id: str) -> None:
        try:
            await self._resume([(workflow_id, self._owner, True)])
        except DurableError as exc:
            self._retry_later(workflow_id, exc)


# COMMAND LINE: python durable.py JOURNAL list|show|retry|cancel|prune


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _age(text: str) -> float:
    number, unit = text[:-1], text[-1:]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _AGE_UNITS or not value >= 0:
        raise ValueError(f"{text!r} is not an age like 7d, 12h, 30m or 90s")
    return value * _AGE_UNITS[unit]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + \
        f".{int(timestamp % 1 * 1000):03d}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def _error_text(error: dict[str, Any] | None) -> str:
    return f"{error.get('type')}: {error.get('message')}" if error else ""


def _where_now(status: Status) -> str:
    if status.state == "failed":
        step = (status.error or {}).get("step")
        return f"failed: {_error_text(status.error)}" + (f" (step {step!r})" if step else "")
    if status.state in ("done", "cancelled"):
        return status.state
    if not status.steps:
        where = "pending: accepted, no step started yet"
    else:
        last = status.steps[-1]
        if last.state != "running":
            where = f"running: step {last.seq} {last.name!r} is {last.state}, the next one " \
                    "is starting"
        elif last.name == _SleepCall.name:
            where = f"sleeping in step {last.seq} until {_utc(last.result)} UTC " \
                    f"({max(0.0, last.result - time.time()):.1f}s from now)"
        else:
            where = f"running step {last.seq} {last.name!r}, attempt {last.attempts}, " \
                    f"for {time.time() - last.updated_at:.1f}s"
    return f"{where}\n  held by: {_holder(status)}"


def _holder(status: Status) -> str:
    """Who holds an unfinished workflow, and whether that one is still there."""
    if status.owner is None:
        return (f"no process; the next one that registers {status.name!r} takes it "
                "(at its start, or within seconds if it is running)")
    host, _, rest = status.owner.partition("|")
    who = f"pid {rest.partition('|')[0]} on {host}"
    if _owner_is_dead(status.owner, socket.gethostname()):
        return f"{who}, which has exited; a process on this machine takes it over at once"
    if status.lease_expires_at is None or status.lease_expires_at < time.time():
        return f"{who}, whose lease ran out; the next process to look takes it over"
    return f"{who}, lease renewed, good for {status.lease_expires_at - time.time():.0f}s more"


def _show(status: Status) -> str:
    lines = [f"workflow {status.id!r} ({status.name}): {status.state}",
             f"  created   {_utc(status.created_at)} UTC"]
    if status.finished_at is not None:
        lines.append(f"  finished  {_utc(status.finished_at)} UTC "
                     f"(+{status.finished_at - status.created_at:.3f}s)")
    if status.state == "done":
        lines.append(f"  result    {_dumps(status.result)}")
    rows = [["  #", "step", "state", "attempts", "started", "took", "error"]]
    for step in status.steps:
        took = "" if step.finished_at is None else f"{step.finished_at - step.started_at:.3f}s"
        rows.append([f"  {step.seq}", step.name, step.state, str(step.attempts),
                     f"+{step.started_at - status.created_at:.3f}s", took,
                     _error_text(step.error)])
        for failure in step.failed_attempts if step.attempts > 1 else ():
            end = failure.get("finished_at")
            lasted = "" if end is None else f"{end - failure['started_at']:.3f}s"
            rows.append(["", f"  attempt {failure['attempt']}", "failed", "",
                         f"+{failure['started_at'] - status.created_at:.3f}s", lasted,
                         _error_text(failure.get("error"))])
    if status.steps:
        lines += ["", _table(rows)]
    lines += ["", f"  now: {_where_now(status)}"]
    return "\n".join(lines)


def _command_line(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python durable.py",
        description="See and steer the workflows in a durable.py journal. Safe to use "
                    "while a service writes the same file.")
    parser.add_argument("journal", help="the journal file (SQLite)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="list workflows, newest first")
    listing.add_argument("--state", choices=[*_UNFINISHED, *_FINISHED])
    listing.add_argument("--limit", type=_positive, default=50, help="at most this many (50)")
    show = commands.add_parser("show", help="one workflow's step timeline")
    show.add_argument("id")
    retry = commands.add_parser("retry", help="run a failed workflow again from its failed step")
    retry.add_argument("id")
    cancel = commands.add_parser("cancel", help="cancel an unfinished workflow")
    cancel.add_argument("id")
    prune = commands.add_parser("prune", help="delete workflows finished longer ago than AGE")
    prune.add_argument("age", help="like 7d, 12h, 30m or 90s")
    for sub in (listing, show, retry, cancel, prune):
        sub.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "prune":
        try:
            age = _age(args.age)
        except ValueError as exc:
            parser.error(str(exc))

    try:
        if not os.path.exists(args.journal):
            raise JournalError(f"no journal at {args.journal!r}")
        conn = _connect(args.journal, "FULL", 5.0, create=False)
    except DurableError as exc:
        print(f"durable: {exc}", file=sys.stderr)
        return 1
    try:
        output: Any
        if args.command == "list":
            rows = conn.execute(_SELECT_LIST, (args.state, args.state, args.limit)).fetchall()
            output = [{"id": r[0], "name": r[1], "state": r[2], "created_at": r[3],
                       "updated_at": r[4], "finished_at": r[5], "steps": r[6]} for r in rows]
            text = _table([["ID", "WORKFLOW", "STATE", "STEPS", "CREATED (UTC)", "TOOK"]] + [
                [w["id"], w["name"], w["state"], str(w["steps"]), _utc(w["created_at"]),
                 "" if w["finished_at"] is None
                 else f"{w['finished_at'] - w['created_at']:.3f}s"] for w in output
            ]) if output else "no workflows"
        elif args.command == "show":
            status = _read_status(conn, args.id)
            output, text = dataclasses.asdict(status), _show(status)
        elif args.command == "cancel":
            with _transaction(conn):
                cancelled = _cancel(conn, args.id)
            output = {"id": args.id, "cancelled": cancelled}
            text = f"cancelled workflow {args.id!r}" if cancelled else \
                f"workflow {args.id!r} had finished already; nothing to cancel"
        elif args.command == "retry":
            with _transaction(conn):
                seq = _retry(conn, args.id)
            output = {"id": args.id, "restarts_at_step": seq}
            where = f"step {seq}" if seq else "the top"
            text = (f"workflow {args.id!r} is pending again and restarts at {where}; a "
                    "running service that registers it picks it up within seconds, "
                    "otherwise the next one to start")
        else:
            cutoff, pruned = time.time() - age, 0
            while True:
                with _transaction(conn):
                    deleted = _prune(conn, cutoff, 500)
                pruned += deleted
                if deleted < 500:
                    break
            output = {"pruned": pruned}
            text = f"pruned {pruned} finished workflow(s) older than {args.age}"
    except (DurableError, sqlite3.Error) as exc:
        print(f"durable: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    try:
        print(json.dumps(output, indent=2, ensure_ascii=False) if args.json else text)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(_command_line())
