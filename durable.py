"""durable.py: durable execution for Python services, in one file.

One file, standard library only, Python 3.11 or newer. Copy it into your project.

A *workflow* is a function whose steps are checkpointed, one by one, in a SQLite
file in WAL mode (the journal), or, for services on several machines, in a
PostgreSQL database: ``Durable("postgresql://...")`` (psycopg 3, imported only then).
A step that raises is retried with backoff; a step that finished never runs again;
the same workflow id submitted twice runs once; and after the process is killed, the
next start resumes every unfinished workflow from its first unfinished step. No
server, no broker.

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

    python durable.py orders.db list|show ID|retry ID|cancel ID|send ID NAME JSON|prune 7d [--json]

How it runs
-----------
Threads. The *event loop* (yours) runs Durable's methods, async workflows and async
steps. One *writer* thread commits the journal's writes: whatever is queued when it
wakes goes into one transaction (group commit). *Step threads* (up to max_threads)
run sync steps. One *reader* thread serves reads (status, result, recovery).

Where a workflow's code runs. An async workflow runs on the loop. A generator
workflow runs on the loop too, except that the step thread which ran one of its sync
steps may go on with it, up to its next call that is not a fresh sync step, and a
workflow run() when nothing else runs here starts in a step thread at once. Either
way its code runs in one place at a time, in one contextvars.Context of its own.

The life of one step. The step machine looks the call up in the journal (replay: a
finished step returns its recorded result and never runs again). Otherwise it writes
the attempt's *begin row* (state running, attempt n); then the body runs; then the
machine judges the outcome: done, retry after a delay, or failed for good. A done
row is not committed alone: it goes with the workflow's next checkpoint (the next
step's begin row, a sleep, or the workflow's end), so the next step never starts
before the previous result is durable, and the steps and end of a 4-step workflow
take 5 commits, not 9 (run()'s insert is one more). Every checkpoint is fenced: it
writes only while this process holds the workflow unfinished, so a cancelled or
taken-over workflow records nothing more.

Sections, top to bottom: errors; records; codec and checks; owner identity; stores
(_SqliteJournal and _PostgresJournal: every SQL statement, the same verbs in each)
and the operations on them; group commit (the
writer); step threads; a workflow here (_Run, one object per workflow in this
process); the step machine (plain functions); the drivers (the loop's and a step
thread's); context and handle (the public faces); Durable; the command line.

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
import importlib
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
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, overload

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
    "ReceiveTimeout",
    "RetryPolicy",
    "Status",
    "StepFailed",
    "StepRecord",
    "UnreadableRecord",
    "WorkflowCancelled",
    "WorkflowFailed",
]

_log = logging.getLogger("durable")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

# CONSTANTS.

_APPLICATION_ID = 0x44757261  # "Dura" in the SQLite file header: this file is a journal.
_MAX_ID_LENGTH = 255
_MAX_BATCH = 1024  # most writes committed together in one transaction
_MAIL_POLL = 0.5  # seconds between looks for values sent by other processes
_FOREVER = 10.0 ** 9  # a wait with no deadline, in seconds
_UNFINISHED = ("pending", "running")
_FINISHED = ("done", "failed", "cancelled")

State = Literal["pending", "running", "done", "failed", "cancelled"]
StepState = Literal["running", "done", "failed"]

# ERRORS.


class DurableError(Exception):
    """Root of every error durable.py raises."""


class JournalError(DurableError):
    """The journal file cannot be used: not a journal, a newer schema, or a failed write."""


class UnreadableRecord(JournalError):
    """A workflow's record in the journal holds a value that cannot be read back (nested
    too deeply, or not JSON: whoever can write the file can put anything in it).
    Reading that workflow fails the same way every time; other workflows read as
    before."""


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


class ReceiveTimeout(DurableError):
    """Raised in a workflow by ``ctx.receive(name, timeout=...)`` when nothing was sent
    under `name` by its deadline. The workflow may catch it."""


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


# The private stop reasons: why a workflow stops here without an outcome.


class _Interrupted(BaseException):
    """The workflow must stop without an outcome: its journal could not be written,
    or the journal is closing. A BaseException, so workflow code that catches
    `Exception` cannot swallow it; the workflow stays unfinished in the journal."""


class _Fenced(_Interrupted):
    """The workflow must stop here for good: it was cancelled, finished elsewhere, or
    another process holds it now. Nothing more is recorded from this process."""

    def __init__(self, workflow_id: str, why: str, level: int = logging.WARNING) -> None:
        super().__init__(f"workflow {workflow_id!r} is no longer held by this process: {why}; "
                         "nothing more is recorded from here")
        self.level = level


# RECORDS: settings, and what the journal says about a workflow.


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
    parent: str | None = None  # the workflow that started it with ctx.child, if one did
    children: tuple[str, ...] = ()  # the workflows it started with ctx.child


@dataclass(frozen=True, slots=True)
class _JournaledStep:
    """A step as recorded before this (re)start: what replay goes by."""

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


# CODEC AND CHECKS: JSON only, never pickle, so whoever can write the file cannot run code.


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


def _not_json(constant: str) -> Any:
    raise ValueError(constant)


# Strict like the encoder: NaN and Infinity, which json accepts, are not JSON.
_DECODE = json.JSONDecoder(parse_constant=_not_json).decode


def _loads(text: str | None, workflow_id: str | None = None) -> Any:
    """A value from the journal. Whoever can write the file can put anything there: a
    value nested too deeply to decode, or one that is not JSON, fails reading that
    workflow, and nothing else."""
    try:
        return None if text is None else _DECODE(text)
    except RecursionError:  # [[[[...]]]] past the interpreter's depth, put in the file
        raise _too_deep(workflow_id) from None
    except ValueError as exc:  # not JSON at all, or NaN: not written by durable.py
        raise _too_deep(workflow_id, f"that is not JSON ({exc})") from None


def _too_deep(workflow_id: str | None, what: str = "nested too deeply to read"
              ) -> UnreadableRecord:
    """Also for a value read back but too deep to render (repr, asdict, json.dumps)."""
    whose = "" if workflow_id is None else f", for workflow {workflow_id!r}"
    return UnreadableRecord(f"the journal holds a value {what}{whose}")


def _error_of(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, StepFailed):
        return {"type": exc.error_type, "message": exc.message, "step": exc.step,
                "attempts": exc.attempts}
    return {"type": type(exc).__name__, "message": str(exc)}


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


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > _MAX_ID_LENGTH \
            or "\x00" in name:
        raise InvalidInput(f"{what} must be a non-empty string of at most {_MAX_ID_LENGTH} "
                           f"characters without NUL, not {name!r}")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} must be valid Unicode, not {name!r}") from None


def _name_of(fn: Callable[..., Any]) -> str:
    # "Order.charge" for a method, "charge" for a function defined inside another.
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return str(name).rpartition("<locals>.")[2]


def _seconds(value: float | timedelta, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        raise InvalidInput(f"{what} must be seconds >= 0 or a timedelta, not {value!r}")
    return float(seconds)


# OWNER IDENTITY: which process holds a workflow, whether it is alive, and lease time.


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.cache
def _place() -> str:
    """Where this process's pids mean something: its kernel's boot and its pid
    namespace. Two containers or machines given the same host name differ here."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{_boot_id()}/{namespace}"


def _process_start(pid: int) -> str | None:
    """A token that changes when `pid` is reused, or None if no such process runs:
    where it runs (_place) and when it started."""
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
    return None if fields[0] == "Z" else _place() + ":" + fields[19]


def _liveness(owner: str, host: str) -> bool | None:
    """Whether `owner` (a process's "host|pid|start|nonce") is alive: True or False for
    another process on this host, None when that cannot be seen from here (a process
    on another machine, or a Durable of this process, closed or not): only its lease
    can tell then."""
    parts = owner.split("|")
    if len(parts) != 4 or parts[0] != host or not parts[1].isdigit() \
            or parts[2].rpartition(":")[0] not in ("", _place()):
        return None  # another machine, or the same name on another kernel or namespace
    current = _process_start(int(parts[1]))
    if current is None or (current != "" and current != parts[2]):
        return False
    return None if int(parts[1]) == os.getpid() else True  # this process: its lease tells


def _owner_is_dead(owner: str, host: str) -> bool:
    """True only when `owner` is a process on this host that has exited."""
    return _liveness(owner, host) is False


class _LeaseClock:
    """Wall-clock time as this process has counted it since it started: its start's
    wall time plus the monotonic time elapsed. A jump of the system clock (NTP after
    a VM resumes, a hand-set date) moves neither the leases this process writes nor
    its judgement of others' leases; only time that really passed does."""

    __slots__ = ("_mono", "_wall")

    def __init__(self) -> None:
        self._wall, self._mono = time.time(), time.monotonic()

    def __call__(self) -> float:
        return self._wall + (time.monotonic() - self._mono)
# STORES: every statement sent to a journal, and everything particular to SQLite or
# PostgreSQL. Both classes have the same verbs; nothing else knows which one it holds.


def _is_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def _redacted(target: str) -> str:
    """The journal's name for messages: a URL without its password (before the host
    or as a parameter)."""
    if not _is_url(target):
        return target
    scheme, _, rest = target.partition("://")
    place, question, query = rest.partition("?")
    userinfo, at, host = place.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = "&".join("password=***" if part.lower().startswith("password=") else part
                     for part in query.split("&"))
    return f"{scheme}://{userinfo}{at}{host}{question}{query}"


def _looks_like_a_dsn(target: str) -> bool:
    """Whether `target` is a libpq "key=value" connection string, not a file name."""
    words = target.split()
    return bool(words) and all("=" in word for word in words) and any(
        word.split("=", 1)[0] in ("host", "hostaddr", "dbname", "user", "port", "service")
        for word in words)


def _check_version(where: str, version: int, known: int) -> None:
    if version > known:
        raise JournalError(
            f"journal {_redacted(where)!r} has schema version {version}, newer than this "
            f"durable.py {__version__} knows ({known}); upgrade durable.py to open it")


def _not_written(where: str) -> JournalError:
    return JournalError(f"{_redacted(where)!r} is not a durable.py journal (it holds no "
                        "journal yet); give the journal a service has written")


_Row = tuple[Any, ...]  # a step row, in the order of _SqliteJournal.STEP_COLUMNS
_Outcome = tuple[str, str | None, str | None]  # a finished workflow's state, result, error


