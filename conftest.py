"""Fixtures shared by the test files, so that no test file imports another.

- `db`, `rows`, `count`: a journal, and reading it from outside as another process
  would. A test taking `db` runs once per store: an SQLite file in the test's folder
  ([sqlite]) and a fresh schema on the PostgreSQL server DURABLE_TEST_POSTGRES names
  ([postgres]); one marked `sqlite_only` (files, pragmas, disks) only on the first.
  With no server reachable the [postgres] runs are skipped, or fail under CI=true.
- `fast`: a retry policy that tries three times without waiting.
- `lambda_free_workflow`: a one-step generator workflow around a function.
- `order`, `service`, `service_class`: the order service's example order, and
  `python app.py` on a free loopback port (`service` is stopped after the test).
- `route`: a workflow written once, run down each route durable.py can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from durable import Durable, RetryPolicy

HERE = Path(__file__).resolve().parent


# The journal, seen from outside.


POSTGRES = os.environ.get("DURABLE_TEST_POSTGRES",
                          "postgresql://postgres@127.0.0.1:5432/postgres")
STORES = ("sqlite", "postgres")
_postgres_down: list[str] = []  # why the server cannot be reached, once known


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: the test is about SQLite itself (files, pragmas, disks)")
    config.addinivalue_line(
        "markers", "postgres_only: the test is about PostgreSQL itself (its settings, locks)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        stores = (STORES[:1] if marked("sqlite_only") else
                  STORES[1:] if marked("postgres_only") else STORES)
        metafunc.parametrize("db", stores, indirect=True)


def _postgres_reason() -> str | None:
    """Why the test server cannot be reached (None: it can), asked once."""
    if not _postgres_down:
        import psycopg
        try:
            psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3).close()
            _postgres_down.append("")
        except psycopg.Error as exc:
            _postgres_down.append(str(exc).strip().splitlines()[0])
    return (f"no PostgreSQL server at {POSTGRES} ({_postgres_down[0]}): start one "
            "(make postgres) or set DURABLE_TEST_POSTGRES to run the [postgres] tests"
            ) if _postgres_down[0] else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Without a server, the [postgres] tests are left out with one line (below); under
    # CI=true they stay, and fail.
    on_postgres = [item for item in items if _store_of(item.nodeid) == "postgres"]
    if not on_postgres or os.environ.get("CI") == "true" or _postgres_reason() is None:
        return
    config.hook.pytest_deselected(items=on_postgres)
    items[:] = [item for item in items if item not in set(on_postgres)]
    config.stash[_LEFT_OUT] = len(on_postgres)


_LEFT_OUT = pytest.StashKey[int]()


def _store_of(nodeid: str) -> str | None:
    """The store a test ran on, from its id ("...[alone-postgres]"), if it took `db`."""
    ids = nodeid.rpartition("[")[2].rstrip("]").split("-") if nodeid.endswith("]") else []
    return next((store for store in STORES if store in ids), None)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    passed = Counter(_store_of(report.nodeid) for report in terminalreporter.stats.get(
        "passed", []) if report.when == "call")
    if passed:
        terminalreporter.write_line(
            "passed per store: " + ", ".join(f"{store} {passed[store]}" for store in STORES)
            + f", neither (no journal of their own) {passed[None]}")
    if config.stash.get(_LEFT_OUT, 0):
        terminalreporter.write_line(
            f"{config.stash[_LEFT_OUT]} [postgres] tests not run: {_postgres_reason()}")


def postgres_url(schema: str, base: str = POSTGRES) -> str:
    """`base` with its tables in `schema` (durable.py creates the schema)."""
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


def postgres_admin() -> Any:
    """A connection to the test server (autocommit), or a skip (a failure under CI)
    saying how to run the PostgreSQL tests."""
    import psycopg
    why = _postgres_reason()
    if why is None:
        try:
            return psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
        except psycopg.Error as exc:  # gone since
            why = str(exc)
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema's URL on the test server, dropped afterwards."""
    admin = postgres_admin()
    schema = f"t_{secrets.token_hex(6)}"
    admin.execute(f"CREATE SCHEMA {schema}")  # for the order service's tables too
    try:
        yield postgres_url(schema)
    finally:
        with contextlib.suppress(Exception):
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


@pytest.fixture
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The journal: a file path ([sqlite]) or a URL naming a fresh schema ([postgres])."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield tmp_path / "journal.db"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """Which store this test's `db` is: "sqlite" or "postgres"."""
    callspec = getattr(request.node, "callspec", None)
    return str(callspec.params.get("db", "sqlite")) if callspec else "sqlite"