class _SqliteJournal:
    """A journal in one SQLite file: one connection and every statement durable.py
    sends it, each inside the one verb that runs it.

    Writes run inside `transaction()`; a read of several statements inside
    `snapshot()`. A verb that refuses (raises a DurableError) does so before it
    writes. What the file itself fails with is in `failures`; `error()` turns it into
    a JournalError with advice. Nothing outside this class calls `execute`, so a
    second store (PostgreSQL) is a second class with the same verbs."""

    failures: ClassVar[tuple[type[Exception], ...]] = (sqlite3.Error,)

    # Each entry is one schema version; entry i takes a journal from version i to i + 1.
    MIGRATIONS: ClassVar[tuple[tuple[str, ...], ...]] = (
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
        (
            # Values sent to workflows (dur.send), one per name, kept with the workflow.
            """CREATE TABLE messages (
                workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
                name        TEXT NOT NULL,
                value       TEXT NOT NULL,
                sent_at     REAL NOT NULL,
                PRIMARY KEY (workflow_id, name)
            ) WITHOUT ROWID""",
            # A child workflow's parent (ctx.child).
            "ALTER TABLE workflows ADD COLUMN parent TEXT",
            "CREATE INDEX workflows_parent ON workflows (parent) WHERE parent IS NOT NULL",
        ),
    )

    # What to do about an SQLite error, by its primary result code.
    ADVICE: ClassVar[dict[str, str]] = {
        "SQLITE_READONLY": "the journal file or its folder is read-only; make both writable",
        "SQLITE_CANTOPEN": "the journal cannot be opened; its folder must exist and be "
                           "writable (WAL mode keeps -wal and -shm files beside it)",
        "SQLITE_FULL": "the disk, or the journal's size limit, is full; free some space",
        "SQLITE_BUSY": "another connection held the write lock longer than busy_timeout",
        "SQLITE_LOCKED": "another connection held the write lock longer than busy_timeout",
        "SQLITE_CORRUPT": "the journal file is damaged; restore it from a backup",
        "SQLITE_NOTADB": "the file is not an SQLite database",
        "SQLITE_IOERR": "the disk reported an I/O error",
    }

    def __init__(self, path: str, *, synchronous: str = "FULL", busy_timeout: float = 5.0,
                 create: bool = True, clock: Callable[[], float] | None = None,
                 lease: float = 30.0) -> None:
        """Open the journal, refuse a file that is not one, and bring its schema up to
        date. With create=False an empty file is refused too, and left as it is.
        Leases are measured on `clock`: this process's, as no server keeps time here."""
        self.path = path
        self.clock = clock or _LeaseClock()
        try:
            # isolation_level=None: no implicit transactions; transaction() opens them.
            self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise self.error(f"cannot open journal {path!r}", exc) from None
        try:
            self._open(synchronous, busy_timeout, create)
        except sqlite3.Error as exc:
            self._conn.close()
            raise self.error(f"cannot use journal {path!r}", exc) from None
        except BaseException:
            self._conn.close()
            raise

    def _open(self, synchronous: str, busy_timeout: float, create: bool) -> None:
        conn = self._conn
        # Wait this long for another process's write lock instead of failing at once.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        version = self._schema_version()  # refuses a file that is not a journal, untouched
        if not create and version == 0:
            raise _not_written(self.path)
        # WAL: readers never block the writer, the writer never blocks readers, and a
        # commit is one append to the log. https://www.sqlite.org/wal.html
        self._wal(busy_timeout)
        # FULL syncs the log at every commit (survives power loss); NORMAL syncs only at
        # checkpoints (survives a process crash). https://www.sqlite.org/pragma.html#pragma_synchronous
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Steps are deleted with their workflow (ON DELETE CASCADE).
        conn.execute("PRAGMA foreign_keys = ON")
        if version < len(self.MIGRATIONS):
            # Checked again under the write lock: processes opening a new file at once
            # take turns, and only the first migrates.
            with self.transaction():
                version = self._schema_version()
                if version == len(self.MIGRATIONS):
                    return  # another process migrated it meanwhile
                for statements in self.MIGRATIONS[version:]:
                    for sql in statements:
                        conn.execute(sql)
                # PRAGMA takes no parameters; both values are this module's own integers.
                conn.execute(f"PRAGMA user_version = {len(self.MIGRATIONS)}")
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")

    _SCHEMA = """SELECT (SELECT application_id FROM pragma_application_id),
                        (SELECT user_version FROM pragma_user_version),
                        (SELECT count(*) FROM sqlite_master)"""

    def _schema_version(self) -> int:
        """The journal's schema version (0: an empty file), read in one statement, so
        that another process's migration is seen whole or not at all."""
        try:
            app_id, version, tables = self._conn.execute(self._SCHEMA).fetchone()
        except sqlite3.OperationalError as exc:  # locked, or cannot be opened as it should
            raise self.error(f"cannot use journal {self.path!r}", exc) from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path!r} is not a durable.py journal ({exc}); give "
                               "Durable a new file or the journal you meant") from None
        if app_id != _APPLICATION_ID and (app_id or version or tables):
            raise JournalError(f"{self.path!r} is a SQLite database but not a durable.py "
                               "journal; keep the journal in a file of its own")
        _check_version(self.path, version, len(self.MIGRATIONS))
        return int(version)

    def _wal(self, busy_timeout: float) -> None:
        # Switching a new file to WAL needs it to itself for a moment, and SQLite answers
        # SQLITE_BUSY at once rather than wait on the busy handler: wait here instead.
        deadline, pause = time.monotonic() + busy_timeout, 0.001
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY" \
                        or time.monotonic() > deadline:
                    raise
            else:
                if str(mode).lower() == "wal":
                    return
                if time.monotonic() > deadline:
                    raise JournalError(f"journal {self.path!r} cannot be switched to WAL mode "
                                       f"(it stays in {mode!r}); keep it on a local disk")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def close(self) -> None:
        self._conn.close()

    def deadlocked(self, exc: Exception) -> bool:
        """Whether `exc` rolled back a transaction to end a deadlock: never here, as one
        write lock is taken up front."""
        return False

    def error(self, what: str, exc: Exception) -> JournalError:
        """A JournalError for `exc`, one of `failures`, with what to do about it."""
        code = getattr(exc, "sqlite_errorname", "").split("_")[:2]
        advice = self.ADVICE.get("_".join(code))
        return JournalError(f"{what}: {exc}" + (f" ({advice})" if advice else ""))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The one way into a write transaction: BEGIN IMMEDIATE takes the write lock up
        front (waiting up to busy_timeout), so a transaction never fails halfway for
        want of it. Any exception rolls everything back."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads that see one state of the journal."""
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def pragma(self, name: str) -> Any:
        """A setting of the connection (for tests and the command line)."""
        if not name.isidentifier():
            raise InvalidInput(f"not a pragma: {name!r}")
        return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    # Workflows: run()'s insert, one at a time or many in two statements.

    _INSERT = """
        INSERT INTO workflows (id, name, input, input_hash, state, owner, created_at,
                               updated_at)
        VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)
        ON CONFLICT (id) DO NOTHING"""
    _IDENTITY = "SELECT name, input_hash, state, owner FROM workflows WHERE id = ?"
    # Many at once: the ids, and the new rows, as one JSON array each, so the statements'
    # text never changes with their number (the statement cache keeps two, not hundreds).
    _IDENTITIES = """
        SELECT id, name, input_hash, state, owner FROM workflows
        WHERE id IN (SELECT value FROM json_each(?))"""
    _INSERT_MANY = """
        INSERT INTO workflows (id, name, input, input_hash, state, owner, created_at,
                               updated_at)
        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
               json_extract(value, '$[2]'), json_extract(value, '$[3]'), 'pending',
               json_extract(value, '$[4]'), ?, ?
        FROM json_each(?) WHERE true"""

    def insert(self, workflow_id: str, name: str, text: str, digest: str, owner: str,
               now: float) -> bool:
        """Record a new pending workflow; False (changing nothing) if the id is taken."""
        values = (workflow_id, name, text, digest, owner, now, now)
        return bool(self._conn.execute(self._INSERT, values).rowcount)

    def identity(self, workflow_id: str) -> tuple[str, str, str, str | None] | None:
        """(name, input hash, state, owner) of a recorded workflow."""
        row = self._conn.execute(self._IDENTITY, (workflow_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def identities(self, ids: list[str]) -> dict[str, tuple[str, str, str, str | None]]:
        return {wf_id: (name, digest, state, owner) for wf_id, name, digest, state, owner
                in self._conn.execute(self._IDENTITIES, (_dumps(ids),))}

    def insert_many(self, rows: list[tuple[str, str, str, str, str]], now: float) -> set[str]:
        """Record new workflows (id, name, input, hash, owner) whose ids were free a
        moment ago; returns the ids taken meanwhile: none, under the write lock."""
        self._conn.execute(self._INSERT_MANY, (now, now, _dumps(rows)))
        return set()

    # Checkpoints: step rows and a workflow's end, fenced on its holder.

    # Fencing: every checkpoint matches only while the writer holds the workflow and the
    # workflow is unfinished. A workflow's first checkpoint in a process marks it running;
    # later ones write their step rows only under the same condition (one statement).
    _TOUCH = """
        UPDATE workflows SET state = 'running', updated_at = ?
        WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""
    _FINISH = """
        UPDATE workflows SET state = ?, result = ?, error = ?, updated_at = ?, finished_at = ?
        WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""
    # A step row written whole: the start of an attempt, or the step's end. An existing
    # row keeps its name and first start. `failures` is a JSON list of the step's failed
    # attempts (attempt, times, error); a durable sleep's result is its wake time.
    STEP_COLUMNS = ("workflow_id, seq, name, state, attempts, result, error, failures, "
                    "started_at, updated_at, finished_at")
    _STEP_WIDTH = 11
    _STEP_UPSERT = """
        ON CONFLICT (workflow_id, seq) DO UPDATE SET
            state = excluded.state, attempts = excluded.attempts, result = excluded.result,
            error = excluded.error, failures = excluded.failures,
            updated_at = excluded.updated_at, finished_at = excluded.finished_at"""

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def _put_steps(count: int, fenced: bool) -> str:
        """SQL writing `count` step rows; fenced: only while (id, owner) holds the
        workflow unfinished (the two last parameters), so zero rows change otherwise."""
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count)
        columns, upsert = _SqliteJournal.STEP_COLUMNS, _SqliteJournal._STEP_UPSERT
        if not fenced:
            return f"INSERT INTO steps ({columns}) VALUES {values} {upsert}"
        return (f"INSERT INTO steps ({columns}) SELECT * FROM (VALUES {values}) "
                "WHERE EXISTS (SELECT 1 FROM workflows WHERE id = ? AND owner = ? "
                f"AND state IN ('pending', 'running')) {upsert}")

    def checkpoint(self, workflow_id: str, owner: str, rows: list[_Row],
                   outcome: _Outcome | None, touch: bool) -> bool:
        """Write step `rows` and the workflow's `outcome` (if any) only if `owner` holds
        the workflow unfinished; `touch` marks it running first. False, writing nothing,
        when it does not hold it."""
        conn, count = self._conn, len(rows)
        per = count
        if count * self._STEP_WIDTH > 997:
            # A wide fan-out: as many rows a statement as it may bind (999 values before
            # SQLite 3.32, 32,766 in stock builds since). https://www.sqlite.org/limits.html
            limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            per = max(1, (limit - 2) // self._STEP_WIDTH)
        first = rows if count <= per else rows[:per]
        if outcome is None and not touch:  # the common case: one statement, fenced
            if first and conn.execute(
                    self._put_steps(len(first), True),
                    (*itertools.chain.from_iterable(first), workflow_id, owner)
            ).rowcount != len(first):
                return False
        else:
            now = time.time()
            fence = (conn.execute(self._FINISH, (*outcome, now, now, workflow_id, owner))
                     if outcome is not None
                     else conn.execute(self._TOUCH, (now, workflow_id, owner)))
            if fence.rowcount != 1:
                return False
            if first:
                conn.execute(self._put_steps(len(first), False),
                             tuple(itertools.chain.from_iterable(first)))
        for start in range(per, count, per or 1):  # the rest, behind the same fence
            part = rows[start:start + per]
            conn.execute(self._put_steps(len(part), False),
                         tuple(itertools.chain.from_iterable(part)))
        return True

    def checkpoints(self, owner: str, writes: list[tuple[str, list[_Row], _Outcome | None,
                                                          bool]]) -> set[str]:
        """`checkpoint` for each (workflow id, rows, outcome, touch), in order; returns
        the ids of the workflows `owner` does not hold (nothing of theirs written).
        One after another: here a statement costs no round trip."""
        return {workflow_id for workflow_id, rows, outcome, touch in writes
                if not self.checkpoint(workflow_id, owner, rows, outcome, touch)}

    # Messages: dur.send's values, and what a waiting receive looks for.

    _SEND = """
        INSERT INTO messages (workflow_id, name, value, sent_at) VALUES (?, ?, ?, ?)
        ON CONFLICT (workflow_id, name) DO NOTHING"""
    _MESSAGE = "SELECT value FROM messages WHERE workflow_id = ? AND name = ?"
    _MESSAGES_FOR = """
        SELECT m.workflow_id, m.name, m.value FROM json_each(?) w
        JOIN messages m ON m.workflow_id = json_extract(w.value, '$[0]')
                       AND m.name = json_extract(w.value, '$[1]')"""

    def send(self, workflow_id: str, name: str, text: str, now: float) -> bool:
        """Record `text` under `name` for the workflow; False if a value is there."""
        return bool(self._conn.execute(self._SEND, (workflow_id, name, text, now)).rowcount)

    def message(self, workflow_id: str, name: str) -> str | None:
        row = self._conn.execute(self._MESSAGE, (workflow_id, name)).fetchone()
        return None if row is None else str(row[0])

    def messages_for(self, wanted: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """The values sent under each (workflow id, name) wanted, where there is one."""
        return self._conn.execute(self._MESSAGES_FOR, (_dumps(wanted),)).fetchall()

    # Children (ctx.child).

    _ADOPT = "UPDATE workflows SET parent = ? WHERE id = ? AND parent IS NULL"
    _CHILDREN = "SELECT id, state FROM workflows WHERE parent = ? ORDER BY created_at, id"

    def adopt(self, child: str, parent: str) -> None:
        """Record `parent` as the parent of workflow `child`, unless it has one."""
        self._conn.execute(self._ADOPT, (parent, child))

    def children(self, workflow_id: str) -> list[tuple[str, str]]:
        """(id, state) of the workflow's children, oldest first."""
        return self._conn.execute(self._CHILDREN, (workflow_id,)).fetchall()

    # Reads of one workflow.

    _OUTCOME = "SELECT state, result, error FROM workflows WHERE id = ?"
    _STATE = "SELECT state, owner FROM workflows WHERE id = ?"
    _WORKFLOW = """
        SELECT w.id, w.name, w.state, w.result, w.error, w.created_at, w.updated_at,
               w.finished_at, w.owner, o.expires_at, w.parent
        FROM workflows w LEFT JOIN owners o ON o.id = w.owner WHERE w.id = ?"""
    _STEPS = """
        SELECT seq, name, state, attempts, result, error, failures, started_at, updated_at,
               finished_at
        FROM steps WHERE workflow_id = ? ORDER BY seq"""

    def outcome(self, workflow_id: str) -> _Outcome | None:
        """(state, result, error) of a workflow, None for an unknown id."""
        row = self._conn.execute(self._OUTCOME, (workflow_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def state(self, workflow_id: str, lock: bool = False) -> tuple[str, str | None] | None:
        """(state, owner) of a workflow, None for an unknown id. `lock` asks what the
        write lock of transaction() gives here already: no other may change it."""
        row = self._conn.execute(self._STATE, (workflow_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def status(self, workflow_id: str) -> tuple[tuple[Any, ...] | None, list[tuple[Any, ...]]]:
        """A workflow's row (id, name, state, result, error, created, updated, finished,
        owner, lease end) and its step rows, from one snapshot."""
        with self.snapshot():
            row = self._conn.execute(self._WORKFLOW, (workflow_id,)).fetchone()
            steps = self._conn.execute(self._STEPS, (workflow_id,)).fetchall()
        return row, steps

    _LIST = """
        SELECT w.id, w.name, w.state, w.created_at, w.updated_at, w.finished_at,
               (SELECT count(*) FROM steps s WHERE s.workflow_id = w.id)
        FROM workflows w WHERE (? IS NULL OR w.state = ?)
        ORDER BY w.created_at DESC LIMIT ?"""

    def listing(self, state: str | None, limit: int) -> list[tuple[Any, ...]]:
        """Newest first: (id, name, state, created, updated, finished, step count)."""
        return self._conn.execute(self._LIST, (state, state, limit)).fetchall()

    # Operating: cancel, retry, prune (in a write transaction).

    _CANCEL = """
        UPDATE workflows SET state = 'cancelled', error = ?, updated_at = ?, finished_at = ?
        WHERE id = ? AND state IN ('pending', 'running')"""
    _LAST_FAILED = "SELECT max(seq) FROM steps WHERE workflow_id = ? AND state = 'failed'"
    _DELETE_STEPS_FROM = "DELETE FROM steps WHERE workflow_id = ? AND seq >= ?"
    _REOPEN = """
        UPDATE workflows SET state = 'pending', result = NULL, error = NULL,
                             finished_at = NULL, owner = NULL, updated_at = ?
        WHERE id = ? AND state = 'failed'"""
    _PRUNE = """
        DELETE FROM workflows WHERE rowid IN (
            SELECT rowid FROM workflows
            WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ? LIMIT ?)"""

    def cancel(self, workflow_id: str, error: str, now: float) -> bool:
        return bool(self._conn.execute(self._CANCEL, (error, now, now, workflow_id)).rowcount)

    def last_failed_step(self, workflow_id: str) -> int | None:
        seq = self._conn.execute(self._LAST_FAILED, (workflow_id,)).fetchone()[0]
        return None if seq is None else int(seq)

    def reopen(self, workflow_id: str, from_seq: int | None, now: float) -> None:
        """A failed workflow pending again, held by nobody, its steps from `from_seq` on
        dropped."""
        if from_seq is not None:
            self._conn.execute(self._DELETE_STEPS_FROM, (workflow_id, from_seq))
        self._conn.execute(self._REOPEN, (now, workflow_id))

    def prune(self, cutoff: float, limit: int) -> int:
        """Delete up to `limit` workflows (and, by cascade, their steps) that finished
        before `cutoff`."""
        return int(self._conn.execute(self._PRUNE, (cutoff, limit)).rowcount)

    # Holders: leases, claims, release.

    _RENEW = """
        INSERT INTO owners (id, expires_at) VALUES (?, ?)
        ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"""
    _FORGET_OWNERS = """
        DELETE FROM owners WHERE expires_at < ? AND id NOT IN (
            SELECT owner FROM workflows
            WHERE state IN ('pending', 'running') AND owner IS NOT NULL) AND id NOT IN (
            SELECT owner || '|closed' FROM workflows
            WHERE state IN ('pending', 'running') AND owner IS NOT NULL)"""
    _DELETE_OWNER = "DELETE FROM owners WHERE id = ?"
    # A holder that closed with step threads still running keeps their workflows under
    # its last lease, and says so in a row "<holder>|closed": alive or not, its lease
    # alone decides.
    _ORPHANS = """
        SELECT w.id, w.name, w.owner, o.expires_at >= ?,
               EXISTS (SELECT 1 FROM owners c WHERE c.id = w.owner || '|closed')
        FROM workflows w LEFT JOIN owners o ON o.id = w.owner
        WHERE w.state IN ('pending', 'running') AND (w.owner IS NULL OR w.owner != ?)"""
    # Takes a workflow from the owner seen a moment ago, only if that owner is still its
    # owner and is known dead (first ?) or holds no live lease (second ?: now).
    _CLAIM = """
        UPDATE workflows SET owner = ?, updated_at = ?
        WHERE id = ? AND owner IS ? AND state IN ('pending', 'running')
          AND (? OR owner IS NULL OR NOT EXISTS (
              SELECT 1 FROM owners WHERE owners.id = workflows.owner
                                     AND owners.expires_at >= ?))"""
    _OWNED = """
        SELECT id, name, input FROM workflows
        WHERE owner = ? AND state IN ('pending', 'running')"""
    _OWNED_STEPS = """
        SELECT s.workflow_id, s.seq, s.name, s.state, s.attempts, s.result, s.error,
               s.failures, s.updated_at
        FROM steps s JOIN workflows w ON w.id = s.workflow_id
        WHERE w.owner = ? AND w.state IN ('pending', 'running')"""
    _INPUT = "SELECT id, name, input FROM workflows WHERE id = ?"
    _REPLAY = """
        SELECT workflow_id, seq, name, state, attempts, result, error, failures, updated_at
        FROM steps WHERE workflow_id = ?"""
    _RELEASE = """
        UPDATE workflows SET owner = NULL
        WHERE id = ? AND owner = ? AND state IN ('pending', 'running')"""

    def renew(self, owner: str, lease: float, forget: bool) -> None:
        """Renew `owner`'s lease for `lease` seconds; with `forget`, drop the leases of
        processes gone for ten leases that hold nothing."""
        now = self.clock()
        self._conn.execute(self._RENEW, (owner, now + lease))
        if forget:
            self._conn.execute(self._FORGET_OWNERS, (now - 10 * lease,))

    def orphans(self, owner: str) -> list[tuple[str, str, str | None, bool | None, bool]]:
        """Unfinished workflows not held by `owner`: (id, name, owner, whether its lease
        is alive (None: it has none), whether that owner has closed)."""
        return [(wf_id, name, holder, None if live is None else bool(live), bool(closed))
                for wf_id, name, holder, live, closed
                in self._conn.execute(self._ORPHANS, (self.clock(), owner))]

    def claim(self, owner: str, workflow_id: str, seen: str | None, dead: bool) -> bool:
        """Take a workflow from the holder `seen` a moment ago, if that one still holds
        it and is `dead` or holds no lease alive now."""
        now = self.clock()
        return bool(self._conn.execute(
            self._CLAIM, (owner, now, workflow_id, seen, dead, now)).rowcount)

    def load(self, owner: str, ids: list[str]) -> tuple[list[tuple[str, str, str]],
                                                        list[tuple[Any, ...]]]:
        """The workflows `ids` held by `owner`: (id, name, input) rows, and their step
        rows (id, seq, name, state, attempts, result, error, failures, updated)."""
        with self.snapshot():
            if len(ids) > 64:  # many: two scans beat a query per workflow
                return (self._conn.execute(self._OWNED, (owner,)).fetchall(),
                        self._conn.execute(self._OWNED_STEPS, (owner,)).fetchall())
            workflows, steps = [], []
            for wf_id in ids:
                workflows += self._conn.execute(self._INPUT, (wf_id,)).fetchall()
                steps += self._conn.execute(self._REPLAY, (wf_id,)).fetchall()
            return workflows, steps

    def release(self, owner: str, keep: set[str], lease: float) -> None:
        """Hand back every unfinished workflow `owner` holds, but those in `keep`; its
        lease then ends, or, while it keeps some, runs `lease` seconds more."""
        owned = [row[0] for row in self._conn.execute(self._OWNED, (owner,))]
        self._conn.executemany(self._RELEASE, [(i, owner) for i in owned if i not in keep])
        if keep:
            expires_at = self.clock() + lease
            self._conn.execute(self._RENEW, (owner, expires_at))
            self._conn.execute(self._RENEW, (owner + "|closed", expires_at))
        else:
            self._conn.execute(self._DELETE_OWNER, (owner,))


class _PostgresJournal:
    """A journal in a PostgreSQL database (psycopg 3): one connection and every
    statement durable.py sends it, each inside the one verb that runs it, with the
    same verbs as _SqliteJournal.

    Where it differs: the tables are named durable_* (they share a database with the
    application's own), in the schema the URL's search_path names. Leases are
    measured on the server's clock, so no machine's clock decides a takeover. The
    server runs at READ COMMITTED, so every fence locks the workflow row it reads
    (FOR SHARE, or the UPDATE itself): a takeover committed meanwhile is seen, and one
    not yet committed is waited for. Claims skip rows locked by others (SKIP LOCKED),
    so claimers never wait on each other or on a live holder's write. A lost
    connection is opened again at the next verb; a COMMIT cut off in flight is
    resolved by asking the server what became of the transaction, never assumed."""

    failures: tuple[type[Exception], ...]

    MIGRATIONS: ClassVar[tuple[tuple[str, ...], ...]] = (
        (
            "CREATE TABLE durable_schema (version integer NOT NULL)",
            "INSERT INTO durable_schema (version) VALUES (0)",
            """CREATE TABLE durable_workflows (
                id          text PRIMARY KEY,
                name        text NOT NULL,
                input       text NOT NULL,
                input_hash  text NOT NULL,
                state       text NOT NULL,
                result      text,
                error       text,
                owner       text,
                created_at  double precision NOT NULL,
                updated_at  double precision NOT NULL,
                finished_at double precision
            )""",
            """CREATE INDEX durable_workflows_unfinished ON durable_workflows (state)
                WHERE state IN ('pending', 'running')""",
            """CREATE TABLE durable_steps (
                workflow_id text NOT NULL REFERENCES durable_workflows (id) ON DELETE CASCADE,
                seq         integer NOT NULL,
                name        text NOT NULL,
                state       text NOT NULL,
                attempts    integer NOT NULL,
                result      text,
                error       text,
                failures    text,
                started_at  double precision NOT NULL,
                updated_at  double precision NOT NULL,
                finished_at double precision,
                PRIMARY KEY (workflow_id, seq)
            )""",
            """CREATE TABLE durable_owners (
                id          text PRIMARY KEY,
                expires_at  double precision NOT NULL
            )""",
        ),
        (
            """CREATE TABLE durable_messages (
                workflow_id text NOT NULL REFERENCES durable_workflows (id) ON DELETE CASCADE,
                name        text NOT NULL,
                value       text NOT NULL,
                sent_at     double precision NOT NULL,
                PRIMARY KEY (workflow_id, name)
            )""",
            "ALTER TABLE durable_workflows ADD COLUMN parent text",
            """CREATE INDEX durable_workflows_parent ON durable_workflows (parent)
                WHERE parent IS NOT NULL""",
        ),
    )

    # What to do about a PostgreSQL error, by its SQLSTATE (class or code).
    # https://www.postgresql.org/docs/current/errcodes-appendix.html
    ADVICE: ClassVar[dict[str, str]] = {
        "08": "the server cannot be reached or dropped the connection; check that it runs "
              "and that the URL's host and port are right",
        "28": "the server refused the URL's user or password, or knows no such user",
        "3D000": "the database the URL names does not exist; create it",
        "42501": "the URL's user may not create or write durable.py's tables",
        "53": "the server is out of disk space, memory or connections",
        "55P03": "another connection held a lock longer than busy_timeout",
        "57P": "the server is shutting down or restarting",
        "25P03": "a transaction stayed idle longer than one lease and the server ended it",
    }

    # Migrations take turns under this lock (one per database, held to the commit).
    _MIGRATION_LOCK = _APPLICATION_ID

    def __init__(self, url: str, *, synchronous: str = "FULL", busy_timeout: float = 5.0,
                 create: bool = True, clock: Callable[[], float] | None = None,
                 lease: float = 30.0) -> None:
        """Connect, refuse a database whose journal is newer than this code, and create
        or migrate the tables (with create=False, a database with none is refused).
        `clock` is unused: leases are measured on the server's clock."""
        try:  # by name, here only: durable.py itself needs nothing outside the stdlib
            psycopg: Any = importlib.import_module("psycopg")
        except ImportError:
            raise JournalError(
                'a postgresql:// journal needs psycopg 3: pip install "psycopg[binary]"'
            ) from None
        self._psycopg = psycopg
        self.path = url
        self.failures = (psycopg.Error,)
        self._busy_timeout, self._lease = busy_timeout, lease
        # synchronous_commit on: COMMIT returns once the commit is durable on the server
        # (and on synchronous standbys); off: it may lose the last commits in a crash.
        self._synchronous = "on" if synchronous == "FULL" else "off"
        self._conn: Any = None
        self._inside = False  # in a transaction or snapshot: no statement is tried again
        try:
            self._connect()
            self._migrate(create)
        except psycopg.Error as exc:
            self.close()
            raise self.error(f"cannot use journal {_redacted(url)!r}", exc) from None
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        # A server gone silent (a partition) is noticed within about one lease, not
        # the system's TCP defaults (minutes to hours), unless the URL says otherwise.
        tcp: dict[str, Any] = {"keepalives": 1, "keepalives_idle": max(1, int(self._lease / 3)),
               "keepalives_interval": max(1, int(self._lease / 9)), "keepalives_count": 3,
               "tcp_user_timeout": max(1000, int(self._lease * 1000))}
        conn = self._psycopg.connect(
            self.path, autocommit=True, connect_timeout=max(2, int(self._busy_timeout)),
            **{key: value for key, value in tcp.items() if key not in self.path})
        try:
            # A client stopped inside a transaction (paused, cut off) loses it, and the
            # row locks it held, within one lease, so its workflows can be taken over.
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false),"
                "       set_config('lock_timeout', %s, false),"
                "       set_config('synchronous_commit', %s, false),"
                "       set_config('application_name', %s, false)",
                (str(max(100, int(self._lease * 1000))),
                 str(max(1, int(self._busy_timeout * 1000))), self._synchronous,
                 conn.info.parameter_status("application_name") or "durable.py"))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _live(self) -> Any:
        """The connection, opened again if it was lost."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = None
            conn = self._connect()
        return conn

    def _execute(self, sql: str, params: Sequence[Any] = (), prepare: bool | None = None
                 ) -> Any:
        """Run one statement. Outside a transaction (a read, or BEGIN), one that met a
        connection lost since the last use runs again on a new one; inside, nothing is
        tried again: the transaction is gone with the connection."""
        try:
            return self._live().execute(sql, params, prepare=prepare)
        except self._psycopg.OperationalError:
            if self._inside or self._conn is None or not self._conn.broken:
                raise  # inside a transaction, or the server cannot be reached
        return self._live().execute(sql, params, prepare=prepare)

    def _migrate(self, create: bool) -> None:
        conn = self._conn
        with self.transaction():
            # Processes opening at once wait their turn, however short busy_timeout is.
            conn.execute("SELECT set_config('lock_timeout', '60s', true)")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._MIGRATION_LOCK,))
            if conn.execute("SELECT current_schema()").fetchone()[0] is None and create:
                # The search_path's first schema does not exist yet: make it.
                path = conn.execute("SELECT current_setting('search_path')").fetchone()[0]
                first = _first_in_path(path)
                if first and first != "$user":
                    name = conn.execute("SELECT (parse_ident(%s))[1]", (first,)).fetchone()[0]
                    conn.execute(self._psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                                 .format(self._psycopg.sql.Identifier(name)))
            version = 0
            if conn.execute("SELECT to_regclass('durable_schema')").fetchone()[0] is not None:
                version = int(conn.execute("SELECT version FROM durable_schema").fetchone()[0])
            _check_version(self.path, version, len(self.MIGRATIONS))
            if version == 0 and not create:
                raise _not_written(self.path)
            for statements in self.MIGRATIONS[version:]:
                for sql in statements:
                    conn.execute(sql)
            if version < len(self.MIGRATIONS):
                conn.execute("UPDATE durable_schema SET version = %s", (len(self.MIGRATIONS),))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def deadlocked(self, exc: Exception) -> bool:
        """Whether `exc` rolled back a transaction to end a deadlock (40P01)."""
        return getattr(exc, "sqlstate", None) == "40P01"

    def error(self, what: str, exc: Exception) -> JournalError:
        """A JournalError for `exc`, one of `failures`, with what to do about it."""
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        code = getattr(exc, "sqlstate", None) or ""
        if not code and isinstance(exc, self._psycopg.OperationalError):
            # Refused while connecting: no SQLSTATE reaches the client, only the text.
            code = ("3D000" if "database" in text and "does not exist" in text else
                    "28" if "authentication" in text or "role" in text else
                    "" if "invalid" in text else "08")
        advice = (self.ADVICE.get(code) or self.ADVICE.get(code[:3])
                  or self.ADVICE.get(code[:2]))
        return JournalError(f"{what}: {_redacted(text) if _is_url(text) else text}"
                            + (f" ({advice})" if advice else ""))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The one way into a write transaction. Any exception rolls it back; a COMMIT
        whose answer was lost with the connection is resolved by asking the server."""
        cur = self._execute("BEGIN; SELECT pg_current_xact_id()::text", prepare=False)
        conn, self._inside = self._conn, True
        try:
            cur.nextset()
            xid = cur.fetchone()[0]
            try:
                yield
            except BaseException:
                if not conn.broken:
                    conn.execute("ROLLBACK", prepare=False)
                raise
            try:
                conn.execute("COMMIT", prepare=False)
            except self._psycopg.OperationalError:
                # Unknown (None), or aborted: a failure, and the workflows concerned
                # resume from what the journal holds.
                if not conn.broken or not self._committed(xid):
                    raise
        finally:
            self._inside = False

    def _committed(self, xid: str) -> bool:
        """Whether transaction `xid`, whose COMMIT went unanswered, committed: asked on
        a new connection until the server knows (at most one lease)."""
        deadline, pause = time.monotonic() + max(self._lease, self._busy_timeout), 0.05
        while True:
            try:
                status = self._live().execute(
                    "SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()[0]
            except self._psycopg.OperationalError:
                status = "in progress"  # the server is not back yet
            if status != "in progress" or time.monotonic() > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        if status == "committed":
            _log.info("a commit lost its answer with the connection; the server says it "
                      "committed")
            return True
        if status != "aborted":
            _log.warning("a commit lost its answer with the connection and the server "
                         "could not say within one lease whether it committed; the "
                         "workflows concerned resume from what the journal holds")
        return False

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads that see one state of the journal."""
        self._execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", prepare=False)
        conn, self._inside = self._conn, True
        try:
            yield
        finally:
            self._inside = False
            if not conn.broken:
                conn.execute("COMMIT", prepare=False)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self._execute(sql, params).fetchall())

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._execute(sql, params).rowcount)

    # Workflows: run()'s insert, one at a time or many in two statements.

    _INSERT = """
        INSERT INTO durable_workflows (id, name, input, input_hash, state, owner,
                                       created_at, updated_at)
        VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s)
        ON CONFLICT (id) DO NOTHING"""
    _IDENTITY = "SELECT name, input_hash, state, owner FROM durable_workflows WHERE id = %s"
    _IDENTITIES = """
        SELECT id, name, input_hash, state, owner FROM durable_workflows
        WHERE id = ANY(%s::text[])"""
    # In id order, so that two processes inserting the same ids never deadlock.
    _INSERT_MANY = """
        INSERT INTO durable_workflows (id, name, input, input_hash, state, owner,
                                       created_at, updated_at)
        SELECT i, n, t, h, 'pending', o, %s, %s
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) AS v(i, n, t, h, o)
        ORDER BY i
        ON CONFLICT (id) DO NOTHING RETURNING id"""

    def insert(self, workflow_id: str, name: str, text: str, digest: str, owner: str,
               now: float) -> bool:
        """Record a new pending workflow; False (changing nothing) if the id is taken."""
        return bool(self._count(self._INSERT,
                                (workflow_id, name, text, digest, owner, now, now)))

    def identity(self, workflow_id: str) -> tuple[str, str, str, str | None] | None:
        """(name, input hash, state, owner) of a recorded workflow."""
        row = self._one(self._IDENTITY, (workflow_id,))
        return None if row is None else (row[0], row[1], row[2], row[3])

    def identities(self, ids: list[str]) -> dict[str, tuple[str, str, str, str | None]]:
        return {wf_id: (name, digest, state, owner) for wf_id, name, digest, state, owner
                in self._all(self._IDENTITIES, (ids,))}

    def insert_many(self, rows: list[tuple[str, str, str, str, str]], now: float) -> set[str]:
        """Record new workflows (id, name, input, hash, owner) whose ids were free a
        moment ago; returns the ids another process took meanwhile (not written)."""
        columns = [list(column) for column in zip(*rows, strict=True)]
        written = {row[0] for row in self._all(self._INSERT_MANY, (now, now, *columns))}
        return {row[0] for row in rows} - written

    # Checkpoints: step rows and a workflow's end, fenced on its holder.

    # Every checkpoint of a batch is written by two statements, however many there are
    # (a statement is a round trip to the server; a batch may hold a thousand). The
    # fence locks each workflow's row: the first statement updates the workflows to
    # mark running or finished (the UPDATE locks them), the second locks the others it
    # writes steps for (FOR SHARE). A takeover committed since a statement began is
    # seen, one under way is waited for, and none commits before this transaction.
    # Each workflow is fenced on its own: those no longer held here write nothing.
    _MARK = """
        UPDATE durable_workflows w
        SET state = v.state, result = v.result, error = v.error, updated_at = %s,
            finished_at = v.finished
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::float8[])
             AS v(id, state, result, error, finished)
        WHERE w.id = v.id AND w.owner = %s AND w.state IN ('pending', 'running')
        RETURNING w.id"""
    _STEP_UPSERT = _SqliteJournal._STEP_UPSERT
    _PUT_STEPS = f"""
        WITH fence AS (
            SELECT id FROM durable_workflows
            WHERE id = ANY(%s::text[]) AND owner = %s AND state IN ('pending', 'running')
            FOR SHARE)
        INSERT INTO durable_steps ({_SqliteJournal.STEP_COLUMNS})
        SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[], %s::text[],
                             %s::integer[], %s::text[], %s::text[], %s::text[],
                             %s::float8[], %s::float8[], %s::float8[])
             AS v({_SqliteJournal.STEP_COLUMNS})
        WHERE v.workflow_id IN (SELECT id FROM fence) OR v.workflow_id = ANY(%s::text[])
        {_STEP_UPSERT}
        RETURNING workflow_id"""
    def checkpoint(self, workflow_id: str, owner: str, rows: list[_Row],
                   outcome: _Outcome | None, touch: bool) -> bool:
        """Write step `rows` and the workflow's `outcome` (if any) only if `owner` holds
        the workflow unfinished; `touch` marks it running first. False, writing nothing,
        when it does not hold it."""
        return not self.checkpoints(owner, [(workflow_id, rows, outcome, touch)])

    def checkpoints(self, owner: str, writes: list[tuple[str, list[_Row], _Outcome | None,
                                                          bool]]) -> set[str]:
        """`checkpoint` for each (workflow id, rows, outcome, touch), in order, in two
        statements; returns the ids of the workflows `owner` does not hold (nothing of
        theirs written)."""
        now = time.time()
        marks: dict[str, tuple[str, str | None, str | None, float | None]] = {}
        for workflow_id, _, outcome, touch in writes:
            if outcome is not None:
                marks[workflow_id] = (*outcome, now)
            elif touch and workflow_id not in marks:
                marks[workflow_id] = ("running", None, None, None)
        marked: set[str] = set()
        if marks:
            columns = [list(column) for column in zip(*marks.values(), strict=True)]
            marked = {row[0] for row in self._all(
                self._MARK, (now, list(marks), *columns, owner))}
        rows = _merged([row for _, written, _, _ in writes for row in written])
        wrote: set[str] = set()
        if rows:
            fence = sorted({row[0] for row in rows} - set(marks))
            columns = [list(column) for column in zip(*rows, strict=True)]
            wrote = {row[0] for row in self._all(
                self._PUT_STEPS, (fence, owner, *columns, sorted(marked)))}
        # Refused: a mark that did not match, or rows none of which were written (a
        # workflow with nothing to write is not asked, as on SQLite).
        return {workflow_id for workflow_id in (marks.keys() - marked)} | {
            row[0] for row in rows if row[0] not in marks and row[0] not in wrote}

    # Messages: dur.send's values, and what a waiting receive looks for.

    _SEND = """
        INSERT INTO durable_messages (workflow_id, name, value, sent_at)
        VALUES (%s, %s, %s, %s) ON CONFLICT (workflow_id, name) DO NOTHING"""
    _MESSAGE = "SELECT value FROM durable_messages WHERE workflow_id = %s AND name = %s"
    _MESSAGES_FOR = """
        SELECT m.workflow_id, m.name, m.value
        FROM unnest(%s::text[], %s::text[]) AS w(id, name)
        JOIN durable_messages m ON m.workflow_id = w.id AND m.name = w.name"""

    def send(self, workflow_id: str, name: str, text: str, now: float) -> bool:
        """Record `text` under `name` for the workflow; False if a value is there."""
        return bool(self._count(self._SEND, (workflow_id, name, text, now)))

    def message(self, workflow_id: str, name: str) -> str | None:
        row = self._one(self._MESSAGE, (workflow_id, name))
        return None if row is None else str(row[0])

    def messages_for(self, wanted: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """The values sent under each (workflow id, name) wanted, where there is one."""
        ids, names = [w[0] for w in wanted], [w[1] for w in wanted]
        return [tuple(row) for row in self._all(self._MESSAGES_FOR, (ids, names))]

    # Children (ctx.child).

    _ADOPT = "UPDATE durable_workflows SET parent = %s WHERE id = %s AND parent IS NULL"
    _CHILDREN = """
        SELECT id, state FROM durable_workflows WHERE parent = %s ORDER BY created_at, id"""

    def adopt(self, child: str, parent: str) -> None:
        """Record `parent` as the parent of workflow `child`, unless it has one."""
        self._count(self._ADOPT, (parent, child))

    def children(self, workflow_id: str) -> list[tuple[str, str]]:
        """(id, state) of the workflow's children, oldest first."""
        return [(row[0], row[1]) for row in self._all(self._CHILDREN, (workflow_id,))]

    # Reads of one workflow.

    _OUTCOME = "SELECT state, result, error FROM durable_workflows WHERE id = %s"
    _STATE = "SELECT state, owner FROM durable_workflows WHERE id = %s"
    _STATE_LOCKED = f"{_STATE} FOR UPDATE"
    _WORKFLOW = """
        SELECT w.id, w.name, w.state, w.result, w.error, w.created_at, w.updated_at,
               w.finished_at, w.owner, o.expires_at, w.parent
        FROM durable_workflows w LEFT JOIN durable_owners o ON o.id = w.owner
        WHERE w.id = %s"""
    _STEPS = """
        SELECT seq, name, state, attempts, result, error, failures, started_at, updated_at,
               finished_at
        FROM durable_steps WHERE workflow_id = %s ORDER BY seq"""

    def outcome(self, workflow_id: str) -> _Outcome | None:
        """(state, result, error) of a workflow, None for an unknown id."""
        row = self._one(self._OUTCOME, (workflow_id,))
        return None if row is None else (row[0], row[1], row[2])

    def state(self, workflow_id: str, lock: bool = False) -> tuple[str, str | None] | None:
        """(state, owner) of a workflow, None for an unknown id; with `lock`, in a
        write transaction, no other may change it until this one ends."""
        row = self._one(self._STATE_LOCKED if lock else self._STATE, (workflow_id,))
        return None if row is None else (row[0], row[1])

    def status(self, workflow_id: str) -> tuple[tuple[Any, ...] | None, list[tuple[Any, ...]]]:
        """A workflow's row (id, name, state, result, error, created, updated, finished,
        owner, lease end) and its step rows, from one snapshot."""
        with self.snapshot():
            return self._one(self._WORKFLOW, (workflow_id,)), self._all(self._STEPS,
                                                                        (workflow_id,))

    _LIST = """
        SELECT w.id, w.name, w.state, w.created_at, w.updated_at, w.finished_at,
               (SELECT count(*) FROM durable_steps s WHERE s.workflow_id = w.id)
        FROM durable_workflows w WHERE (%s::text IS NULL OR w.state = %s)
        ORDER BY w.created_at DESC LIMIT %s"""

    def listing(self, state: str | None, limit: int) -> list[tuple[Any, ...]]:
        """Newest first: (id, name, state, created, updated, finished, step count)."""
        return self._all(self._LIST, (state, state, limit))

    # Operating: cancel, retry, prune (in a write transaction).

    _CANCEL = """
        UPDATE durable_workflows SET state = 'cancelled', error = %s, updated_at = %s,
                                     finished_at = %s
        WHERE id = %s AND state IN ('pending', 'running')"""
    _LAST_FAILED = """
        SELECT max(seq) FROM durable_steps WHERE workflow_id = %s AND state = 'failed'"""
    _DELETE_STEPS_FROM = "DELETE FROM durable_steps WHERE workflow_id = %s AND seq >= %s"
    _REOPEN = """
        UPDATE durable_workflows SET state = 'pending', result = NULL, error = NULL,
                                     finished_at = NULL, owner = NULL, updated_at = %s
        WHERE id = %s AND state = 'failed'"""
    # The outer conditions again: a workflow retried meanwhile is seen as it is now.
    _PRUNE = """
        DELETE FROM durable_workflows WHERE id IN (
            SELECT id FROM durable_workflows
            WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < %s LIMIT %s)
          AND state IN ('done', 'failed', 'cancelled') AND finished_at < %s"""

    def cancel(self, workflow_id: str, error: str, now: float) -> bool:
        return bool(self._count(self._CANCEL, (error, now, now, workflow_id)))

    def last_failed_step(self, workflow_id: str) -> int | None:
        seq = self._one(self._LAST_FAILED, (workflow_id,))[0]
        return None if seq is None else int(seq)

    def reopen(self, workflow_id: str, from_seq: int | None, now: float) -> None:
        """A failed workflow pending again, held by nobody, its steps from `from_seq` on
        dropped."""
        if from_seq is not None:
            self._count(self._DELETE_STEPS_FROM, (workflow_id, from_seq))
        self._count(self._REOPEN, (now, workflow_id))

    def prune(self, cutoff: float, limit: int) -> int:
        """Delete up to `limit` workflows (and, by cascade, their steps) that finished
        before `cutoff`."""
        return self._count(self._PRUNE, (cutoff, limit, cutoff))

    # Holders: leases (on the server's clock), claims, release.

    _NOW = "extract(epoch FROM clock_timestamp())::float8"
    _RENEW = f"""
        INSERT INTO durable_owners (id, expires_at) VALUES (%s, {_NOW} + %s)
        ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"""
    _FORGET_OWNERS = f"""
        DELETE FROM durable_owners WHERE expires_at < {_NOW} - %s AND id NOT IN (
            SELECT owner FROM durable_workflows
            WHERE state IN ('pending', 'running') AND owner IS NOT NULL) AND id NOT IN (
            SELECT owner || '|closed' FROM durable_workflows
            WHERE state IN ('pending', 'running') AND owner IS NOT NULL)"""
    _DELETE_OWNER = "DELETE FROM durable_owners WHERE id = %s"
    _ORPHANS = f"""
        SELECT w.id, w.name, w.owner, o.expires_at >= {_NOW},
               EXISTS (SELECT 1 FROM durable_owners c WHERE c.id = w.owner || '|closed')
        FROM durable_workflows w LEFT JOIN durable_owners o ON o.id = w.owner
        WHERE w.state IN ('pending', 'running') AND (w.owner IS NULL OR w.owner != %s)"""
    # As on SQLite, and a row another transaction has locked (a live holder's fenced
    # write, another claimer) is skipped, not waited for: the next round sees it.
    _CLAIM = f"""
        UPDATE durable_workflows SET owner = %s, updated_at = %s
        WHERE id = (
            SELECT w.id FROM durable_workflows w
            WHERE w.id = %s AND w.owner IS NOT DISTINCT FROM %s
              AND w.state IN ('pending', 'running')
              AND (%s OR w.owner IS NULL OR NOT EXISTS (
                  SELECT 1 FROM durable_owners o WHERE o.id = w.owner
                                                  AND o.expires_at >= {_NOW}))
            FOR UPDATE SKIP LOCKED)"""
    _OWNED = """
        SELECT id, name, input FROM durable_workflows
        WHERE owner = %s AND state IN ('pending', 'running')"""
    _OWNED_STEPS = """
        SELECT s.workflow_id, s.seq, s.name, s.state, s.attempts, s.result, s.error,
               s.failures, s.updated_at
        FROM durable_steps s JOIN durable_workflows w ON w.id = s.workflow_id
        WHERE w.owner = %s AND w.state IN ('pending', 'running')"""
    _INPUT = "SELECT id, name, input FROM durable_workflows WHERE id = ANY(%s::text[])"
    _REPLAY = """
        SELECT workflow_id, seq, name, state, attempts, result, error, failures, updated_at
        FROM durable_steps WHERE workflow_id = ANY(%s::text[])"""
    _RELEASE = """
        UPDATE durable_workflows SET owner = NULL
        WHERE owner = %s AND state IN ('pending', 'running') AND NOT (id = ANY(%s::text[]))"""

    def renew(self, owner: str, lease: float, forget: bool) -> None:
        """Renew `owner`'s lease for `lease` seconds; with `forget`, drop the leases of
        processes gone for ten leases that hold nothing."""
        self._count(self._RENEW, (owner, lease))
        if forget:
            self._count(self._FORGET_OWNERS, (10 * lease,))

    def orphans(self, owner: str) -> list[tuple[str, str, str | None, bool | None, bool]]:
        """Unfinished workflows not held by `owner`: (id, name, owner, whether its lease
        is alive (None: it has none), whether that owner has closed)."""
        return [tuple(row) for row in self._all(self._ORPHANS, (owner,))]

    def claim(self, owner: str, workflow_id: str, seen: str | None, dead: bool) -> bool:
        """Take a workflow from the holder `seen` a moment ago, if that one still holds
        it and is `dead` or holds no lease alive now."""
        return bool(self._count(self._CLAIM, (owner, time.time(), workflow_id, seen, dead)))

    def load(self, owner: str, ids: list[str]) -> tuple[list[tuple[str, str, str]],
                                                        list[tuple[Any, ...]]]:
        """The workflows `ids` held by `owner`: (id, name, input) rows, and their step
        rows (id, seq, name, state, attempts, result, error, failures, updated)."""
        with self.snapshot():
            if len(ids) > 64:
                return (self._all(self._OWNED, (owner,)),
                        self._all(self._OWNED_STEPS, (owner,)))
            return self._all(self._INPUT, (ids,)), self._all(self._REPLAY, (ids,))

    def release(self, owner: str, keep: set[str], lease: float) -> None:
        """Hand back every unfinished workflow `owner` holds, but those in `keep`; its
        lease then ends, or, while it keeps some, runs `lease` seconds more."""
        self._count(self._RELEASE, (owner, sorted(keep)))
        if keep:
            self._count(self._RENEW, (owner, lease))
            self._count(self._RENEW, (owner + "|closed", lease))
        else:
            self._count(self._DELETE_OWNER, (owner,))


def _first_in_path(search_path: str) -> str:
    """The first entry of a PostgreSQL search_path, as written (quoted or not)."""
    quoted = False
    for i, char in enumerate(search_path):
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            return search_path[:i].strip()
    return search_path.strip()


def _merged(rows: list[_Row]) -> list[_Row]:
    """Step rows with one row per step: its last, with its first row's name and start,
    as upserts one after another leave it (a statement may not write a row twice)."""
    merged: dict[tuple[str, int], _Row] = {}
    for row in rows:
        first = merged.get((row[0], row[1]))
        merged[row[0], row[1]] = row if first is None else (
            *row[:2], first[2], *row[3:8], first[8], *row[9:])
    return list(merged.values()) if len(merged) < len(rows) else rows


_Journal = _SqliteJournal | _PostgresJournal


def _open_journal(target: str, **options: Any) -> _Journal:
    """The store `target` names: a postgresql:// URL, or else an SQLite file."""
    return (_PostgresJournal if _is_url(target) else _SqliteJournal)(target, **options)


# OPERATIONS: the rules around the store's verbs, used by Durable and the command line.


def _why_fenced(journal: _Journal, workflow_id: str) -> _Fenced:
    row = journal.state(workflow_id)
    if row is None:
        return _Fenced(workflow_id, "it was pruned from the journal")
    if row[0] == "cancelled":
        return _Fenced(workflow_id, "it was cancelled", logging.INFO)
    if row[0] in _FINISHED:
        return _Fenced(workflow_id, f"it is {row[0]} already")
    return _Fenced(workflow_id, "another process took it over (this one was paused, stuck "
                                "or cut off past its lease)")


def _read_status(journal: _Journal, workflow_id: str) -> Status:
    row, steps = journal.status(workflow_id)
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    wf_id, name, state, result, error, created, updated, finished, owner, expires, parent = row
    return Status(
        wf_id, name, state, _loads(result, wf_id), _loads(error, wf_id), created, updated,
        finished,
        tuple(StepRecord(seq, step, st, attempts, _loads(res, wf_id), _loads(err, wf_id),
                         tuple(_loads(fails, wf_id) or ()), started, step_updated,
                         step_finished)
              for seq, step, st, attempts, res, err, fails, started, step_updated,
              step_finished in steps),
        owner, expires, parent, tuple(child for child, _ in journal.children(wf_id)),
    )


def _cancel(journal: _Journal, workflow_id: str) -> list[str]:
    """In a write transaction: cancel the workflow and its unfinished children, theirs
    and so on; the ids cancelled, none if it had finished already."""
    row = journal.state(workflow_id, lock=True)
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    if row[0] in _FINISHED:
        return []
    error = _dumps({"type": "WorkflowCancelled", "message": "cancelled by request"})
    if not journal.cancel(workflow_id, error, time.time()):
        return []
    cancelled, parents = [workflow_id], [workflow_id]
    while parents:  # a work list, not recursion: a chain of children may be long
        for child, state in journal.children(parents.pop()):
            if state in _UNFINISHED and journal.cancel(child, error, time.time()):
                cancelled.append(child)
                parents.append(child)
    return cancelled


def _send(journal: _Journal, workflow_id: str, name: str, text: str) -> bool:
    """In a write transaction: record `text` (JSON) under `name` for the workflow.
    False when that very value is there already (a retried webhook); another value
    there raises IdempotencyConflict; a finished workflow, InvalidInput."""
    row = journal.state(workflow_id, lock=True)
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    if row[0] in _FINISHED:
        raise InvalidInput(f"workflow {workflow_id!r} is {row[0]}; nothing can be sent to "
                           "it any more")
    if journal.send(workflow_id, name, text, time.time()):
        return True
    known = journal.message(workflow_id, name)
    if known is not None and _dumps(_loads(known, workflow_id), canonical=True) \
            == _dumps(_loads(text), canonical=True):  # the same JSON: 1 is not true
        return False
    raise IdempotencyConflict(
        f"workflow {workflow_id!r} already has another value under {name!r} (one value "
        f"per name): {known}")


def _retry(journal: _Journal, workflow_id: str) -> int:
    """In a write transaction: put a failed workflow back to run, from its last failed
    step (dropped from the journal with the steps after it: fresh attempts). Returns
    that step's position, or 0 when no step failed (it replays from the top). The
    steps before it are not run again, so a workflow that compensated them (released
    what it reserved) must be started anew under a new id instead."""
    row = journal.state(workflow_id, lock=True)
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id!r}")
    if row[0] != "failed":
        raise InvalidInput(f"workflow {workflow_id!r} is {row[0]}; only a failed workflow "
                           "can be retried")
    seq = journal.last_failed_step(workflow_id)
    journal.reopen(workflow_id, seq, time.time())
    return seq or 0


def _prune(journal: _Journal, cutoff: float, limit: int) -> int:
    """In a write transaction: delete up to `limit` workflows finished before `cutoff`.
    Unfinished workflows are never touched."""
    return journal.prune(cutoff, limit)


# GROUP COMMIT: the writer thread, and the writes it commits.


_Op = Callable[[_Journal], Any]


class _Writer:
    """The journal's write connection, and the thread that commits for the event loop.

    Coroutines queue operations; the writer thread takes every operation waiting and
    commits them in one transaction, so they share one fsync (group commit). A step
    thread may commit its own checkpoint in place (`commit_here`) when no batch is
    being committed, taking whatever else is queued along; when one is, it queues and
    waits like everyone else. That is the one rule for who commits: the writer
    thread, or a thread that finds it idle. An operation may refuse (raise) only
    before it writes anything: its caller gets the exception and the others stand. A
    failure of the journal fails the whole batch, rolled back, and every caller in it
    gets a JournalError. Each caller resumes only after its commit returned.
    """

    def __init__(self, journal: _Journal, loop: asyncio.AbstractEventLoop) -> None:
        self.journal = journal
        self._loop = loop
        # Writes wait here in order, and leave only under _lock, in that order: so one
        # workflow's writes commit in the order it queued them, whoever commits them.
        self._queue: collections.deque[tuple[_Op, _Target | None] | None] = \
            collections.deque()
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
        journal = self.journal
        try:
            try:
                return self._try(ops)
            except journal.failures as exc:
                if not journal.deadlocked(exc):
                    raise
                # Rolled back whole, as a deadlock's victim (PostgreSQL: two batches
                # locking rows in other orders, a cancel of a workflow another holds).
                return self._try(ops)
        except journal.failures as exc:  # nothing of the batch was committed
            error = journal.error("journal write failed", exc)
            for op in ops:
                if isinstance(op, _Checkpoint):  # before any later write of its workflow
                    op.failed(error)
            return [(False, error)] * len(ops)

    def _together(self, write: Callable[[_Journal, list[Any]], list[tuple[bool, Any]]],
             ops: list[Any]) -> list[tuple[bool, Any]]:
        """`write(journal, ops)`: several writes of one kind together."""
        try:
            return write(self.journal, ops)
        except self.journal.failures:
            raise  # the journal failed: the whole batch is rolled back
        except Exception as exc:  # refused before writing
            return [(False, exc)] * len(ops)

    def _try(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        """One attempt at committing `ops` in one transaction."""
        journal = self.journal
        outcomes: list[tuple[bool, Any]] = []
        with journal.transaction():
            # run()'s inserts go first, all together: two statements for any number;
            # the checkpoints all together too, where the first of them stands.
            inserts = [op for op in ops if type(op) is _Insert]  # a child's: on its own
            checkpoints = [op for op in ops if isinstance(op, _Checkpoint)]
            together: dict[int, tuple[bool, Any]] = {}
            if len(inserts) > 1:
                together.update(zip(map(id, inserts), self._together(_Insert.all, inserts),
                                    strict=True))
            for op in ops:
                if len(checkpoints) > 1 and op is checkpoints[0]:
                    together.update(zip(map(id, checkpoints),
                                        self._together(_Checkpoint.all, checkpoints), strict=True))
                if id(op) in together:
                    outcomes.append(together.pop(id(op)))
                    continue
                try:
                    outcomes.append((True, op(journal)))
                except journal.failures:
                    raise  # the journal failed: the whole batch is rolled back
                except (Exception, _Interrupted) as exc:
                    # An op refuses (conflict, fenced, not found) before it writes,
                    # so the others in the batch stand.
                    outcomes.append((False, exc))
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

    def __call__(self, journal: _Journal) -> tuple[bool, str, str | None]:
        if journal.insert(self.id, self.name, self.text, self.digest, self.owner, time.time()):
            return True, "pending", self.owner
        known = journal.identity(self.id)
        assert known is not None  # the insert found it, in this transaction
        return self.known(*known)

    def known(self, name: str, digest: str, state: str,
              owner: str | None) -> tuple[bool, str, str | None]:
        """The answer for the workflow recorded under this id: (False, state, owner),
        or IdempotencyConflict."""
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
    def all(journal: _Journal, inserts: list[_Insert]) -> list[tuple[bool, Any]]:
        """Write `inserts` as if one after another; (ok, result or refusal) for each."""
        known = journal.identities(list(dict.fromkeys(insert.id for insert in inserts)))
        outcomes: list[tuple[bool, Any]] = []
        new: list[tuple[str, str, str, str, str]] = []
        for insert in inserts:
            if insert.id in known:
                try:
                    outcomes.append((True, insert.known(*known[insert.id])))
                except IdempotencyConflict as exc:
                    outcomes.append((False, exc))
            else:
                known[insert.id] = (insert.name, insert.digest, "pending", insert.owner)
                new.append((insert.id, insert.name, insert.text, insert.digest, insert.owner))
                outcomes.append((True, (True, "pending", insert.owner)))
        taken = journal.insert_many(new, time.time()) if new else set()
        if taken:  # by another process since `known` was read (PostgreSQL)
            known = journal.identities(sorted(taken))
            for i, insert in enumerate(inserts):
                if insert.id in taken and outcomes[i] == (True, (True, "pending", insert.owner)):
                    try:
                        outcomes[i] = (True, insert.known(*known[insert.id]))
                    except IdempotencyConflict as exc:
                        outcomes[i] = (False, exc)
        return outcomes


class _ChildInsert(_Insert):
    """ctx.child's write: run()'s, and the child's parent recorded with it."""

    __slots__ = ("parent",)

    def __init__(self, workflow_id: str, name: str, text: str, digest: str, owner: str,
                 parent: str) -> None:
        super().__init__(workflow_id, name, text, digest, owner)
        self.parent = parent

    def __call__(self, journal: _Journal) -> tuple[bool, str, str | None]:
        answer = super().__call__(journal)
        if answer[0]:  # made here: a workflow that existed before is no child of this one
            journal.adopt(self.id, self.parent)
        return answer


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


# STEP THREADS: the pool that runs sync steps.


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
                    done = item[4]
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
                        value = _Handback(raised=exc)
            with self._lock:
                self._busy -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(done, ok, value)
        self._queue.put(None)  # let the next worker see the end too


class _BeginFailed(Exception):
    """A step's checkpoint failed in its step thread; the step did not run."""


class _Checkpoint:
    """A workflow's next write: the step rows deferred so far and `rows`, and, if given,
    its `outcome`, fenced on this process holding it unfinished; the first one marks
    it running too. Made when queued (it takes the deferred rows). Once a batch
    holding one of a workflow's writes failed, its later writes refuse: no checkpoint
    of a workflow commits after an earlier one of it was lost."""

    __slots__ = ("outcome", "rows", "run", "touch")

    def __init__(self, run: _Run, rows: list[_Row], outcome: _Outcome | None = None) -> None:
        self.run, self.rows, self.outcome = run, run.pending + rows, outcome
        self.touch, run.pending, run.touched = not run.touched, [], True

    def __call__(self, journal: _Journal) -> None:
        run = self.run
        if run.lost is not None:
            raise _Interrupted(run.lost)
        if not journal.checkpoint(run.id, run.owner, self.rows, self.outcome, self.touch):
            raise _why_fenced(journal, run.id)

    def failed(self, error: JournalError) -> None:
        """In the writer thread, as the batch holding this write is rolled back."""
        if self.run.lost is None:
            self.run.lost = error

    @staticmethod
    def all(journal: _Journal, checkpoints: list[_Checkpoint]) -> list[tuple[bool, Any]]:
        """Write `checkpoints` as if one after another (a store that groups them);
        (ok, None or refusal) for each."""
        live = [c for c in checkpoints if c.run.lost is None]
        refused: set[str] = set()
        for owner in dict.fromkeys(c.run.owner for c in live):
            refused |= journal.checkpoints(owner, [(c.run.id, c.rows, c.outcome, c.touch)
                                                   for c in live if c.run.owner == owner])
        return [(False, _Interrupted(c.run.lost)) if c.run.lost is not None
                else (False, _why_fenced(journal, c.run.id)) if c.run.id in refused
                else (True, None) for c in checkpoints]


# A WORKFLOW HERE: one object per workflow running in this process.


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a failure here is seen again by the workflow's next write


class _Run:
    """Everything this process knows of one workflow it runs.

    Who changes what, and when:
    - never, once made: durable, workflow, id, owner, retry, text, vars (it holds no
      reference to its Context or its calls, so a finished run is freed at once, not by
      the cyclic garbage collector);
    - the workflow's code, wherever it runs (on the event loop, or in a step thread
      going on with it while the loop waits for that thread: one place at a time):
      journal, seq, pending, touched;
    - the event loop only: gen (a step thread reads it), task, inflight, flush_due,
      naps (the futures its sleeps, receives and child waits wait on: several at once
      in a ctx.all), waiters, outcome, steps_due, threads, expecting (name -> the nap
      of a receive waiting for it), mail (name -> the value sent under it, handed over
      by send or the poll) and fanout (ctx.all calls under way);
    - stop: the loop (cancel, close, a fence seen by the maintenance tick) or the
      workflow's code (a write failed, the code no longer matches its journal);
      read anywhere;
    - lost: the writer thread, when a batch holding one of its writes failed, before
      it commits anything later; read by the writer and the workflow's code;
    - new: the step thread that commits run()'s insert (Durable._run_at_once).
    """

    __slots__ = ("durable", "expecting", "fanout", "flush_due", "gen", "id", "inflight",
                 "journal",
                 "lost", "mail", "naps", "new", "outcome", "owner", "pending", "retry",
                 "seq", "steps_due", "stop", "task", "text", "threads", "touched", "vars",
                 "waiters", "workflow")

    def __init__(self, durable: Durable, workflow: _Workflow, workflow_id: str, text: str,
                 journal: dict[int, _JournaledStep]) -> None:
        self.durable = durable
        self.workflow = workflow
        self.id = workflow_id
        self.owner = durable._owner
        self.retry = workflow.retry or durable._default_retry
        self.text = text  # its input, as journaled
        # A generator workflow's code runs in this one context wherever it runs (on the
        # loop, in a step thread), one place at a time: what it sets, and the tokens to
        # reset it, stay valid throughout. A copy of the context it was started from.
        self.vars = contextvars.copy_context()
        self.journal = journal  # steps recorded before this (re)start, consumed by replay
        self.seq = 0
        self.pending: list[_Row] = []  # finished steps, written with the next checkpoint
        self.touched = False  # whether a checkpoint has marked the workflow running yet
        self.gen: Generator[Any, Any, Any] | None = None  # a generator workflow's, in _drive
        self.task: asyncio.Task[_Outcome | None] | None = None
        self.inflight: list[asyncio.Future[Any]] = []  # deferred writes already queued
        self.flush_due = False
        self.naps: set[asyncio.Future[None]] = set()
        self.expecting: dict[str, set[asyncio.Future[None]]] = {}
        self.mail: dict[str, str] = {}
        self.fanout = 0  # ctx.all calls under way: their calls run side by side
        self.waiters: list[asyncio.Future[None]] = []  # result() calls waiting here
        self.outcome: _Outcome | None = None  # committed when the workflow ended here
        self.steps_due = 0  # step threads' outcomes awaited (close() lets them arrive)
        self.threads = 0  # its sync steps in threads, until they return (even if stopped)
        self.stop: BaseException | None = None
        self.lost: JournalError | None = None
        self.new = True  # False while run()'s insert has not said the workflow is new

    @property
    def fenced(self) -> bool:
        return isinstance(self.stop, _Fenced)

    def halt(self, reason: BaseException) -> None:
        """Stop the workflow at its next step, checkpoint or wake-up (cancel, close, or
        a call that no longer matches the journal: its siblings in a ctx.all stop)."""
        self.stop = reason
        for future in (*self.naps, *self.waiters):
            _wake(future)

    def ended(self, outcome: _Outcome | None) -> _Outcome | None:
        """The workflow's task ends with `outcome` committed (None: unfinished): hand
        it to the result() calls waiting, which need neither the task nor the journal."""
        self.outcome = outcome
        for future in self.waiters:
            _wake(future)
        return outcome

    async def nap(self, seconds: float, expecting: str | None = None,
                  until: asyncio.Future[Any] | None = None) -> None:
        """Sleep, unless the workflow is stopped first; with `expecting`, until a value
        is sent under that name too; with `until`, until it is done too."""
        if seconds > 0 and self.stop is None and not self.durable._closing:
            loop = asyncio.get_running_loop()
            napping: asyncio.Future[None] = loop.create_future()
            self.naps.add(napping)
            if expecting is not None:
                self.expecting.setdefault(expecting, set()).add(napping)
            timer = loop.call_later(seconds, _wake, napping)
            if until is not None:
                until.add_done_callback(lambda _: _wake(napping))
            try:
                await napping
            finally:
                timer.cancel()
                self.naps.discard(napping)
                if expecting is not None:
                    self.expecting[expecting].discard(napping)
                    if not self.expecting[expecting]:
                        del self.expecting[expecting]
        if self.stop is not None:  # whatever stopped it: a waiting loop must not spin
            raise self.stop
        if self.durable._closing:
            self.check_writable()

    def check_writable(self) -> None:
        if isinstance(self.stop, _Interrupted):
            raise self.stop
        if self.lost is not None:
            self.write_failed(self.lost)
        if self.durable._closing:
            self.halt(_Interrupted("the journal is closing"))
            raise self.stop  # type: ignore[misc]

    def stop_if_closing(self, row: _Row) -> None:
        """While closing (which waited for this step), keep the step's `row` for
        record_pending to commit, and stop the workflow here."""
        if self.durable._closing:
            self.pending.append(row)
            self.check_writable()

    def write_failed(self, exc: BaseException) -> NoReturn:
        if not isinstance(self.stop, _Interrupted):  # a stop (cancel, close) says why
            self.stop = exc if isinstance(exc, _Interrupted) else _Interrupted(exc)
        raise self.stop from None

    async def write(self, rows: list[_Row], outcome: _Outcome | None = None) -> None:
        """Commit step `rows` (after any deferred ones) and the workflow's `outcome`, if
        this process still holds the workflow; otherwise stop it with _Interrupted."""
        self.check_writable()
        future = self.durable._open_writer().submit(_Checkpoint(self, rows, outcome))
        future.add_done_callback(_retrieve)
        inflight, self.inflight = self.inflight, []
        try:
            for earlier in inflight:  # committed no later than `future`, in queue order
                await earlier
            await future
        except (DurableError, _Interrupted) as exc:
            self.write_failed(exc)

    async def record_pending(self) -> None:
        """Commit the finished steps not yet written, fenced, even while closing: a step
        that returned is not to run again at the next start."""
        if self.pending and not self.fenced:
            with contextlib.suppress(DurableError, _Interrupted):
                await self.durable._open_writer().submit(_Checkpoint(self, []))

    def defer(self, row: _Row) -> None:
        """Write a finished step's row with the next checkpoint: the next step cannot
        start before it is durable."""
        self.pending.append(row)
        if not self.flush_due:
            self.flush_due = True
            # Runs only if the workflow awaits something other than a step first.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_due = False
        # Not while a step thread may be going on with the workflow: the rows deferred
        # here went with that step's checkpoint, and what is pending now is the thread's.
        if self.pending and self.stop is None and (
                self.fanout or not (self.gen is not None and self.steps_due)):
            future = self.durable._open_writer().submit(_Checkpoint(self, []))
            future.add_done_callback(_retrieve)
            self.inflight.append(future)


# STEP MACHINE: the rules of a step and of a workflow's end, written once. Plain
# functions: no await, no thread of their own; both drivers below call them.


class _Step:
    """One step call of a workflow, from its place in the journal to its verdict."""

    __slots__ = ("attempt", "call", "error", "failures", "history", "policy", "run", "seq",
                 "start")

    def __init__(self, run: _Run, call: _StepCall, seq: int) -> None:
        self.run, self.call, self.seq = run, call, seq
        self.policy = call.retry or run.retry
        self.attempt = 0  # attempts begun so far, in this life and earlier ones
        self.failures: list[dict[str, Any]] = []  # failed attempts: attempt, times, error
        self.error: dict[str, Any] = {}  # the last failed attempt's
        self.start = 0.0  # when the current attempt began
        self.history: str | None = None  # `failures` as journaled by the current attempt


class _Replayed:
    """A step call answered from the journal: its recorded result, or StepFailed."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: StepFailed | None = None) -> None:
        self.value, self.error = value, error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


_Verdict = tuple[Literal["done", "retry", "failed"], _Row, Any]


def _next(run: _Run, call: _StepCall | _SleepCall | _ReceiveCall | _ChildCall
          ) -> tuple[int, _JournaledStep | None]:
    """The call's position, and its record from before this (re)start, if any."""
    if call.run is not run:
        raise InvalidInput("a step made by another workflow's ctx was awaited here")
    if run.stop is not None:
        raise run.stop
    if run.durable._closing:
        run.stop = _Interrupted("the journal is closing")
        raise run.stop
    if call.place is None:
        run.seq += 1
        call.place = run.seq
    seq = call.place
    recorded = run.journal.pop(seq, None)
    if recorded is not None and recorded.name != call.name:
        changed = NonDeterminismError(
            f"workflow {run.id!r} step {seq} is {call.name!r} in the code but "
            f"{recorded.name!r} in the journal: the code changed under a running "
            "workflow. Deploy new steps under a new workflow name, or let in-flight "
            "workflows finish first."
        )
        run.halt(changed)  # siblings waiting in a ctx.all stop too
        raise changed
    return seq, recorded


def _open_step(run: _Run, call: _StepCall) -> _Step | _Replayed:
    """Replay: a finished step's recorded outcome, or the step to run (on from the
    attempts an earlier life began)."""
    seq, recorded = _next(run, call)
    step = _Step(run, call, seq)
    if recorded is None:
        return step
    if recorded.state == "done":
        return _Replayed(_loads(recorded.result, run.id))
    if recorded.state == "failed":
        err = _loads(recorded.error, run.id) or {}
        return _Replayed(error=StepFailed(call.name, err.get("type", "Error"),
                                          err.get("message", ""), recorded.attempts))
    step.attempt, step.failures = recorded.attempts, _loads(recorded.failures, run.id) or []
    if not step.failures or step.failures[-1]["attempt"] != step.attempt:
        # The process stopped during that attempt (else its failure is recorded: the
        # journal closed before the next attempt began).
        step.failures.append({"attempt": step.attempt, "started_at": recorded.updated_at,
                              "finished_at": None, "error": {
                                  "type": "Interrupted",
                                  "message": "the process stopped during this attempt"}})
    step.error = step.failures[-1]["error"]
    return step


def _begin(step: _Step) -> _Row | None:
    """The begin row of the step's next attempt; None when it is out of attempts."""
    if step.attempt >= step.policy.max_attempts:
        return None
    step.attempt += 1
    step.start = time.time()
    step.history = _dumps(step.failures) if step.failures else None
    return (step.run.id, step.seq, step.call.name, "running", step.attempt, None, None,
            step.history, step.start, step.start, None)


def _done(step: _Step, text: str) -> tuple[_Row, Any]:
    """The done row of the attempt that returned `text` (JSON), and the value the
    workflow gets: the result as the journal gives it back."""
    now = time.time()
    return ((step.run.id, step.seq, step.call.name, "done", step.attempt, text, None,
             step.history, step.start, now, now), _loads(text))


def _step_error(exc: BaseException) -> BaseException:
    """What a step's exception is to its workflow: the exception itself, or a
    RuntimeError for one that a future or the retry loop cannot carry: StopIteration,
    or a BaseException such as CancelledError raised by the step's own code, which
    would otherwise pass for a cancellation of the workflow."""
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        return exc
    return RuntimeError(f"the step raised {exc!r}")


def _verdict(step: _Step, ok: bool, value: Any) -> _Verdict:
    """What the outcome of an attempt means: ("done", row, result), ("retry", row,
    delay) with the failed attempt's row, or ("failed", row, StepFailed)."""
    permanent = False
    if ok:
        try:
            text = _dumps(value)
        except (TypeError, ValueError) as exc:
            step.error, permanent = {"type": "TypeError", "message":
                                     f"the step returned a value that is not JSON: {exc}"}, True
        else:
            if isinstance(step.run.stop, _Interrupted):  # stopped meanwhile: not recorded
                raise step.run.stop
            row, result = _done(step, text)
            return "done", row, result
    else:
        cause = _step_error(value)
        step.error, permanent = _error_of(cause), isinstance(cause, Permanent)
    step.failures.append({"attempt": step.attempt, "started_at": step.start,
                          "finished_at": time.time(), "error": step.error})
    if permanent or step.attempt >= step.policy.max_attempts:
        return _failed(step)
    run, now = step.run, time.time()
    return "retry", (run.id, step.seq, step.call.name, "running", step.attempt, None, None,
                     _dumps(step.failures), step.start, now, None), \
        step.policy.delay(step.attempt)


def _failed(step: _Step) -> _Verdict:
    now, error = time.time(), step.error
    return "failed", (step.run.id, step.seq, step.call.name, "failed", step.attempt, None,
                      _dumps(error), _dumps(step.failures), now, now, now), \
        StepFailed(step.call.name, error.get("type", "Error"), error.get("message", ""),
                   step.attempt)


def _ending(run: _Run, value: Any) -> _Outcome:
    """The outcome of a workflow that returned `value`; raises if it cannot be done."""
    if run.stop is not None:
        raise run.stop
    if run.journal:
        seq = min(run.journal)
        raise NonDeterminismError(
            f"workflow {run.id!r} ended after {run.seq} step(s), but the journal has step "
            f"{seq} {run.journal[seq].name!r}: the code changed under a running workflow")
    try:
        return "done", _dumps(value), None
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the workflow returned a value that is not JSON: {exc}") from None


def _failure(run: _Run, exc: Exception) -> _Outcome:
    """The outcome of a workflow that raised `exc`. A NonDeterminismError wins even
    when the workflow's code caught it."""
    error = _error_of(run.stop if isinstance(run.stop, Exception) else exc)
    _log.error("workflow %r failed: %s: %s", run.id, error["type"], error["message"])
    return "failed", None, _dumps(error)


# DRIVERS: the event loop's (async) and a step thread's (blocking). Both call the
# step machine; they differ in how they wait.


_NOTHING: Any = object()  # no value: a handback that is not a return
_NOT_STARTED = object()  # _drive's answer for a workflow run() did not start here


class _Handback:
    """What a step thread hands back to the loop after going on with a generator
    workflow: it yielded a `call` the thread did not begin; or the thread began
    `step` and its attempt ended (ok, value) short of a done row (failed, not JSON,
    awaitable, stopped); or the workflow `returned` (not committed), `raised`, or the
    thread committed its end (`finished`); or a checkpoint failed (`write_error`)."""

    __slots__ = ("call", "finished", "ok", "raised", "returned", "step", "value",
                 "write_error")

    def __init__(self, *, call: _Call | None = None, step: _Step | None = None,
                 ok: bool = True, value: Any = None, returned: Any = _NOTHING,
                 raised: BaseException | None = None, finished: _Outcome | None = None,
                 write_error: BaseException | None = None) -> None:
        self.call, self.step, self.ok, self.value = call, step, ok, value
        self.returned, self.raised, self.finished = returned, raised, finished
        self.write_error = write_error


class _Committed:
    """_drive's answer when a step thread committed the workflow's end itself."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: _Outcome) -> None:
        self.outcome = outcome


def _begins_here(run: _Run, call: object) -> bool:
    """Whether a step thread may begin `call` itself: a fresh sync step of this
    workflow, which is not stopped."""
    return (isinstance(call, _StepCall) and call.run is run and not call.is_async
            and run.stop is None and not run.journal)


def _close_if_abandoned(run: _Run, gen: Generator[Any, Any, Any]) -> None:
    """In a step thread, after running the generator: if `_drive` ended meanwhile
    (it could not close the generator while this thread ran it), close it here, in its
    context, so that its `finally` runs as it would have there."""
    if run.gen is None:
        with contextlib.suppress(RuntimeError, ValueError):
            run.vars.run(gen.close)


def _go_on(run: _Run, step: _Step | None, value: Any, stopped: Callable[[], bool]) -> Any:
    """The step thread's driver. After `step` of a generator workflow returned `value`
    in this thread (or, step None, when the workflow starts here): go on with the
    workflow here while its next calls are fresh sync steps, committing each
    checkpoint from this thread, so that the loop is not needed between one step and
    the next. Returns `value` untouched if it did not go on, else a _Handback."""
    gen = run.gen
    if gen is None or run.durable._writer is None:  # ended or closed meanwhile
        return value if step is not None else None
    went_on = step is None
    while True:
        send = None
        if step is not None:
            done, send = _done_here(run, step, value, stopped)
            if not done:
                return _Handback(step=step, value=value) if went_on else value
        went_on = True
        try:
            call = run.vars.run(gen.send, send)
        except StopIteration as stop:
            return _finish_here(run, stop.value, stopped)
        except BaseException as exc:
            return _Handback(raised=exc)
        finally:
            _close_if_abandoned(run, gen)
        if not _begins_here(run, call) or stopped():
            return _Handback(call=call)
        assert isinstance(call, _StepCall)
        began = _begin_here(run, call)
        if isinstance(began, _Handback):
            return began
        step = began
        try:
            value = run.vars.copy().run(call.fn, *call.args, **call.kwargs)
        except BaseException as exc:
            return _Handback(step=step, ok=False, value=exc)


def _done_here(run: _Run, step: _Step, value: Any, stopped: Callable[[], bool]
               ) -> tuple[bool, Any]:
    """In a step thread, `step` returned `value`: (True, what the workflow gets) with
    the done row deferred, when the thread may go on; (False, None) when the loop is
    to judge it (stopped, replaying, crowded, an awaitable, not JSON)."""
    if (run.stop is not None or run.journal or stopped()
            or not run.durable._threads_checkpoint() or inspect.isawaitable(value)):
        return False, None
    try:
        text = _dumps(value)
    except (TypeError, ValueError):  # the loop fails the step with a clear error
        return False, None
    row, result = _done(step, text)
    run.pending.append(row)
    return True, result


def _begin_here(run: _Run, call: _StepCall) -> _Step | _Handback:
    """In a step thread: open a fresh step and commit its begin row (with the
    deferred ones) from here; a _Handback if the commit failed."""
    writer, pool = run.durable._writer, run.durable._pool
    if writer is None or pool is None:  # closed meanwhile
        return _Handback(call=call)
    step = _open_step(run, call)
    assert isinstance(step, _Step)  # nothing left to replay
    begin = _begin(step)
    assert begin is not None  # a fresh step has attempts left
    ok, result = writer.commit_here(_Checkpoint(run, [begin]), pool.busy <= 1)
    return step if ok else _Handback(write_error=result)


def _finish_here(run: _Run, value: Any, stopped: Callable[[], bool]) -> _Handback:
    """In the step thread, the generator returned `value`: commit the workflow's end
    with the last step's row, unless something needs the event loop's care."""
    writer, pool = run.durable._writer, run.durable._pool
    try:
        outcome = _ending(run, value)
    except BaseException:  # the loop fails the workflow, or stops it, as it should
        return _Handback(returned=value)
    if run.stop is not None or stopped() or writer is None or pool is None:
        return _Handback(returned=value)
    ok, result = writer.commit_here(_Checkpoint(run, [], outcome), pool.busy <= 1)
    return _Handback(finished=outcome) if ok else _Handback(write_error=result)


async def _settled(value: Any) -> tuple[bool, Any]:
    """The outcome of a sync step that returned an awaitable: what it gives."""
    try:
        return True, await value
    except Exception as exc:
        return False, exc


async def _execute(run: _Run, call: _Call, began: _Handback | None = None) -> Any:
    """The loop's driver for one call: run a step (or a sleep) to its verdict and
    return its result, or a _Handback when its step thread went on with the workflow.
    `began`: a step thread already began this step and ran an attempt."""
    if isinstance(call, _SleepCall):
        return await _sleep(run, call)
    if isinstance(call, _ReceiveCall):
        return await _receive(run, call)
    if isinstance(call, _AllCall):
        return await _all(run, call)
    if isinstance(call, _ChildCall):
        return await _child(run, call)
    assert isinstance(call, _StepCall)
    if began is not None:
        assert began.step is not None
        step, ok, value = began.step, began.ok, began.value
    else:
        opened = _open_step(run, call)
        if isinstance(opened, _Replayed):
            return opened.result()
        step = opened
    while True:
        if began is not None:
            began = None
            if ok and inspect.isawaitable(value):
                ok, value = await _settled(value)
            kind, row, result = _verdict(step, ok, value)
        elif (begin := _begin(step)) is None:  # out of attempts (the process died in the last)
            kind, row, result = _failed(step)
        else:
            ok, value = await _attempt(run, step, begin)
            if ok and isinstance(value, _Handback):
                return value
            if ok and inspect.isawaitable(value):
                ok, value = await _settled(value)
            kind, row, result = _verdict(step, ok, value)
        if kind == "done":
            run.defer(row)
            return result
        run.stop_if_closing(row)  # closing: this attempt is recorded, the next at reopen
        if kind == "failed":
            await run.write([row])
            raise result
        _log.warning("workflow %r step %r attempt %d/%d failed (%s: %s); retrying in %.2fs",
                     run.id, call.name, step.attempt, step.policy.max_attempts,
                     step.error["type"], step.error["message"], result)
        await run.nap(result)


async def _attempt(run: _Run, step: _Step, begin: _Row) -> tuple[bool, Any]:
    """Checkpoint an attempt (its begin row), then run the step: (ok, value).

    A sync step's thread commits the checkpoint just before running the step (in
    place when nothing else is going on, else through the writer thread, waiting):
    one trip from the event loop instead of two. With more workflows running than
    there are threads, the checkpoint goes to the writer thread from the loop."""
    call = step.call
    if run.inflight or call.is_async or run.fanout or not run.durable._threads_checkpoint():
        # In a ctx.all, from the loop too: its calls' checkpoints queue together and
        # share commits, and no step thread goes on with the workflow.
        await run.write([begin])
        return await _invoke(run, call)
    run.check_writable()
    pending = run.pending
    ok, value = await _invoke(run, call, _Checkpoint(run, [begin]),
                              None if run.gen is None else step)
    if not ok and isinstance(value, _BeginFailed):
        # Not written: finished steps' rows go back, for close() to record.
        run.pending = pending + run.pending
        run.write_failed(value.args[0])
    return ok, value


async def _invoke(run: _Run, call: _StepCall, begin: _Checkpoint | None = None,
                  step: _Step | None = None) -> tuple[bool, Any]:
    """Run a step's body once: (ok, value or exception). A sync step runs in a step
    thread, which commits `begin` first if given (a failed commit: _BeginFailed, the
    body not run) and, given the generator workflow's `step`, may go on with the
    workflow (_go_on). A generator workflow's steps run in copies of its context; an
    async workflow's, in its task's (a copy of it for a sync step)."""
    durable = run.durable
    loop = asyncio.get_running_loop()
    if call.is_async:
        try:
            coro = call.fn(*call.args, **call.kwargs)
            return True, await (coro if run.gen is None
                                else loop.create_task(coro, context=run.vars.copy()))
        except Exception as exc:
            return False, exc
    writer, pool = durable._writer, durable._pool
    assert pool is not None and writer is not None
    future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    # Counted until the thread returns, even if the workflow is cancelled first:
    # close() must not hand a workflow to another process while its step still runs.
    durable._thread_started(run)

    def done(ok: bool, value: Any) -> None:
        durable._thread_done(run)
        if not future.cancelled():
            future.set_result((ok, value))

    def stopped() -> bool:
        return future.cancelled() or durable._closing or run.stop is not None

    checkpoint: Callable[[], BaseException | None] | None = None
    if begin is not None:
        def checkpoint() -> BaseException | None:
            # In the step thread: a workflow stopped meanwhile neither checkpoints nor
            # runs the step.
            if stopped():
                return _Interrupted("the workflow stopped before the step began")
            ok, value = writer.commit_here(begin, pool.busy <= 1)
            return None if ok else value

    after: Callable[[Any], Any] | None = None
    if step is not None:
        def after(value: Any) -> Any:
            return _go_on(run, step, value, stopped)

    pool.submit(call.fn, call.args, call.kwargs, done, checkpoint, after,
                None if run.gen is None else run.vars.copy())
    run.steps_due += 1
    try:
        return await future
    finally:
        run.steps_due -= 1


async def _sleep(run: _Run, call: _SleepCall) -> None:
    seq, recorded = _next(run, call)
    if recorded is not None and recorded.state == "done":
        return
    if recorded is not None:
        wake = float(_loads(recorded.result, run.id))
    else:
        now = time.time()
        wake = now + call.seconds
        await run.write([(run.id, seq, call.name, "running", 1, _dumps(wake), None, None, now,
                          now, None)])
    await run.nap(wake - time.time())
    done = time.time()
    if done < wake:  # woken early: the workflow is stopped, or the journal closing
        run.check_writable()
        raise run.stop or _Interrupted("the workflow stopped during a sleep")
    run.defer((run.id, seq, call.name, "done", 1, _dumps(wake), None, None, done, done, done))


async def _receive(run: _Run, call: _ReceiveCall) -> Any:
    """Wait for the value sent under the call's name: journaled when the wait begins
    (a checkpoint, with its deadline), and when it ends (the value, or the timeout,
    with the next checkpoint). While it waits the workflow holds no thread; send (in
    this process) or the mail poll (another's send) hands the value over."""
    seq, recorded = _next(run, call)
    if recorded is not None and recorded.state != "running":
        if recorded.state == "done":
            return _loads(recorded.result, run.id)
        raise ReceiveTimeout((_loads(recorded.error, run.id) or {}).get("message", ""))
    if recorded is not None:
        since = recorded.updated_at
        until = (_loads(recorded.result, run.id) or {}).get("until")
    else:
        since = time.time()
        until = None if call.timeout is None else since + call.timeout
        await run.write([(run.id, seq, call.name, "running", 1, _dumps({"until": until}),
                          None, None, since, since, None)])
    text = await run.durable._query(lambda journal: journal.message(run.id, call.message))
    while text is None:
        text = run.mail.get(call.message)  # handed over here meanwhile
        if text is not None:
            break
        left = _FOREVER if until is None else until - time.time()
        if left <= 0:  # one last look: a value sent just before the deadline counts
            text = await run.durable._query(
                lambda journal: journal.message(run.id, call.message))
            if text is not None:
                break
            now, message = time.time(), (f"nothing was sent under {call.message!r} within "
                                         f"{call.timeout}s")
            run.defer((run.id, seq, call.name, "failed", 1, None,
                       _dumps({"type": "ReceiveTimeout", "message": message}), None, since,
                       now, now))
            raise ReceiveTimeout(message)
        await run.nap(left, expecting=call.message)
        text = run.mail.get(call.message)
    now = time.time()
    run.defer((run.id, seq, call.name, "done", 1, text, None, None, since, now, now))
    return _loads(text, run.id)


async def _child(run: _Run, call: _ChildCall) -> Any:
    """Start a child workflow (its start journaled in the parent: a replayed parent
    finds it and starts no second one), wait for its end, and return its result, or
    raise StepFailed with its error."""
    seq, recorded = _next(run, call)
    if recorded is not None and recorded.state == "done":
        return _loads(recorded.result, run.id)
    if recorded is not None and recorded.state == "failed":
        err = _loads(recorded.error, run.id) or {}
        raise StepFailed(call.name, err.get("type", "Error"), err.get("message", ""), 1)
    if recorded is not None:
        since, child_id = recorded.updated_at, (_loads(recorded.result, run.id) or {})["child"]
    else:
        since, child_id = time.time(), call.id or f"{run.id}/{seq}"
        _check_id(child_id)
        if child_id == run.id:
            raise InvalidInput(f"workflow {run.id!r} cannot be its own child; give "
                               "ctx.options(id=...) another id")
        await run.write([(run.id, seq, call.name, "running", 1, _dumps({"child": child_id}),
                          None, None, since, since, None)])
    durable = run.durable
    try:
        await durable._start_child(child_id, call, run.id)
    except IdempotencyConflict as exc:  # the id is another workflow's: the call fails
        conflict = {"type": "IdempotencyConflict", "message": str(exc)}
        now = time.time()
        await run.write([(run.id, seq, call.name, "failed", 1, None, _dumps(conflict), None,
                          since, now, now)])
        raise StepFailed(call.name, conflict["type"], conflict["message"], 1) from None
    ended = asyncio.ensure_future(durable._wait(child_id))
    try:
        while not ended.done():
            await run.nap(_FOREVER, until=ended)
    finally:
        if not ended.done():
            ended.cancel()
    state, result, error = ended.result()
    now = time.time()
    if state == "done":
        run.defer((run.id, seq, call.name, "done", 1, result, None, None, since, now, now))
        return _loads(result, run.id)
    err = _loads(error, run.id) or {}
    await run.write([(run.id, seq, call.name, "failed", 1, None, error, None, since, now,
                      now)])
    raise StepFailed(call.name, err.get("type", "Error"), err.get("message", ""), 1)


async def _all(run: _Run, call: _AllCall) -> list[Any]:
    """Run the calls of a ctx.all side by side; their results in argument order, or,
    once every call has settled, the first failure in argument order. Each call takes
    its place in the journal in argument order, as it starts: replay finds it there,
    whatever order the calls finished in. Each finished call's row is committed as it
    finishes (sharing commits with its siblings'), so a sibling's failure or the
    process's death runs none of them again."""

    async def settle(one: _Call) -> tuple[bool, Any]:
        try:
            return True, await _execute(run, one)
        except BaseException as exc:  # kept for its turn: the first in argument order
            return False, exc

    def place(calls: tuple[_Call, ...]) -> None:
        # Positions in program order, nested alls depth-first, before any call starts:
        # not left to the order in which the event loop happens to start their tasks.
        for one in calls:
            if isinstance(one, _AllCall):
                place(one.calls)
            elif one.place is None:
                run.seq += 1
                one.place = run.seq

    if call.place is None:  # the outermost all of a nest places them all
        call.place = 0
        place(call.calls)
    run.fanout += 1
    try:
        outcomes = await asyncio.gather(*(settle(one) for one in call.calls))
    finally:
        run.fanout -= 1
    for ok, value in outcomes:  # a stop (cancel, close, fence) first
        if not ok and not isinstance(value, Exception):
            raise value
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


async def _drive(run: _Run, gen: Generator[Any, Any, Any],
                 started: asyncio.Future[_Handback | None] | None = None) -> Any:
    """The loop's driver for a generator workflow: each yielded call runs, and its
    result (or its StepFailed) is sent back in. A step thread may have run the
    generator further (a _Handback): the loop goes on from where it stopped.
    `started`: a step thread was given the workflow from its start
    (Durable._run_at_once); None from it means the workflow is not to run here, and
    _drive returns _NOT_STARTED."""
    run.gen = gen
    value: Any = None
    failure: StepFailed | ReceiveTimeout | None = None
    back: _Handback | None = None
    try:
        if started is not None:
            run.steps_due += 1
            try:
                back = await started
            finally:
                run.steps_due -= 1
            if back is None:
                return _NOT_STARTED
        while True:
            began = None
            if back is not None:
                if back.write_error is not None:
                    run.write_failed(back.write_error)
                if back.finished is not None:
                    return _Committed(back.finished)
                if back.returned is not _NOTHING:
                    return back.returned
                if back.raised is not None:
                    raise back.raised
                call, began = (back.call, None) if back.step is None else (back.step.call, back)
                back = None
            else:
                try:
                    call = (run.vars.run(gen.send, value) if failure is None
                            else run.vars.run(gen.throw, failure))
                except StopIteration as stop:
                    return stop.value
            value, failure = None, None
            if not isinstance(call, _Call):
                raise TypeError(f"the workflow yielded {call!r}; yield ctx.run(step, ...) "
                                "or ctx.sleep(seconds)")
            try:
                result = await _execute(run, call, began)
            except (StepFailed, ReceiveTimeout) as exc:  # thrown into the workflow
                failure = exc
            else:
                if isinstance(result, _Handback):
                    back = result
                else:
                    value = result
    finally:
        run.gen = None
        try:
            run.vars.run(gen.close)
        except RuntimeError as exc:
            # A step thread still runs it (the workflow was cancelled): its context is
            # entered there, or the generator executing.
            if inspect.getgeneratorstate(gen) != inspect.GEN_RUNNING \
                    and "cannot enter context" not in str(exc):
                # it yielded again in a `finally`: keep the first error
                _log.warning("workflow %r ignored its shutdown: %s", run.id, exc)
        except ValueError:  # a step thread still runs it (the workflow was cancelled)
            pass


# CONTEXT AND HANDLE: the public faces.


class _Call:
    """A call about to run: yield it (generator workflow) or await it (async one)."""

    __slots__ = ("place", "run")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.place: int | None = None  # its journal position, given ahead by a ctx.all

    def __await__(self) -> Generator[Any, None, Any]:
        return _execute(self.run, self).__await__()


class _StepCall(_Call):
    __slots__ = ("args", "fn", "is_async", "kwargs", "name", "retry")

    def __init__(self, run: _Run, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], name: str | None, retry: RetryPolicy | None) -> None:
        if not callable(fn):
            raise InvalidInput(f"ctx.run() needs a function, not {fn!r}")
        super().__init__(run)
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)  # asked once, not at every turn
        self.args = args
        self.kwargs = kwargs
        self.name = name or _name_of(fn)
        self.retry = retry


class _SleepCall(_Call):
    __slots__ = ("seconds",)
    name = "ctx.sleep"

    def __init__(self, run: _Run, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 <= seconds < float("inf"):
            raise InvalidInput(f"ctx.sleep() needs seconds >= 0, not {seconds!r}")
        super().__init__(run)
        self.seconds = float(seconds)


class _ReceiveCall(_Call):
    __slots__ = ("message", "name", "timeout")

    def __init__(self, run: _Run, message: str, timeout: float | None) -> None:
        _check_name(message, "a message name")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, int | float) or not 0 <= timeout < float("inf")):
            raise InvalidInput(f"ctx.receive() needs a timeout of seconds >= 0 or None, "
                               f"not {timeout!r}")
        super().__init__(run)
        self.message = message
        self.name = f"ctx.receive:{message}"  # its journal name: replay checks it
        self.timeout = None if timeout is None else float(timeout)


class _AllCall(_Call):
    __slots__ = ("calls",)
    name = "ctx.all"

    def __init__(self, run: _Run, calls: tuple[Any, ...]) -> None:
        for one in calls:
            if not isinstance(one, _Call) or one.run is not run:
                raise InvalidInput(f"ctx.all() takes calls made by this workflow's ctx "
                                   f"(ctx.run, ctx.sleep, ctx.receive, ctx.child, ctx.all), "
                                   f"not {one!r}")
            if one.place is not None:
                raise InvalidInput("ctx.all() was given a call that ran already; make a "
                                   "new one (each call runs once)")
        if len({id(one) for one in calls}) < len(calls):
            raise InvalidInput("ctx.all() was given the same call twice; make one call "
                               "for each run")
        super().__init__(run)
        self.calls = calls