def is_postgres(db: Any) -> bool:
    return isinstance(db, str) and db.startswith("postgresql://")


def _postgres_sql(sql: str) -> str:
    """A test's SQLite query as the PostgreSQL store names its tables."""
    sql = re.sub(r"\b(workflows|steps|owners|messages)\b(?!\()", r"durable_\1", sql)
    return sql.replace("%", "%%").replace("?", "%s")


def _rows(db: Any, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    if is_postgres(db):
        import psycopg
        with psycopg.connect(db, autocommit=True) as pg:
            cur = pg.execute(_postgres_sql(sql), params)
            return [tuple(row) for row in cur.fetchall()] if cur.description else []
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def _write_lock(db: Any) -> Iterator[str]:
    """Hold the journal's write lock as another process would: writes wait for it
    (and fail past busy_timeout), reads go on. Yields what the failure says."""
    if is_postgres(db):
        import psycopg
        with psycopg.connect(db, autocommit=True) as pg:
            pg.execute("BEGIN")
            pg.execute("LOCK TABLE durable_workflows, durable_steps, durable_owners "
                       "IN EXCLUSIVE MODE")
            try:
                yield "lock timeout"
            finally:
                pg.execute("ROLLBACK")
        return
    conn = sqlite3.connect(db, isolation_level=None, timeout=2)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield "database is locked"
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.fixture
def write_lock() -> Callable[[Any], contextlib.AbstractContextManager[str]]:
    """`with write_lock(db) as says:` holds the journal's write lock meanwhile."""
    return _write_lock


def _count(db: Any, table: str) -> int:
    return int(_rows(db, f"SELECT count(*) FROM {table}")[0][0])


@pytest.fixture
def rows() -> Callable[..., list[Any]]:
    """rows(db, sql, params=()): the rows of one query, from a connection of its own."""
    return _rows


@pytest.fixture
def count() -> Callable[[Any, str], int]:
    """count(db, table): how many rows the table holds."""
    return _count


@pytest.fixture
def fast() -> RetryPolicy:
    """A retry policy trying three times, without waiting in between."""
    return RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


def _lambda_free_workflow(step: Any) -> Any:
    def wf(ctx):
        return (yield ctx.run(step))
    return wf


@pytest.fixture
def lambda_free_workflow() -> Callable[[Any], Any]:
    """lambda_free_workflow(step): a generator workflow running `step` as its one step."""
    return _lambda_free_workflow


# The order service.


_ORDER: dict[str, Any] = {
    "id": "ord_1001",
    "customer": {"id": "cus_alice", "email": "alice@example.com"},
    "items": [{"sku": "widget-pro", "qty": 2, "price": 2999},
              {"sku": "widget-cable", "qty": 1, "price": 999}],
}


@pytest.fixture
def order() -> dict[str, Any]:
    """The contract's example order (a fresh copy for each test)."""
    return copy.deepcopy(_ORDER)


# A process "on another machine" gets a host name of its own, in a UTS namespace of its
# own (root only).
UNSHARE = shutil.which("unshare") if os.geteuid() == 0 else None


def on_machine(machine: str | None, command: list[str]) -> list[str] | None:
    """`command` run under host name `machine` (None: this machine's), or None where
    no namespace can be made."""
    if machine is None:
        return command
    if UNSHARE is None:
        return None
    return [UNSHARE, "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', machine, *command]


@pytest.fixture(scope="session")
def machine() -> Callable[[str | None, list[str]], list[str] | None]:
    """machine(name, command): the command as run on a machine of that name, or None
    where that cannot be done here."""
    return on_machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python app.py` on a free loopback port, with its files in one folder."""

    def __init__(self, folder: Path, journal: Any = None, machine: str | None = None) -> None:
        self.folder = folder
        self.journal = str(journal or "orders.db")  # a file in `folder`, or a URL
        self.machine = machine  # a host name of its own: as if on another machine
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def where(self) -> Any:
        """Its journal, to read or to give the command line: a path or a URL."""
        return self.journal if is_postgres(self.journal) else self.folder / self.journal

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "app.py")]

    def start(self, *, may_die: bool = False, **env: str) -> Service:
        """Start, and wait until it answers; with may_die, its dying first (CRASH_AT
        on a resumed workflow) ends the wait too."""
        log = self.folder / f"server-{self.port}-{len(self.logs)}.log"
        self.logs.append(log)
        command = on_machine(self.machine, self.command())
        if command is None:
            pytest.skip("a service on a machine of its own needs root and unshare(1)")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=self.folder, stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                     "DURABLE_DB": self.journal, **env},
            )
        deadline = time.monotonic() + 20
        while True:
            if may_die and self.proc.poll() is not None:
                return self
            assert self.proc.poll() is None, self.log()
            try:
                httpx.get(f"{self.url}/charges", timeout=1)
                return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_for_exit(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        kwargs.setdefault("timeout", 10)
        return httpx.post(f"{self.url}/orders", content=body, **kwargs)

    def status(self, order_id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/orders/{order_id}/status", timeout=10)

    def finished(self, order_id: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = dict(self.status(order_id).json())
            if body["status"] not in ("processing", "not_found"):
                return body
            assert time.monotonic() < deadline, (body, self.log())
            time.sleep(0.05)

    def charges(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/charges", timeout=10).json()["charges"])

    def stock(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/inventory", timeout=10).json()["stock"])


@pytest.fixture(scope="session")
def service_class() -> type[Service]:
    """The Service class, for a test that starts several, subclasses it, or keeps one
    for a whole module; `service_class(folder)`, then `.start(**env)`, `.stop()`."""
    return Service


@pytest.fixture
def service(tmp_path: Path, db: Any) -> Iterator[Service]:
    """A Service in the test's folder, not started yet; stopped after the test. Its
    journal is `db`'s store: orders.db in the folder, or the PostgreSQL schema."""
    svc = Service(tmp_path, db if is_postgres(db) else None)
    try:
        yield svc
    finally:
        svc.stop()


# Workflow forms: one body, written as a generator, registered in either form.


def _register_in(dur: Durable, form: str, body: Callable[..., Any], name: str = "wf") -> None:
    """Register generator function `body` (taking ctx) as workflow `name`: as it is
    ("generator"), or ("async") as an async def awaiting each call it yields and
    throwing in what the call raised; a yielded tuple of calls is awaited with
    asyncio.gather."""
    if form == "generator":
        dur.register(name=name)(body)
        return

    async def coroutine(ctx, *args):
        gen = body(ctx, *args)
        sent, thrown = None, None
        while True:
            try:
                call = gen.send(sent) if thrown is None else gen.throw(thrown)
            except StopIteration as stop:
                return stop.value
            try:
                sent = list(await asyncio.gather(*call)) if isinstance(call, tuple) \
                    else await call
                thrown = None
            except Exception as exc:
                sent, thrown = None, exc

    dur.register(name=name)(coroutine)


@pytest.fixture
def register_in() -> Callable[..., None]:
    """register_in(dur, form, body, name="wf"): `body`, a generator workflow, registered
    as a generator or as an async def ("generator" or "async")."""
    return _register_in


# Routes: one workflow, every path through durable.py.


ROUTES = ("alone", "beside", "crowded", "async")


class Route:
    """One of the routes a workflow takes through durable.py (see `route`).

    A test writes its workflow once, as a generator function taking ctx (``x = yield
    ctx.run(step, ...)``), and opens a Durable with `open`, which registers it under
    the name "wf" in this route's form and sets the scene:

    - alone: nothing else runs, so run() starts the generator in a step thread, which
      commits the insert and the checkpoints itself (Durable._run_at_once, then the
      step thread's driver: _go_on, _begin_here, _finish_here);
    - beside: another workflow is busy in a sync step (blocked on a threading.Event),
      so the workflow starts on the event loop; after each sync step that returns, its
      step thread runs the code on to the next step (_attempt, _go_on), queueing
      checkpoints to the writer thread;
    - crowded: max_threads=1 and two other workflows asleep (ctx.sleep), so more run
      than there are threads: every checkpoint is written from the loop and the code
      never leaves it (_threads_checkpoint is false);
    - async: the same body as an ``async def`` awaiting each ``ctx.run(...)``.

    Wherever durable.py resumes the workflow's code, the route notes the thread, and
    `check()` asserts that the route was really taken.
    """

    def __init__(self, name: str) -> None:
        assert name in ROUTES
        self.name = name
        # workflow id -> (session, thread name) for each stretch of its code, in order
        self.seen: dict[str, list[tuple[int, str]]] = {}
        self._session = 0
        self._gates: list[threading.Event] = []

    def __repr__(self) -> str:
        return f"Route({self.name!r})"

    @contextlib.asynccontextmanager
    async def open(self, path: Path, workflow: Callable[..., Any], *, name: str = "wf",
                   **settings: Any) -> AsyncIterator[Durable]:
        """`async with route.open(db, wf, **settings) as dur:` opens a Durable with `wf`
        registered as `name` in this route's form, and the route's other workflows
        already running; on the way out they are let go and the Durable is closed (a
        test may close it first, with its own grace)."""
        self._session += 1
        if self.name == "crowded":
            assert "max_threads" not in settings, "the crowded route sets max_threads"
            settings["max_threads"] = 1
        dur = Durable(path, **settings)
        dur.register(name=name)(self._form(workflow))
        gate, holding = threading.Event(), threading.Event()
        self._gates.append(gate)

        def hold_step() -> None:
            holding.set()
            gate.wait(30)

        def hold(ctx):
            yield ctx.run(hold_step)

        def nap(ctx):
            yield ctx.sleep(30)

        dur.register(name="route.hold")(hold)
        dur.register(name="route.nap")(nap)
        await dur.open()
        try:
            if self.name == "beside":
                await dur.run(f"route-hold-{self._session}", "route.hold")
                await _until(holding.is_set, "the holding workflow's step to start")
            elif self.name == "crowded":
                for i in (1, 2):
                    napping = await dur.run(f"route-nap-{self._session}-{i}", "route.nap")
                    deadline = time.monotonic() + 5
                    while not (await napping.status()).steps:  # its sleep is recorded
                        assert time.monotonic() < deadline, "a napping workflow did not start"
                        await asyncio.sleep(0.005)
            yield dur
        finally:
            gate.set()
            await dur.close()

    def _note(self, workflow_id: str) -> None:
        self.seen.setdefault(workflow_id, []).append(
            (self._session, threading.current_thread().name))

    def _form(self, body: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Any]:
        """`body` as this route's workflow function: a generator or an async def that
        drives it, sending in each step's result and throwing in what the step
        raised, as durable.py would into a generator or Python into a coroutine."""
        note = self._note
        if self.name == "async":
            @functools.wraps(body)
            async def coroutine(ctx, *args, **kwargs):
                gen = body(ctx, *args, **kwargs)
                sent, thrown = None, None
                while True:
                    note(ctx.id)
                    try:
                        call = gen.send(sent) if thrown is None else gen.throw(thrown)
                    except StopIteration as stop:
                        return stop.value
                    try:
                        sent, thrown = await call, None
                    except BaseException as exc:  # as `await ctx.run(...)` raises it
                        sent, thrown = None, exc
            return coroutine

        @functools.wraps(body)
        def generator(ctx, *args, **kwargs):
            gen = body(ctx, *args, **kwargs)
            sent, thrown = None, None
            while True:
                note(ctx.id)
                try:
                    call = gen.send(sent) if thrown is None else gen.throw(thrown)
                except StopIteration as stop:
                    return stop.value
                try:
                    sent, thrown = (yield call), None
                except GeneratorExit:  # durable.py closes it: close the body too
                    gen.close()
                    raise
                except BaseException as exc:  # StepFailed, thrown in by durable.py
                    sent, thrown = None, exc
        return generator

    def check(self, workflow_id: str = "w") -> None:
        """Assert that the workflow's code ran where this route runs it, in the first
        Durable that ran it (a restarted one resumes it from the loop on any route)."""
        seen = self.seen.get(workflow_id)
        assert seen, f"workflow {workflow_id!r} never ran on route {self.name!r}"
        threads = [thread for session, thread in seen if session == seen[0][0]]
        main = threading.main_thread().name
        in_step = [thread.startswith("durable-step-") for thread in threads]
        if self.name == "alone":
            assert in_step[0], f"alone, its code must start in a step thread: {threads}"
        elif self.name == "beside":
            assert threads[0] == main and any(in_step[1:]), (
                f"beside, its code must start on the loop and go on in a step thread "
                f"after a sync step: {threads}")
        else:
            assert set(threads) == {main}, (
                f"{self.name}, its code must run on the loop only: {threads}")

    def release(self) -> None:
        for gate in self._gates:
            gate.set()


async def _until(done: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture(params=ROUTES)
def route(request: pytest.FixtureRequest) -> Iterator[Route]:
    """Each route a workflow can take in durable.py; see Route."""
    taken = Route(request.param)
    try:
        yield taken
    finally:
        taken.release()  # no holding thread outlives the test