class _ChildCall(_Call):
    __slots__ = ("digest", "id", "name", "text", "workflow")

    def __init__(self, run: _Run, fn: Callable[..., Any] | str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], child_id: str | None) -> None:
        if child_id is not None:
            _check_id(child_id)
        self.workflow, self.text, self.digest = run.durable._prepare(fn, args, kwargs)
        super().__init__(run)
        self.id = child_id
        self.name = f"ctx.child:{self.workflow.name}"  # its journal name: replay checks it


class _StepOptions:
    __slots__ = ("_id", "_name", "_retry", "_run")

    def __init__(self, run: _Run, name: str | None, retry: RetryPolicy | None,
                 child_id: str | None = None) -> None:
        self._run, self._name, self._retry, self._id = run, name, retry, child_id

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _StepCall:
        """Like `Context.run`, with these options."""
        return _StepCall(self._run, fn, args, kwargs, self._name, self._retry)

    def child(self, workflow: Callable[..., Any] | str, /, *args: Any,
              **kwargs: Any) -> _ChildCall:
        """Like `Context.child`, with these options (`id`: the child's id)."""
        return _ChildCall(self._run, workflow, args, kwargs, self._id)


class Context:
    """Handed to a workflow as its first argument; `run` makes its steps."""

    __slots__ = ("_run",)

    def __init__(self, run: _Run) -> None:
        self._run = run

    @property
    def id(self) -> str:
        """The workflow's id: the base for keys passed to outside systems."""
        return self._run.id

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _StepCall:
        """A step calling ``fn(*args, **kwargs)``: ``yield`` it in a generator workflow,
        ``await`` it in an async one. Sync functions run in a worker thread, which may
        also run a generator workflow's code up to its next sync step."""
        return _StepCall(self._run, fn, args, kwargs, None, None)

    def options(self, *, name: str | None = None, retry: RetryPolicy | None = None,
                id: str | None = None) -> _StepOptions:
        """Step options that cannot collide with the step's own arguments:
        ``yield ctx.options(retry=RetryPolicy(max_attempts=10)).run(charge, order)``.
        `name` is the step's name in the journal (default: the function's name); `id`
        a child workflow's id (``ctx.options(id="audit/42").child(audit, 42)``)."""
        if id is not None:
            _check_id(id)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"retry must be a RetryPolicy, not {retry!r}")
        if name is not None and (not isinstance(name, str) or not name or "\x00" in name):
            raise InvalidInput(f"a step name must be a non-empty string without NUL, "
                               f"not {name!r}")
        return _StepOptions(self._run, name, retry, id)

    def sleep(self, seconds: float) -> _SleepCall:
        """A durable timer: ``yield ctx.sleep(3600)`` (or ``await``). The wake time is
        journaled, so after a restart the workflow sleeps only what is left. A sleeping
        workflow holds no thread."""
        return _SleepCall(self._run, seconds)

    def child(self, workflow: Callable[..., Any] | str, /, *args: Any,
              **kwargs: Any) -> _ChildCall:
        """Start registered `workflow(ctx, *args, **kwargs)` as a child, wait for it and
        return its result (``audit = yield ctx.child(audit_trail, order_id)``, or
        ``await``); a child that fails raises StepFailed with its error. Its id is
        f"{ctx.id}/{n}", n its call's place in this journal (``ctx.options(id=...)``
        for another); its start is journaled here, so a replayed parent starts no
        second child. Cancelling this workflow cancels its unfinished children."""
        return _ChildCall(self._run, workflow, args, kwargs, None)

    def all(self, *calls: _Call) -> _AllCall:
        """Run `calls` (steps, sleeps, receives, other alls) side by side and return
        their results in argument order: ``a, b = yield ctx.all(ctx.run(refund),
        ctx.run(notify))`` (or ``await``). Sync steps run in parallel threads (up to
        max_threads), async ones concurrently. Finished calls are recorded and never
        run again, even when a sibling fails or the process dies; if any fails, all
        raises the first failure in argument order once every call has settled."""
        return _AllCall(self._run, calls)

    def receive(self, name: str, *, timeout: float | None = None) -> _ReceiveCall:
        """Wait for the value sent to this workflow under `name` (``await
        dur.send(id, name, value)``) and return it: ``decision = yield
        ctx.receive("approval", timeout=86_400)`` (or ``await``). Journaled: replay
        returns the same value. It holds no thread and survives restarts; a value
        sent before the workflow gets here waits for it. With `timeout` (seconds, its
        deadline journaled) it raises ReceiveTimeout if nothing came by then."""
        return _ReceiveCall(self._run, name, timeout)


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
        run = self._durable._runs.get(self.id)
        if run is not None and not run.fenced and run.new:
            return False
        outcome = await self._durable._query(lambda journal: journal.outcome(self.id))
        return outcome is not None and outcome[0] in _FINISHED

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
            return _loads(result, self.id)
        if state == "cancelled":
            raise WorkflowCancelled(f"workflow {self.id!r} was cancelled")
        raise WorkflowFailed(self.id, _loads(error, self.id) or {})

    async def status(self) -> Status:
        """The workflow and its steps as the journal has it now."""
        return await self._durable._query(lambda journal: _read_status(journal, self.id))
# DURABLE: registry, runner, recovery.


class Durable:
    """A journal and the workflows registered with it.

    Args:
        path: the SQLite file, created if missing (keep it on a local disk); or a
            PostgreSQL URL, "postgresql://user@host:5432/db" (the tables go in the
            first schema of its search_path: "?options=-csearch_path%3Dname").
        synchronous: "FULL" (default) syncs every commit to disk and survives power
            loss. "NORMAL" survives a crash of the process but may lose the last
            commits if the machine loses power; it is faster on slow disks. On
            PostgreSQL: synchronous_commit on or off.
        busy_timeout: seconds to wait for another process's write lock (on
            PostgreSQL: a row or table lock, lock_timeout).
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
            On SQLite, keep it well above the clock skew between machines sharing
            the file; on PostgreSQL the server's clock measures it.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 busy_timeout: float = 5.0, retry: RetryPolicy | None = None,
                 max_threads: int = 32, max_running: int | None = None,
                 lease: float = 30.0) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file:") or (
                "://" in self.path and not _is_url(self.path)) or _looks_like_a_dsn(self.path):
            raise InvalidInput(f"the journal must be a file path or a postgresql:// URL, "
                               f"not {_redacted(self.path)!r}")
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
        # Per workflow here, all on the event loop: the workflows running (one _Run
        # each), and those waiting for one of `max_running` places, in order: id ->
        # (workflow name, input, journal), plain values, no task: the garbage collector
        # has nothing to walk in a backlog of thousands.
        self._runs: dict[str, _Run] = {}
        self._queued: dict[str, tuple[str, str, dict[int, _JournaledStep] | None]] = {}
        self._stepping: set[_Run] = set()  # runs with sync steps in threads, even stopped
        self._stalls: dict[str, int] = {}  # workflow id -> failed journal writes in a row
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._mail: asyncio.Task[None] | None = None
        self._closing = False
        self._host = socket.gethostname()
        self._owner = ""
        self._clock = _LeaseClock()
        self._writer: _Writer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_journal: _Journal | None = None
        self._pool: _StepThreads | None = None

    def __repr__(self) -> str:
        return f"Durable({_redacted(self.path)!r}, synchronous={self.synchronous!r})"

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
        self._clock = _LeaseClock()  # from the wall clock at open, as NTP has set it by now
        connect = functools.partial(_open_journal, self.path, synchronous=self.synchronous,
                                    busy_timeout=self.busy_timeout, clock=self._clock,
                                    lease=self.lease)
        try:
            journal = await loop.run_in_executor(reader, connect)
            try:
                self._reader_journal = await loop.run_in_executor(reader, connect)
            except BaseException:
                journal.close()
                raise
        except BaseException:
            reader.shutdown(wait=False)
            raise
        pid = os.getpid()
        self._owner = f"{self._host}|{pid}|{_process_start(pid)}|{secrets.token_hex(4)}"
        self._closing = False
        self._reader = reader
        self._writer = _Writer(journal, loop)
        self._pool = _StepThreads(self.max_threads, loop)
        try:
            await self._renew(forget=True)
            await self._adopt_orphans(opening=True)
        except BaseException:
            await self.close()  # leave nothing running behind a failed open
            raise
        self._maintenance = loop.create_task(self._maintain(), name="durable:maintenance")
        self._mail = loop.create_task(self._poll_mail(), name="durable:mail")

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop running workflows (they stay unfinished in the journal and resume at the
        next open), hand them back so another process may take them, and close.

        A sync step cannot be interrupted: close() waits up to `grace` seconds for step
        threads to return, and records the results of those that do (their workflows
        stop before their next step). A workflow whose step thread is still running
        then stays held by this process: another process takes it over when this
        process exits (at once, on this machine) or, if it lives on, when its lease runs
        out; the stray thread's result is refused either way."""
        if self._writer is None or self._closing:
            return
        deadline = asyncio.get_running_loop().time() + grace
        await self._close_stop_starting()
        await self._close_stop_workflows(grace)
        await self._close_wait_for_threads(deadline)
        await self._close_hand_back()
        await self._close_shut()

    async def _close_stop_starting(self) -> None:
        """Phase 1: no step begins and no workflow starts from here on; the queued ones
        stay unfinished (handed back below like the rest); no more ticks or timers."""
        self._closing = True
        self._queued.clear()
        for timer in self._timers:
            timer.cancel()
        for task in (self._maintenance, self._mail):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _close_stop_workflows(self, grace: float) -> None:
        """Phase 2: workflows in a sync step (or with its outcome on its way to them) go
        on until they have it, up to `grace`: they record its result and stop before
        their next step. The others stop now; so do those past the grace."""
        for task in [*[run.task for run in self._runs.values()
                       if not run.threads and not run.steps_due], *self._background]:
            if task is not None:
                task.cancel()
        for run in self._runs.values():  # kept for a step thread: its waits end now
            for napping in run.naps:
                _wake(napping)
        if self._runs:
            await asyncio.wait([run.task for run in self._runs.values() if run.task],
                               timeout=grace)
        while self._runs or self._background:
            tasks = [*(run.task for run in self._runs.values() if run.task),
                     *self._background]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_wait_for_threads(self, deadline: float) -> None:
        """Phase 3: wait, up to the grace, for step threads of stopped workflows."""
        loop = asyncio.get_running_loop()
        while self._stepping and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def _close_hand_back(self) -> None:
        """Phase 4: hand back every workflow held here, so that another process may take
        it at once; one whose step thread still runs stays held until the lease ends."""
        writer, owner = self._open_writer(), self._owner
        keep, lease = {run.id for run in self._stepping}, self.lease
        with contextlib.suppress(DurableError):  # after every queued insert: none is orphaned
            await writer.submit(lambda journal: journal.release(owner, keep, lease))

    async def _close_shut(self) -> None:
        """Phase 5: commit what is queued, close the journal, end the threads."""
        writer, reader, pool = self._writer, self._reader, self._pool
        assert writer is not None and reader is not None and pool is not None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, writer.stop)
        writer.journal.close()
        if self._reader_journal is not None:
            await loop.run_in_executor(reader, self._reader_journal.close)
        reader.shutdown(wait=True)
        pool.shutdown()
        self._writer = self._reader = self._pool = self._reader_journal = None
        self._timers.clear()
        self._stalls.clear()

    def _open_writer(self) -> _Writer:
        if self._writer is None:
            raise DurableError(f"{self!r} is not open; use 'async with dur:' or 'await dur.open()'")
        return self._writer

    # Journal access.

    async def _query(self, fn: Callable[[_Journal], _T]) -> _T:
        """Run `fn` on the reader's journal, in the reader thread."""
        self._open_writer()
        journal, reader = self._reader_journal, self._reader
        assert journal is not None and reader is not None

        def query() -> _T:
            try:
                return fn(journal)
            except journal.failures as exc:
                raise journal.error("journal read failed", exc) from None

        try:
            future = asyncio.get_running_loop().run_in_executor(reader, query)
        except RuntimeError:  # the executor shut down under us
            raise DurableError(f"{self!r} was closed") from None
        return await future

    def _threads_checkpoint(self) -> bool:
        """Whether sync steps' threads commit their own checkpoints: only while every
        running workflow could have a thread waiting on its commit. With more running
        workflows than threads, waiting threads would cap each batch below the number
        of workflows ready to share it."""
        return len(self._runs) <= self.max_threads

    def _thread_started(self, run: _Run) -> None:
        run.threads += 1
        self._stepping.add(run)

    def _thread_done(self, run: _Run) -> None:
        run.threads -= 1
        if not run.threads:
            self._stepping.discard(run)

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
        _check_id(id)
        workflow, text, digest = self._prepare(fn, args, kwargs)
        insert = _Insert(id, workflow.name, text, digest, self._owner)
        if not workflow.is_async and not self._runs and not self._queued \
                and self._pool is not None and not self._pool.busy:
            return await self._run_at_once(workflow, text, insert)

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
        if not created:
            await self._resume_if_nobody_runs(id, state, known_owner)
        return Handle(self, id, created)

    def _prepare(self, fn: Callable[..., Any] | str, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[_Workflow, str, str]:
        """The registered workflow `fn`, its input as journaled, and the digest that
        tells a run of the same function and arguments; InvalidInput for anything
        else."""
        workflow = self._workflow(fn)
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
        return workflow, text, hashlib.sha256(canonical.encode()).hexdigest()

    async def _start_child(self, child_id: str, call: _ChildCall, parent: str) -> None:
        """Record the child (or find it recorded: a replayed parent) and start it here,
        unless it runs already (here or elsewhere) or has finished."""
        insert = _ChildInsert(child_id, call.workflow.name, call.text, call.digest,
                              self._owner, parent)
        caller = contextvars.copy_context()

        def start(ok: bool, value: Any) -> None:
            if ok and value[0]:
                caller.run(self._start, child_id, call.workflow, call.text, {})

        created, state, owner = await self._open_writer().submit(insert, start)
        if not created:
            await self._resume_if_nobody_runs(child_id, state, owner)

    async def _resume_if_nobody_runs(self, workflow_id: str, state: str,
                                     owner: str | None) -> None:
        """run() found the workflow recorded: resume it here if it is unfinished and
        nobody runs it (no holder, this process, or a holder here that died)."""
        if state in _UNFINISHED and not self._here(workflow_id) and (
                owner is None or owner == self._owner or _owner_is_dead(owner, self._host)):
            await self._resume([(workflow_id, owner, True)])

    async def _run_at_once(self, workflow: _Workflow, text: str, insert: _Insert) -> Handle:
        """run() of a generator workflow when nothing else runs here: a step thread
        commits the insert, answers run(), and starts the workflow there at once
        (_go_on), sparing the trips from the writer thread to the event loop and from
        the loop to a step thread."""
        writer, pool = self._open_writer(), self._pool
        assert pool is not None
        loop = asyncio.get_running_loop()
        inserted: asyncio.Future[tuple[bool, str, str | None]] = loop.create_future()
        started: asyncio.Future[_Handback | None] = loop.create_future()
        run = _Run(self, workflow, insert.id, text, {})
        run.new = False  # until the insert says so: it may be a duplicate
        data = _loads(text)
        run.gen = gen = workflow.fn(Context(run), *data["args"], **data["kwargs"])
        # Registered before the thread begins: a run() meanwhile finds it running here,
        # cancel() and close() can stop it, and max_running counts it.
        self._launch(run, (gen, started))
        self._thread_started(run)

        def commit() -> tuple[bool, Any]:
            outcome = writer.commit_here(insert, True)
            run.new = outcome[0] and outcome[1][0]
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                targets: list[asyncio.Future[Any] | _Then] = [inserted]
                loop.call_soon_threadsafe(_settle, targets, [outcome])
            return outcome

        def stopped() -> bool:
            return started.cancelled() or self._closing or run.stop is not None

        def go_on(outcome: tuple[bool, Any]) -> _Handback | None:
            ok, value = outcome
            if not ok or not value[0] or stopped():
                return None  # not new, refused, or stopped meanwhile: not started here
            back = _go_on(run, None, None, stopped)
            assert back is None or isinstance(back, _Handback)
            return back

        def done(ok: bool, value: Any) -> None:
            self._thread_done(run)
            targets: list[asyncio.Future[Any] | _Then] = [started]
            if not ok:  # dropped at close, before the insert: run() gets the error too
                targets.append(inserted)
            _settle(targets, [(ok, value)] * len(targets))

        pool.submit(commit, (), {}, done, None, go_on)
        # Not shielded: the thread goes on with its own copy of the outcome, whether
        # or not the caller of run() is still there to take it.
        assert run.task is not None
        try:
            created, state, known_owner = await inserted
        except DurableError as failure:  # refused: the task ends at once, starting nothing
            await asyncio.wait([run.task])
            if not isinstance(failure, JournalError):
                raise
            created, state, known_owner = await self._recorded(insert, failure)
        if not created:
            await asyncio.wait([run.task])  # it ends at once; then see who runs the workflow
            await self._resume_if_nobody_runs(insert.id, state, known_owner)
        return Handle(self, insert.id, created)

    async def _recorded(self, insert: _Insert, failure: JournalError
                        ) -> tuple[bool, str, str | None]:
        """run()'s insert failed (another process held the write lock past busy_timeout,
        say). A run() of a workflow already recorded needs no write: answer it from a
        read, which WAL allows meanwhile. Anything else raises the failure."""
        try:
            known = await self._query(lambda journal: journal.identity(insert.id))
        except JournalError:
            raise failure from None
        if known is None:
            raise failure
        return insert.known(*known)

    async def get(self, id: str) -> Handle:
        """The handle of an existing workflow; raises NotFound for an unknown id."""
        _check_id(id)
        if await self._query(lambda journal: journal.outcome(id)) is None:
            raise NotFound(f"no workflow has id {id!r}")
        return Handle(self, id, False)

    def _here(self, workflow_id: str) -> bool:
        """Whether this process runs the workflow or has it waiting for its turn."""
        return workflow_id in self._runs or workflow_id in self._queued

    def _start(self, workflow_id: str, workflow: _Workflow, text: str,
               journal: dict[int, _JournaledStep]) -> None:
        if self._closing or workflow_id in self._queued:
            return
        old = self._runs.get(workflow_id)
        if old is not None and old.task is not None:
            # A task of this id's earlier life (cancelled, then pruned) is still waiting
            # for its step thread: the new workflow starts when that task has ended.
            old.task.add_done_callback(
                lambda _: self._start(workflow_id, workflow, text, journal))
            return
        if self.max_running is not None and len(self._runs) >= self.max_running:
            self._queued[workflow_id] = (workflow.name, text, journal or None)
            return
        self._launch(_Run(self, workflow, workflow_id, text, journal))

    def _launch(self, run: _Run, started: tuple[Generator[Any, Any, Any],
                                                asyncio.Future[_Handback | None]] | None = None
                ) -> None:
        run.task = asyncio.get_running_loop().create_task(
            self._run_workflow(run, started), name=f"durable:{run.id}")
        self._runs[run.id] = run
        run.task.add_done_callback(functools.partial(self._ended, run))

    def _ended(self, run: _Run, task: asyncio.Task[Any]) -> None:
        # Also for a task cancelled before it began (close), whose code never ran.
        if self._runs.get(run.id) is run:
            del self._runs[run.id]
            self._start_queued()
        run.ended(run.outcome)  # waiters are woken even if it never got to run

    async def _run_workflow(self, run: _Run,
                            started: tuple[Generator[Any, Any, Any],
                                           asyncio.Future[_Handback | None]] | None = None
                            ) -> _Outcome | None:
        """Run the workflow to its end; return the outcome committed (state, result,
        error), or None if it stopped unfinished (or `started` did not start it)."""
        workflow = run.workflow
        try:
            try:
                if started is not None:
                    value = await _drive(run, *started)
                    if value is _NOT_STARTED:
                        return None
                else:
                    data = _loads(run.text, run.id)
                    body = workflow.fn(Context(run), *data["args"], **data["kwargs"])
                    value = await (body if workflow.is_async else _drive(run, body))
                if isinstance(value, _Committed):  # a step thread wrote the end
                    self._stalls.pop(run.id, None)
                    return run.ended(value.outcome)
                outcome = _ending(run, value)
            except Exception as exc:
                outcome = _failure(run, exc)
            if isinstance(run.stop, _Interrupted):
                raise run.stop
            await run.write([], outcome)
            self._stalls.pop(run.id, None)
            return run.ended(outcome)  # committed: waiters here need no journal read
        except _Interrupted as stop:
            if isinstance(stop, _Fenced):
                _log.log(stop.level, "%s", stop)
            elif not self._closing:
                cause = stop.args[0] if stop.args else stop
                self._retry_later(run.id, cause)
            else:  # steps that returned while close() waited: record their results
                await run.record_pending()
            return None
        finally:
            if run.stop is None:  # a step thread of this life writing late is refused
                run.stop = _Fenced(run.id, "its run here ended", logging.DEBUG)
            if self._runs.get(run.id) is run:
                del self._runs[run.id]
            run.ended(run.outcome)  # stopped unfinished: waiters look at the journal
            self._start_queued()

    def _start_queued(self) -> None:
        """Start waiting workflows while there is room."""
        while self._queued and self.max_running is not None \
                and len(self._runs) < self.max_running and not self._closing:
            workflow_id = next(iter(self._queued))
            name, text, journal = self._queued.pop(workflow_id)
            self._start(workflow_id, self._registry[name], text, journal or {})

    async def _wait(self, workflow_id: str) -> _Outcome:
        """Wait until the workflow is finished; return its state, result and error."""
        delay = 0.01
        while True:
            if workflow_id in self._queued:  # waiting for its turn here
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            run = self._runs.get(workflow_id)
            running_here = run is not None and not run.fenced
            if run is not None and running_here:
                waiter = asyncio.get_running_loop().create_future()
                run.waiters.append(waiter)  # woken when it ends here or is stopped
                try:
                    await waiter
                finally:
                    run.waiters.remove(waiter)
                if run.outcome is not None:
                    return run.outcome
            outcome = await self._query(lambda journal: journal.outcome(workflow_id))
            if outcome is None:
                raise NotFound(f"no workflow has id {workflow_id!r}")
            if outcome[0] in _FINISHED:
                return outcome
            if not running_here:
                # Running in another process, or waiting to be resumed: look again later.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # Operating it.

    async def send(self, id: str, name: str, value: Any) -> bool:
        """Send `value` (JSON) to workflow `id` under `name`, for its ``ctx.receive(name)``:
        committed before this returns, and the workflow woken if it waits (at once in
        this process, within a second in another sharing the journal). A value sent
        before the workflow receives it waits for it. One value per name: the same
        value again returns False and changes nothing (a retried webhook), another
        raises IdempotencyConflict. NotFound for an unknown id; InvalidInput, writing
        nothing, for a finished workflow."""
        _check_id(id)
        _check_name(name, "a message name")
        try:
            text = _dumps(value)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"the value sent under {name!r} must be JSON: {exc}") from None
        sent = bool(await self._open_writer().submit(
            lambda journal: _send(journal, id, name, text)))
        run = self._runs.get(id)
        if run is not None:  # here: handed over at once, even before its receive waits
            run.mail[name] = text
            for waiting in run.expecting.get(name, ()):
                _wake(waiting)
        return sent

    async def _poll_mail(self) -> None:
        """Hand the values other processes sent to the workflows here waiting for them."""
        while True:
            await asyncio.sleep(_MAIL_POLL)
            waiting = {(run.id, name): run for run in self._runs.values()
                       for name in run.expecting}
            if not waiting:
                continue
            wanted = list(waiting)

            def look(journal: _Journal, wanted: list[tuple[str, str]] = wanted
                     ) -> list[tuple[str, str, str]]:
                return [row for start in range(0, len(wanted), 500)
                        for row in journal.messages_for(wanted[start:start + 500])]

            try:
                found = await self._query(look)
            except DurableError as exc:
                _log.warning("could not look for values sent to waiting workflows (%s)", exc)
                continue
            for wf_id, name, text in found:
                run = waiting[wf_id, name]
                run.mail[name] = text
                for napping in run.expecting.get(name, ()):
                    _wake(napping)

    async def cancel(self, id: str) -> bool:
        """Cancel an unfinished workflow, in this process or another: no further step
        starts; a step running now finishes, but its result is not recorded and does
        not resume the workflow; `result()` raises WorkflowCancelled. Its unfinished
        children (ctx.child) are cancelled with it. Returns False, changing nothing,
        when the workflow had finished already."""
        _check_id(id)
        cancelled: list[str] = await self._open_writer().submit(
            lambda journal: _cancel(journal, id))
        for wf_id in cancelled:
            run = self._runs.get(wf_id)
            if run is not None:
                run.halt(_Fenced(wf_id, "it was cancelled", logging.INFO))
            self._queued.pop(wf_id, None)  # waiting for its turn: it never starts
        return bool(cancelled)

    async def retry(self, id: str) -> int:
        """Run a failed workflow again from its failed step: the steps before it stay
        journaled (not run again), the failed step gets fresh attempts. It starts here
        if registered here, else in the next process that registers it. Returns the
        position of the step it restarts from (0: from the top)."""
        _check_id(id)
        seq = int(await self._open_writer().submit(lambda journal: _retry(journal, id)))
        await self._adopt_orphans()
        return seq

    async def prune(self, older_than: float | timedelta) -> int:
        """Delete finished (done, failed, cancelled) workflows, with their steps, that
        finished more than `older_than` (seconds or a timedelta) ago; their ids may be
        used again. Unfinished workflows are never pruned. Returns how many."""
        cutoff = time.time() - _seconds(older_than, "older_than")
        writer, total = self._open_writer(), 0
        while True:  # in slices, so that other writes are not held up for long
            deleted = int(await writer.submit(lambda journal: _prune(journal, cutoff, 500)))
            total += deleted
            if deleted < 500:
                return total

    # Recovery.

    async def _renew(self, *, forget: bool = False) -> None:
        """Renew this process's lease: one row, however many workflows it holds. Its
        times come from the lease clock, which a jump of the system clock does not move."""
        me, lease = self._owner, self.lease
        await self._open_writer().submit(lambda journal: journal.renew(me, lease, forget))

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
        napping = [run for run in self._runs.values() if run.naps]
        if not napping:
            return

        def read(journal: _Journal) -> list[tuple[_Run, _Fenced]]:
            stopped = []
            for run in napping:
                row = journal.state(run.id)
                if row is None or row[0] not in _UNFINISHED or row[1] != self._owner:
                    stopped.append((run, _why_fenced(journal, run.id)))
            return stopped

        for run, why in await self._query(read):
            if self._runs.get(run.id) is run:
                run.halt(why)

    async def _adopt_orphans(self, *, opening: bool = False) -> int:
        """Take over every unfinished workflow registered here that no live process
        holds: no owner, a dead process on this machine (pid and start time tell), or
        a process elsewhere whose lease ran out. A live process on this machine is never
        taken over, whatever the clocks say. Returns how many were started."""
        candidates: list[tuple[str, str | None, bool]] = []
        strangers: dict[str, int] = {}
        verdicts: dict[str, bool | None] = {}
        for wf_id, name, owner, leased, closed in await self._query(
                lambda journal: journal.orphans(self._owner)):
            alive = None if owner is None else verdicts.setdefault(
                owner, None if closed else _liveness(owner, self._host))
            if alive or (alive is None and owner is not None and leased):
                continue  # alive on this machine, or elsewhere with a live lease
            if name in self._registry:
                candidates.append((wf_id, owner, alive is False))
            else:
                strangers[name] = strangers.get(name, 0) + 1
        if opening:
            for name, count in strangers.items():
                _log.warning("%d unfinished workflow(s) named %r are not registered here; "
                             "left for a process that registers them", count, name)
        started = await self._resume(candidates) if candidates else 0
        if opening and started:
            _log.info("resumed %d unfinished workflow(s) from %s", started,
                      _redacted(self.path))
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

        def claim(journal: _Journal) -> list[str]:
            return [wf_id for wf_id, owner, dead in candidates
                    if journal.claim(me, wf_id, owner, dead)]

        claimed = await self._open_writer().submit(claim)
        workflows, steps = await self._query(
            lambda journal: journal.load(me, claimed)) if claimed else ([], [])
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
            if await self._resume([(workflow_id, self._owner, True)]) or self._here(
                    workflow_id):
                return
            # Not claimed: another process took it (or it ended), or, on PostgreSQL,
            # its row was still locked (what failed the write) and the claim skipped it.
            row = await self._query(lambda journal: journal.state(workflow_id))
        except DurableError as exc:
            self._retry_later(workflow_id, exc)
            return
        if row is not None and row[0] in _UNFINISHED and row[1] == self._owner:
            self._retry_later(workflow_id, "its journal row was still locked")


# COMMAND LINE: python durable.py JOURNAL list|show|retry|cancel|send|prune


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


def _printable(text: str) -> str:
    r"""`text` for a terminal: control and other non-printable characters escaped (\x1b,
    \n, \u202e), so that journal text cannot clear the screen, fake a row or turn the
    rest of the line around."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(rows: list[list[str]]) -> str:
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def _error_text(error: dict[str, Any] | None) -> str:
    return _printable(f"{error.get('type')}: {error.get('message')}") if error else ""


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
        elif last.name.startswith("ctx.child:") and isinstance(last.result, dict):
            where = (f"waiting in step {last.seq} for child workflow "
                     f"{last.result.get('child')!r} since {_utc(last.started_at)} UTC")
        elif last.name.startswith("ctx.receive:"):
            until = (last.result or {}).get("until") if isinstance(last.result, dict) else None
            where = (f"waiting in step {last.seq} for a value under "
                     f"{last.name.partition(':')[2]!r} since {_utc(last.started_at)} UTC, "
                     + (f"until {_utc(until)} UTC ({max(0.0, until - time.time()):.1f}s "
                        "from now)" if until is not None else "with no time limit"))
        elif last.name == _SleepCall.name:
            where = f"sleeping in step {last.seq} until {_utc(last.result)} UTC " \
                    f"({max(0.0, last.result - time.time()):.1f}s from now)"
        else:
            where = f"running step {last.seq} {last.name!r}, attempt {last.attempts}, " \
                    f"for {time.time() - last.updated_at:.1f}s"
    return f"{_printable(where)}\n  held by: {_printable(_holder(status))}"


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
    lines = [_printable(f"workflow {status.id!r} ({status.name}): {status.state}"),
             f"  created   {_utc(status.created_at)} UTC"]
    if status.finished_at is not None:
        lines.append(f"  finished  {_utc(status.finished_at)} UTC "
                     f"(+{status.finished_at - status.created_at:.3f}s)")
    if status.state == "done":
        lines.append(_printable(f"  result    {_ENCODE(status.result)}"))
    if status.parent is not None:
        lines.append(_printable(f"  parent    {status.parent}"))
    if status.children:
        lines.append(_printable(f"  children  {', '.join(status.children)}"))
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
    received = [_printable(f"  step {step.seq}: {step.name.partition(':')[2]!r} = "
                           f"{_ENCODE(step.result)}")
                for step in status.steps
                if step.name.startswith("ctx.receive:") and step.state == "done"]
    if received:
        lines += ["", "  received", *received]
    lines += ["", f"  now: {_where_now(status)}"]
    return "\n".join(lines)


def _rendered(status: Status, as_json: bool) -> str:
    """What `show` prints. Rendering recurses (asdict, json.dumps, repr) and fails on a
    value that was just shallow enough to read: that fails like one too deep to read."""
    try:
        if as_json:
            return json.dumps(dataclasses.asdict(status), indent=2, ensure_ascii=False)
        return _show(status)
    except RecursionError:
        raise _too_deep(status.id) from None


def _command_line(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python durable.py",
        description="See and steer the workflows in a durable.py journal. Safe to use "
                    "while a service writes the same file.")
    parser.add_argument("journal", help="the journal: an SQLite file or a postgresql:// URL")
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
    send = commands.add_parser("send", help="send a JSON value to a workflow's ctx.receive(NAME)")
    send.add_argument("id")
    send.add_argument("name")
    send.add_argument("value", metavar="JSON")
    prune = commands.add_parser("prune", help="delete workflows finished longer ago than AGE")
    prune.add_argument("age", help="like 7d, 12h, 30m or 90s")
    for sub in (listing, show, retry, cancel, send, prune):
        sub.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "prune":
        try:
            age = _age(args.age)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "send":
        try:
            _check_name(args.name, "a message name")
            text = _dumps(_loads(args.value))
        except UnreadableRecord:
            parser.error(f"the value must be JSON, like '{{\"approved\": true}}' or '42', "
                         f"not {args.value!r}")
        except InvalidInput as exc:
            parser.error(str(exc))

    try:
        if not _is_url(args.journal) and not os.path.exists(args.journal):
            raise JournalError(f"no journal at {args.journal!r}")
        journal = _open_journal(args.journal, create=False)
    except DurableError as exc:
        print(f"durable: {_printable(str(exc))}", file=sys.stderr)
        return 1
    try:
        output: Any
        if args.command == "list":
            rows = journal.listing(args.state, args.limit)
            output = [{"id": r[0], "name": r[1], "state": r[2], "created_at": r[3],
                       "updated_at": r[4], "finished_at": r[5], "steps": r[6]} for r in rows]
            text = _table([["ID", "WORKFLOW", "STATE", "STEPS", "CREATED (UTC)", "TOOK"]] + [
                [w["id"], w["name"], w["state"], str(w["steps"]), _utc(w["created_at"]),
                 "" if w["finished_at"] is None
                 else f"{w['finished_at'] - w['created_at']:.3f}s"] for w in output
            ]) if output else "no workflows"
        elif args.command == "show":
            output, text = None, _rendered(_read_status(journal, args.id), args.json)
        elif args.command == "cancel":
            with journal.transaction():
                cancelled = _cancel(journal, args.id)
            output = {"id": args.id, "cancelled": bool(cancelled)}
            children = "" if len(cancelled) < 2 else \
                f" and {len(cancelled) - 1} unfinished child workflow(s)"
            text = f"cancelled workflow {args.id!r}{children}" if cancelled else \
                f"workflow {args.id!r} had finished already; nothing to cancel"
        elif args.command == "send":
            with journal.transaction():
                sent = _send(journal, args.id, args.name, text)
            output = {"id": args.id, "name": args.name, "sent": sent}
            text = (f"sent to workflow {args.id!r} under {args.name!r}; a service holding "
                    "it hands the value over within a second" if sent else
                    f"workflow {args.id!r} has this very value under {args.name!r} already; "
                    "nothing changed")
        elif args.command == "retry":
            with journal.transaction():
                seq = _retry(journal, args.id)
            output = {"id": args.id, "restarts_at_step": seq}
            where = f"step {seq}" if seq else "the top"
            text = (f"workflow {args.id!r} is pending again and restarts at {where}; a "
                    "running service that registers it picks it up within seconds, "
                    "otherwise the next one to start")
        else:
            cutoff, pruned = time.time() - age, 0
            while True:
                with journal.transaction():
                    deleted = _prune(journal, cutoff, 500)
                pruned += deleted
                if deleted < 500:
                    break
            output = {"pruned": pruned}
            text = f"pruned {pruned} finished workflow(s) older than {args.age}"
    except DurableError as exc:
        print(f"durable: {_printable(str(exc))}", file=sys.stderr)
        return 1
    except journal.failures as exc:
        print(f"durable: {journal.error('journal access failed', exc)}", file=sys.stderr)
        return 1
    finally:
        journal.close()
    try:
        # `show` renders its JSON itself (output None), to fail cleanly if it cannot.
        print(json.dumps(output, indent=2, ensure_ascii=False)
              if args.json and output is not None else text)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(_command_line())
