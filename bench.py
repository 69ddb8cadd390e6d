"""bench.py: how fast durable.py is, each number next to a baseline from the same run.

    python bench.py                  # the full run (a few minutes): one table on stdout
    python bench.py --quick          # every scenario at tiny sizes, in seconds: a smoke test
    python bench.py --only postgres  # the PostgreSQL rows alone (7-10)
    python bench.py --only receive-all  # rows 9-10 (ctx.receive, ctx.all) on both stores

The machine may be shared and noisy, so every scenario is measured against a
baseline in the same run (alternating rounds, medians) and reports the ratio:
judge the ratios, not the absolute timings. Progress goes to stderr, the table to
stdout. All files live in a temporary directory that is removed at the end. The
HTTP row needs wrk (`apt-get install wrk`); without it the row says so and the
other rows still run.

Rows 7-8 run on the PostgreSQL server that --postgres names (default:
$DURABLE_BENCH_POSTGRES, else postgres@127.0.0.1:5432), each scenario in a schema of
its own, dropped afterwards; with no server answering they say so and the rest runs.
Row 8 compares DBOS Transact on the same server, in a child process and a database of
its own (dropped afterwards), when the dbos package is installed (`make bench`
installs it into the venv; durable.py never needs it); --quick never runs DBOS.

Rows 9-10 run on SQLite and on that server: workflows waiting in ctx.receive (threads
and RSS while they wait, in a child process of their own; then dur.send to all of
them) against plain workflows, and one ctx.all of many sync steps against as many
one-step workflows started at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import durable
from durable import Context, Durable

HERE = Path(__file__).resolve().parent

# SIZES: the full run and the smoke test run the same code at different sizes.


@dataclass(frozen=True, slots=True)
class Sizes:
    name: str
    rounds: int  # alternating baseline / durable.py rounds; medians are reported
    sequential: int  # workflows per sequential round
    concurrent: int  # workflows started together
    http_seconds: int  # wrk run per server and round
    recovery: int  # unfinished workflows left in the journal by a killed process
    memory: tuple[int, int, int]  # finished workflows at the RSS readings
    patience: float  # seconds to wait for workflows to finish before calling it a hang
    many: int  # workflows waiting in ctx.receive together (row 9); steps in one ctx.all (10)


FULL_RUN = Sizes("full", rounds=3, sequential=300, concurrent=1_000, http_seconds=10,
                 recovery=10_000, memory=(1_000, 50_000, 100_000), patience=600, many=10_000)
QUICK_RUN = Sizes("quick", rounds=1, sequential=20, concurrent=50, http_seconds=1,
                  recovery=200, memory=(100, 500, 1_000), patience=45, many=50)

STEPS = 4  # steps per benchmark workflow
WARMUP = 5  # workflows run before a clock starts: thread pool up, caches warm
BATCH = 1_000  # workflows started together when many are needed
WRK_THREADS, WRK_CONNECTIONS = 1, 32
POLL = 0.01  # seconds between looks at a journal from outside

# TABLE.


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table. `ratio` is durable.py against the baseline."""

    scenario: str
    durable: str
    baseline: str
    ratio: str
    goal: str = ""


def print_table(rows: list[Row], sizes: Sizes, postgres: str = "") -> None:
    header = Row("scenario", "durable.py", "baseline (same run)", "ratio", "goal")
    cells = [[r.scenario, r.durable, r.baseline, r.ratio, r.goal] for r in [header, *rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(5)]
    server = f", PostgreSQL {postgres}" if postgres else ""
    print(f"durable.py {durable.__version__} benchmark ({sizes.name} run): Python "
          f"{sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}{server}, "
          f"{os.cpu_count()} CPUs; rows 1-4 and 7-10 are medians of {sizes.rounds} alternating "
          "round(s); ratio: durable.py's time or size over the baseline's (lower is "
          "better), unless it says '% of' or 'rate' (higher is better)")
    for n, line in enumerate(cells):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
              + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def verdict(sizes: Sizes, text: str, met: bool) -> str:
    """The goal, and whether it was met (only a full run can tell)."""
    if sizes is QUICK_RUN:
        return text
    return f"{text}: {'met' if met else 'MISSED'}"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# MEASURING.


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float  # wall time of the whole run
    cpu: float  # process CPU seconds (every thread), from time.process_time()
    count: int  # workflows
    latencies: tuple[float, ...] = ()  # seconds per workflow, when they ran one by one

    @property
    def per_workflow(self) -> float:
        return self.seconds / self.count

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def median_timing(timings: list[Timing]) -> Timing:
    """The round with the median wall time, with every round's latencies."""
    middle = sorted(timings, key=lambda t: t.seconds)[(len(timings) - 1) // 2]
    latencies = tuple(x for t in timings for x in t.latencies)
    return Timing(middle.seconds, middle.cpu, middle.count, latencies)


def percentile(values: tuple[float, ...] | list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else ms(seconds)


def rss_kb() -> int:
    """This process's resident set, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wal_commits(path: str) -> int:
    """Commits in the journal's write-ahead log: frames of the current WAL generation
    whose header records a database size, which only a commit's last frame does.
    https://www.sqlite.org/fileformat.html#the_write_ahead_log"""
    try:
        data = Path(path + "-wal").read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 32:
        return 0
    frame = 24 + int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    commits = 0
    for offset in range(32, len(data) - frame + 1, frame):
        if data[offset + 8:offset + 16] != salts:
            break  # a frame left over from before the log was last restarted
        commits += int.from_bytes(data[offset + 4:offset + 8], "big") != 0
    return commits


# `watch` is an sqlite3 connection to an SQLite journal, or a psycopg one (autocommit) to
# a PostgreSQL journal, whose table is then "durable_workflows": the same SQL runs on both.


def unfinished(watch: Any, table: str = "workflows") -> int:
    return int(watch.execute(
        f"SELECT count(*) FROM {table} WHERE state IN ('pending', 'running')").fetchone()[0])


def last_finished_at(watch: Any, table: str = "workflows") -> float:
    return float(watch.execute(f"SELECT max(finished_at) FROM {table}").fetchone()[0])


async def until_finished(watch: Any, patience: float, table: str = "workflows") -> None:
    """Wait until the journal holds no unfinished workflow, looking from outside
    (a connection of our own), so the measured process does no extra work."""
    deadline = time.monotonic() + patience
    while unfinished(watch, table):
        if time.monotonic() > deadline:
            owners = watch.execute(f"SELECT owner, count(*) FROM {table} WHERE state IN "
                                   "('pending', 'running') GROUP BY owner").fetchall()
            raise RuntimeError(f"workflows still unfinished after {patience:g} s, by owner: "
                               f"{owners}")
        await asyncio.sleep(POLL)


# WORKFLOWS: four trivial sync steps, and a variant whose step 2 can hold forever.


def add_one(n: int) -> int:
    """A trivial sync step (durable.py runs it in a worker thread)."""
    return n + 1


def four_steps(ctx: Context, n: int) -> Generator[Any, Any, int]:
    for _ in range(STEPS):
        n = yield ctx.run(add_one, n)
    return n


_hold = {"forever": False}  # set in the process that is killed with its workflows in step 2
_resumed: list[float] = []  # perf_counter() each time `hold` ran without holding


async def hold(n: int) -> int:
    """Step 2 of `held_steps`: waits forever in the doomed process, else returns at once."""
    if _hold["forever"]:
        await asyncio.Event().wait()
    _resumed.append(time.perf_counter())
    return n + 1


def held_steps(ctx: Context, n: int) -> Generator[Any, Any, int]:
    n = yield ctx.run(add_one, n)
    n = yield ctx.run(hold, n)
    n = yield ctx.run(add_one, n)
    n = yield ctx.run(add_one, n)
    return n


def journal(path: Path | str, synchronous: str = "FULL",
            workflow: Callable[..., Any] = four_steps) -> Durable:
    """A Durable on an SQLite file, or on a postgresql:// URL."""
    dur = Durable(path, synchronous=synchronous)
    dur.register(workflow)
    return dur


async def start_all(dur: Durable, workflow: Callable[..., Any], prefix: str, count: int) -> None:
    """run() `count` workflows at once, BATCH by BATCH; returns when all are recorded."""
    for first in range(0, count, BATCH):
        await asyncio.gather(*(dur.run(f"{prefix}-{i}", workflow, i)
                               for i in range(first, min(first + BATCH, count))))


# FLOOR: plain sqlite3 making the commits durable.py makes, and nothing else.
# The floor does not copy durable.py's SQL: it records the statements durable.py
# executes for one workflow (through a sqlite3.Connection subclass) and replays them,
# so it follows every change to the schema or the statements.

Statement = tuple[str, tuple[Any, ...]]


class _Recording(sqlite3.Connection):
    """A connection that notes each statement it executes, with its parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[Statement] = []

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.statements.append((sql, tuple(parameters)))
        return super().execute(sql, parameters)


class _Counting(sqlite3.Connection):
    """A connection that counts the write transactions it commits (nothing else)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits, self._writing = 0, False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if sql.startswith("BEGIN IMMEDIATE"):
            self._writing = True
        elif sql in ("COMMIT", "ROLLBACK"):
            self.commits += self._writing and sql == "COMMIT"
            self._writing = False
        return super().execute(sql, parameters)


@contextlib.contextmanager
def recording(connections: list[Any], factory: type[sqlite3.Connection] = _Recording
              ) -> Iterator[None]:
    """Connections opened meanwhile (durable.py's own) record what they execute (or,
    with factory=_Counting, count their commits)."""
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(*args, **kwargs, factory=factory)
        connections.append(conn)  # type: ignore[arg-type]
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]
    try:
        yield
    finally:
        sqlite3.connect = real  # type: ignore[assignment]


def write_transactions(statements: list[Statement]) -> list[list[Statement]]:
    """The write transactions among recorded statements, without BEGIN and COMMIT and
    without durable.py's per-operation savepoints (its bookkeeping, not the data)."""
    transactions: list[list[Statement]] = []
    current: list[Statement] | None = None
    for sql, params in statements:
        head = " ".join(sql.split()).upper()
        if head.startswith("BEGIN IMMEDIATE"):
            current = []
        elif head == "COMMIT" and current is not None:
            transactions.append(current)
            current = None
        elif current is not None and not head.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            current.append((sql, params))
    return transactions


@dataclass(frozen=True, slots=True)
class Template:
    """What durable.py commits for one sequential `four_steps` workflow."""

    workflow_id: str
    transactions: list[list[Statement]]  # one list of statements per commit
    wal_commits: float  # commits per workflow as counted in the WAL file
    changes: float  # rows inserted or updated per workflow

    def for_workflow(self, wf_id: str) -> list[list[Statement]]:
        return [[(sql, tuple(wf_id if p == self.workflow_id else p for p in params))
                 for sql, params in transaction] for transaction in self.transactions]


async def learn_commits(path: Path, count: int = 10) -> Template:
    """Run `count` workflows one by one, recording durable.py's statements, and count
    their commits twice: by the recorded transactions and by the commit frames in the
    WAL (few enough workflows that no checkpoint restarts the log meanwhile)."""
    connections: list[_Recording] = []
    dur = journal(path)
    with recording(connections):
        await dur.open()
    try:
        await (await dur.run("warm", four_steps, 0)).result()
        for conn in connections:
            conn.statements.clear()
        before = wal_commits(str(path)), sum(c.total_changes for c in connections)
        for i in range(count):
            await (await dur.run(f"template-{i}", four_steps, i)).result()
        in_wal = (wal_commits(str(path)) - before[0]) / count
        changes = (sum(c.total_changes for c in connections) - before[1]) / count
        transactions = [t for conn in connections for t in write_transactions(conn.statements)]
    finally:
        await dur.close()
    mine = [t for t in transactions if any("template-0" in params for _, params in t)]
    if not mine or len(transactions) != len(mine) * count:
        raise RuntimeError(f"{len(transactions)} transactions for {count} workflows, "
                           f"{len(mine)} for the first: the workflows shared commits")
    return Template("template-0", mine, in_wal, changes)


async def create_journal(path: Path | str) -> None:
    """An empty journal, schema made by durable.py itself."""
    async with Durable(path):
        pass


def floor_connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A plain connection with the pragmas durable.py sets: WAL, `synchronous`, and
    foreign keys (they cost a lookup per step row)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def floor(path: Path, synchronous: str, template: Template, count: int,
          together: int) -> Timing:
    """`count` workflows' commits replayed, `together` workflows sharing each commit (as
    durable.py's group commit would at best); together=1 is one after another."""
    asyncio.run(create_journal(path))
    latencies: list[float] = []
    with contextlib.closing(floor_connect(path, synchronous)) as conn:
        changes = conn.total_changes
        cpu, start = time.process_time(), time.perf_counter()
        for first in range(0, count, together):
            began = time.perf_counter()
            plans = [template.for_workflow(f"floor-{i}")
                     for i in range(first, min(first + together, count))]
            for k in range(len(template.transactions)):
                conn.execute("BEGIN IMMEDIATE")
                for plan in plans:
                    for sql, params in plan[k]:
                        conn.execute(sql, params)
                conn.execute("COMMIT")
            latencies.append(time.perf_counter() - began)
        timing = Timing(time.perf_counter() - start, time.process_time() - cpu, count,
                        tuple(latencies) if together == 1 else ())
        # A replay that no longer matches (say, a fence now checks a clock) must not
        # pass for a floor: it would change fewer rows than durable.py did.
        if conn.total_changes - changes != count * template.changes:
            raise RuntimeError(f"the floor changed {conn.total_changes - changes} rows for "
                               f"{count} workflows; durable.py changed {template.changes:g} "
                               "per workflow")
        return timing


# SCENARIOS 1 AND 2: sequential workflows against the floor.


async def durable_sequential(path: Path | str, synchronous: str, count: int) -> Timing:
    """One workflow at a time: latency is run() until result() returns."""
    async with journal(path, synchronous) as dur:
        for i in range(WARMUP):
            await (await dur.run(f"warm-{i}", four_steps, i)).result()
        latencies: list[float] = []
        cpu, start = time.process_time(), time.perf_counter()
        for i in range(count):
            began = time.perf_counter()
            await (await dur.run(f"seq-{i}", four_steps, i)).result()
            latencies.append(time.perf_counter() - began)
        return Timing(time.perf_counter() - start, time.process_time() - cpu, count,
                      tuple(latencies))


def bench_sequential(folder: Path, sizes: Sizes, template: Template) -> list[Row]:
    progress("1-2/10: sequential workflows against the sqlite3 floor")
    commits = len(template.transactions)
    if template.wal_commits != commits:
        progress(f"WARNING: {commits} write transactions per workflow recorded, but "
                 f"{template.wal_commits:g} commits counted in the WAL")
    floors: dict[str, list[Timing]] = {"FULL": [], "NORMAL": []}
    durables: dict[str, list[Timing]] = {"FULL": [], "NORMAL": []}
    for r in range(sizes.rounds):
        for sync in ("FULL", "NORMAL"):
            floors[sync].append(floor(folder / f"floor-{sync}-{r}.db", sync, template,
                                      sizes.sequential, 1))
            durables[sync].append(asyncio.run(
                durable_sequential(folder / f"seq-{sync}-{r}.db", sync, sizes.sequential)))
    rows = []
    base, mine = median_timing(floors["FULL"]), median_timing(durables["FULL"])
    ratio = mine.per_workflow / base.per_workflow
    rows.append(Row(
        "1 floor: sequential 4-step, FULL",
        f"{ms(mine.per_workflow)}/wf; {commits} commits/wf ({template.wal_commits:g} in the WAL)",
        f"sqlite3, the same {commits} commits: {ms(base.per_workflow)}/wf",
        f"{ratio:.2f}x", verdict(sizes, "<= 1.5x", ratio <= 1.5)))
    for sync in ("FULL", "NORMAL"):
        base, mine = median_timing(floors[sync]), median_timing(durables[sync])
        rows.append(Row(
            f"2 sequential 4-step, {sync}",
            f"{mine.rate:,.0f} wf/s, p50 {ms(percentile(mine.latencies, 50))}, "
            f"p99 {ms(percentile(mine.latencies, 99))}",
            f"floor: {base.rate:,.0f} wf/s, p50 {ms(percentile(base.latencies, 50))}, "
            f"p99 {ms(percentile(base.latencies, 99))}",
            f"{mine.per_workflow / base.per_workflow:.2f}x"))
    return rows


# SCENARIO 3: many concurrent workflows against the group-commit floor.


async def durable_concurrent(path: Path, synchronous: str, count: int,
                             patience: float) -> Timing:
    """`count` workflows started at once: from the first run() until the journal
    records the last one finished (no result() calls: the service's case)."""
    async with journal(path, synchronous) as dur:
        with contextlib.closing(sqlite3.connect(path)) as watch:
            await start_all(dur, four_steps, "warm", WARMUP)
            await until_finished(watch, patience)
            cpu, wall = time.process_time(), time.time()
            await start_all(dur, four_steps, "con", count)
            await until_finished(watch, patience)
            cpu = time.process_time() - cpu
            return Timing(last_finished_at(watch) - wall, cpu, count)


def bench_concurrent(folder: Path, sizes: Sizes, template: Template) -> list[Row]:
    progress(f"3/10: {sizes.concurrent:,} concurrent workflows against the group-commit floor")
    rows = []
    for sync in ("FULL", "NORMAL"):
        floors, durables = [], []
        for r in range(sizes.rounds):
            floors.append(floor(folder / f"cfloor-{sync}-{r}.db", sync, template,
                                sizes.concurrent, sizes.concurrent))
            durables.append(asyncio.run(
                durable_concurrent(folder / f"con-{sync}-{r}.db", sync, sizes.concurrent,
                                   sizes.patience)))
        base, mine = median_timing(floors), median_timing(durables)
        cpu_ms = mine.cpu / mine.count * 1000
        goal = ""
        if sync == "FULL":
            goal = verdict(sizes, ">= 2,000 wf/s and <= 0.5 ms CPU/wf",
                           mine.rate >= 2000 and cpu_ms <= 0.5)
        rows.append(Row(
            f"3 {sizes.concurrent:,} concurrent 4-step, {sync}",
            f"{mine.rate:,.0f} wf/s, {mine.rate * STEPS:,.0f} steps/s, {cpu_ms:.3f} ms CPU/wf",
            f"floor, {len(template.transactions)} group commits: {base.rate:,.0f} wf/s, "
            f"{base.cpu / base.count * 1000:.3f} ms CPU/wf",
            f"{mine.per_workflow / base.per_workflow:.2f}x", goal))
    return rows


# SCENARIO 4: HTTP, app.py against a bare Starlette endpoint, under wrk.

ORDER_BODY = ('{"id": "%s", "customer": {"id": "cus_alice", "email": "alice@example.com"}, '
              '"items": [{"sku": "widget-pro", "qty": 2, "price": 2999}, '
              '{"sku": "widget-cable", "qty": 1, "price": 999}]}')

BARE_APP = '''\
"""POST /orders without durable.py: the same 202 body, nothing journaled (bench.py)."""

import json

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def create_order(request):
    order = json.loads(await request.body())
    return JSONResponse({"status": "accepted", "orderId": order["id"],
                         "statusUrl": f"/orders/{order['id']}/status"}, status_code=202)


app = Starlette(routes=[Route("/orders", create_order, methods=["POST"])])
'''

WRK_SCRIPT = '''\
-- bench.py: every request POSTs an order under an id never used before.
local threads = 0
local counter = 0
local prefix = "order"

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  prefix = (args[1] or "run") .. "-" .. tostring(thread_number)
end

function request()
  counter = counter + 1
  local body = string.format([[@BODY@]], prefix .. "-" .. counter)
  return wrk.format("POST", "/orders", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\\n",
    summary.requests, summary.duration, math.floor(latency:percentile(50)),
    math.floor(latency:percentile(99)), e.connect + e.read + e.write + e.timeout, e.status))
end
'''.replace("@BODY@", ORDER_BODY)


@dataclass(frozen=True, slots=True)
class Http:
    rate: float  # accepted requests per second
    p50: float  # seconds
    p99: float
    finished: float = 0.0  # orders the service finished per second meanwhile (app.py)


def finished_rate(journal: Path, start: float, end: float) -> float:
    """Workflows the journal records as finished between `start` and `end`, per second."""
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM workflows WHERE state = 'done' "
                                "AND finished_at BETWEEN ? AND ?", (start, end)).fetchone()
    return count / (end - start)


@contextlib.contextmanager
def server(folder: Path, module: str, app_dir: Path) -> Iterator[str]:
    """uvicorn serving `module:app` on a free loopback port; yields its URL. Both servers
    run with the same options, the access log off (its cost is not durable.py's)."""
    folder.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"{module}:app", "--app-dir", str(app_dir),
             "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
             "--log-level", "warning"],
            cwd=folder, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "DURABLE_DB": str(folder / "orders.db")})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited at start:\n{log.read_text()[-2000:]}")
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{module} did not start:\n{log.read_text()[-2000:]}") from exc
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(url: str, script: Path, seconds: int, tag: str) -> Http:
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s",
               "-s", str(script), url, "--", tag]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60,
                         check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH line:\n{out}")
    f = {k: int(v) for k, v in (field.split("=") for field in line.split()[1:])}
    if f["errors"] or f["non2xx"]:
        raise RuntimeError(f"wrk saw {f['errors']} socket errors and {f['non2xx']} "
                           f"non-2xx answers from {url}:\n{out}")
    return Http(f["requests"] / (f["duration_us"] / 1e6), f["p50_us"] / 1e6, f["p99_us"] / 1e6)


def httpx_posts(url: str, count: int, tag: str) -> Http:
    """A few sequential POSTs: a smoke test of the HTTP path when wrk is absent."""
    latencies = []
    with httpx.Client(base_url=url) as client:
        start = time.perf_counter()
        for i in range(count):
            began = time.perf_counter()
            response = client.post("/orders", content=ORDER_BODY % f"{tag}-{i}",
                                   headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - began)
            if response.status_code != 202:
                raise RuntimeError(f"POST /orders answered {response.status_code}: "
                                   f"{response.text}")
        seconds = time.perf_counter() - start
    return Http(count / seconds, percentile(latencies, 50), percentile(latencies, 99))


def bench_http(folder: Path, sizes: Sizes) -> list[Row]:
    progress("4/10: POST /orders, app.py against a bare Starlette endpoint")
    scenario = "4 HTTP POST /orders"
    have_wrk = shutil.which("wrk") is not None
    if not have_wrk and sizes is not QUICK_RUN:
        progress("wrk not found: apt-get install wrk (skipping the HTTP row)")
        return [Row(scenario, "skipped: wrk not found: apt-get install wrk", "", "")]
    folder.mkdir()
    (folder / "bare_app.py").write_text(BARE_APP)
    script = folder / "orders.lua"
    script.write_text(WRK_SCRIPT)
    results: dict[str, list[Http]] = {"bare": [], "app": []}
    for r in range(sizes.rounds):
        for kind, module, app_dir in (("bare", "bare_app", folder), ("app", "app", HERE)):
            with server(folder / f"{kind}-{r}", module, app_dir) as url:
                start = time.time()
                if have_wrk:
                    if sizes is not QUICK_RUN:
                        wrk(url, script, 2, f"warm{r}")  # warm up: not counted
                        start = time.time()
                    http = wrk(url, script, sizes.http_seconds, f"run{r}")
                else:
                    http = httpx_posts(url, 20, f"run{r}")
                if kind == "app":
                    done = finished_rate(folder / f"{kind}-{r}" / "orders.db", start, time.time())
                    http = dataclasses.replace(http, finished=done)
                results[kind].append(http)
    if have_wrk:
        how = f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} {sizes.http_seconds}s"
    else:
        how = "wrk not found: apt-get install wrk; 20 sequential httpx POSTs"
    bare, app = (sorted(results[k], key=lambda h: h.rate)[(sizes.rounds - 1) // 2]
                 for k in ("bare", "app"))
    share = app.rate / bare.rate
    return [Row(
        f"{scenario} ({how})",
        f"app.py: {app.rate:,.0f} req/s, p50 {ms(app.p50)}, p99 {ms(app.p99)}; "
        f"{app.finished:,.0f} orders finished/s meanwhile",
        f"bare Starlette: {bare.rate:,.0f} req/s, p50 {ms(bare.p50)}, p99 {ms(bare.p99)}",
        f"{share:.0%} of bare", verdict(sizes, ">= 50% of bare", share >= 0.5))]


# SCENARIO 5: recovery of unfinished workflows left by a process killed with SIGKILL.

_FLOOR_OWNER = "bench|0|0|floor"


async def crash_child(path: Path, count: int) -> None:
    """In the doomed child: start `count` workflows that all stop in step 2, then wait
    for the parent's SIGKILL."""
    _hold["forever"] = True
    async with journal(path, "NORMAL", held_steps) as dur:
        await start_all(dur, held_steps, "held", count)
        await asyncio.Event().wait()


def leave_unfinished(path: Path, count: int) -> None:
    """Run `count` held workflows in a child until each has journaled step 2, then
    kill the child with SIGKILL."""
    log = path.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--crash-child", str(path),
                                 str(count)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the crash child exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(sqlite3.Error):  # not created yet
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                with contextlib.closing(conn):
                    held = conn.execute("SELECT count(*) FROM steps WHERE seq = 2").fetchone()[0]
                if held == count:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the crash child did not reach step 2 in time")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def durable_recovery(path: Path, count: int,
                           patience: float) -> tuple[float, float, float]:
    """Seconds from open() until open() returns, until every workflow has resumed
    (journaled step 2's next attempt and run it), and until every one is done."""
    _resumed.clear()
    dur = journal(path, workflow=held_steps)
    wall, start = time.time(), time.perf_counter()
    await dur.open()
    try:
        opened = time.perf_counter() - start
        with contextlib.closing(sqlite3.connect(path)) as watch:
            await until_finished(watch, patience)
            done = last_finished_at(watch) - wall
    finally:
        await dur.close()
    if len(_resumed) != count:
        raise RuntimeError(f"{len(_resumed)} of {count} workflows resumed")
    return opened, max(_resumed) - start, done


def floor_recovery(path: Path) -> float:
    """Plain sqlite3, one transaction: claim every unfinished workflow with one UPDATE,
    read them and their steps, and journal one more attempt of step 2 for each: the
    least SQL a resume needs, written against the journal's tables."""
    with contextlib.closing(floor_connect(path, "FULL")) as conn:
        start = time.perf_counter()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE workflows SET owner = ?, updated_at = ? "
                     "WHERE state IN ('pending', 'running')", (_FLOOR_OWNER, now))
        workflows = conn.execute("SELECT * FROM workflows WHERE owner = ? "
                                 "AND state IN ('pending', 'running')",
                                 (_FLOOR_OWNER,)).fetchall()
        conn.execute("SELECT s.* FROM steps s JOIN workflows w ON w.id = s.workflow_id "
                     "WHERE w.owner = ? AND w.state IN ('pending', 'running')",
                     (_FLOOR_OWNER,)).fetchall()
        conn.executemany("UPDATE steps SET attempts = attempts + 1, updated_at = ? "
                         "WHERE workflow_id = ? AND seq = 2",
                         [(now, row[0]) for row in workflows])
        conn.execute("COMMIT")
        return time.perf_counter() - start


async def durable_fresh(path: Path, count: int, patience: float) -> float:
    """Seconds from the first run() until `count` new held_steps workflows are done."""
    async with journal(path, workflow=held_steps) as dur:
        with contextlib.closing(sqlite3.connect(path)) as watch:
            wall = time.time()
            await start_all(dur, held_steps, "fresh", count)
            await until_finished(watch, patience)
            return last_finished_at(watch) - wall


def bench_recovery(folder: Path, sizes: Sizes) -> list[Row]:
    count = sizes.recovery
    progress(f"5/10: recovery of {count:,} workflows left unfinished by a SIGKILL")
    folder.mkdir()
    crashed = folder / "crashed.db"
    leave_unfinished(crashed, count)
    copy = folder / "floor.db"
    for suffix in ("", "-wal"):
        if Path(f"{crashed}{suffix}").exists():
            shutil.copyfile(f"{crashed}{suffix}", f"{copy}{suffix}")
    base_resume = floor_recovery(copy)
    opened, resumed, done = asyncio.run(durable_recovery(crashed, count, sizes.patience))
    base_done = asyncio.run(durable_fresh(folder / "fresh.db", count, sizes.patience))
    return [
        Row(f"5 recovery of {count:,}: open() -> all resumed",
            f"{secs(resumed)} (open() returned after {secs(opened)})",
            f"sqlite3 claim + load + journal attempts: {secs(base_resume)}",
            f"{resumed / base_resume:.2f}x", verdict(sizes, "<= 2 s", resumed <= 2)),
        Row(f"5 recovery of {count:,}: open() -> all done",
            secs(done),
            f"{count:,} new workflows, run() -> all done: {secs(base_done)}",
            f"{done / base_done:.2f}x"),
    ]


# SCENARIO 6: journal bytes per step, and memory after many finished workflows.


async def memory_child(path: Path, marks: list[int], patience: float = 600) -> None:
    """In a fresh child: finish workflows BATCH by BATCH; at each mark, checkpoint the
    WAL and print a JSON line with RSS, the file's size and its VACUUMed size."""
    async with journal(path) as dur:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as watch:
            watch.execute("PRAGMA cache_size = -64")  # keep the watcher's pages out of RSS
            finished = 0
            for mark in marks:
                while finished < mark:
                    batch = min(BATCH, mark - finished)
                    await start_all(dur, four_steps, f"m{finished}", batch)
                    await until_finished(watch, patience)
                    finished += batch
                if watch.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                    raise RuntimeError("the WAL checkpoint could not complete")
                gc.collect()
                reading = {"finished": finished, "rss_kb": rss_kb(), "bytes": path.stat().st_size}
                compact = path.with_name("compact.db")
                with contextlib.closing(sqlite3.connect(path)) as conn:  # after the RSS reading
                    conn.execute("VACUUM INTO ?", (str(compact),))
                print(json.dumps({**reading, "compact": compact.stat().st_size}), flush=True)
                compact.unlink()


def bench_memory(folder: Path, sizes: Sizes) -> list[Row]:
    low, middle, high = sizes.memory
    progress(f"6/10: journal bytes per step; RSS after {low:,} to {high:,} finished workflows")
    folder.mkdir()
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(folder / "mem.db"),
                          *map(str, sizes.memory)], capture_output=True, text=True, check=True,
                         timeout=1800).stdout
    first, half, last = (json.loads(line) for line in out.splitlines()[-3:])
    steps = (last["finished"] - first["finished"]) * STEPS
    per_step = (last["bytes"] - first["bytes"]) / steps
    compact = (last["compact"] - first["compact"]) / steps
    growth = last["rss_kb"] / first["rss_kb"]
    return [
        Row("6 journal bytes per step",
            f"{per_step:,.0f} B/step (file growth {low:,} -> {high:,} workflows, "
            "after a checkpoint)",
            f"same journal VACUUMed: {compact:,.0f} B/step", f"{per_step / compact:.2f}x"),
        Row(f"6 RSS after {low:,} vs {high:,} finished",
            f"{last['rss_kb'] / 1024:.1f} MB after {high:,} "
            f"({half['rss_kb'] / 1024:.1f} MB after {middle:,})",
            f"{first['rss_kb'] / 1024:.1f} MB after {low:,}",
            f"{growth:.2f}x", verdict(sizes, "flat (<= 1.10x)", growth <= 1.10)),
    ]


# SCENARIO 7: the same workflows on durable.py's PostgreSQL store, against a psycopg floor.
# As with SQLite, the floor does not copy durable.py's SQL: it replays the statements
# durable.py's own connections executed (recorded through a psycopg.Connection
# subclass), one after another on one plain connection, each transaction as BEGIN, the
# statements, COMMIT. Every scenario gets a fresh schema, dropped afterwards.

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DBOS_VERSION = "3.4.0"  # what `make bench` installs; bench.py runs whichever is there

# (sql, parameters, rows it changed or returned), as one connection executed it.
PgStatement = tuple[str, tuple[Any, ...], int]


def pg_schema_url(base: str, schema: str) -> str:
    """`base` with its tables in `schema` (durable.py creates the schema), its
    connections named durable-bench (durable.py keeps a name the URL gives): other
    clients of a shared server that end durable.py's connections (test_postgres.py
    does) leave the benchmark's alone."""
    return (f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
            "&application_name=durable-bench")


def pg_connect(url: str) -> Any:
    import psycopg
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


def postgres_down(base: str) -> str | None:
    """Why the server at `base` cannot be used, or None when it can."""
    try:
        import psycopg
    except ImportError:
        return 'psycopg is not installed (pip install "psycopg[binary]")'
    try:
        with contextlib.closing(pg_connect(base)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"cannot use PostgreSQL at {redacted(base)}: {str(exc).strip().splitlines()[0]}"
    return None


def redacted(url: str) -> str:
    """`url` without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def postgres_version(base: str) -> str:
    with contextlib.closing(pg_connect(base)) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]


@contextlib.contextmanager
def pg_schema(base: str, tag: str) -> Iterator[str]:
    """The URL of a schema of its own on the server (made by whoever connects first),
    dropped with everything in it afterwards."""
    schema = f"durable_bench_{tag}_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        yield pg_schema_url(base, schema)
    finally:
        with contextlib.closing(pg_connect(base)) as admin:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def pg_recording(statements: list[tuple[int, str, tuple[Any, ...], int]]) -> Iterator[None]:
    """Connections opened meanwhile (durable.py's own, through psycopg.connect) note each
    statement they execute: (connection, sql, parameters, rows changed or returned)."""
    import psycopg

    class Recording(psycopg.Connection):  # type: ignore[type-arg]
        def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                    binary: bool = False) -> Any:
            cur = super().execute(query, params, prepare=prepare, binary=binary)
            statements.append((id(self), str(query), tuple(params or ()), cur.rowcount))
            return cur

    real = psycopg.connect
    psycopg.connect = Recording.connect  # type: ignore[assignment]
    try:
        yield
    finally:
        psycopg.connect = real  # type: ignore[assignment]


def pg_transactions(statements: list[tuple[int, str, tuple[Any, ...], int]]
                    ) -> list[list[PgStatement]]:
    """The committed write transactions among recorded statements, each connection's
    apart, in the order they committed, without their BEGIN (durable.py's asks the
    server for the transaction's id in the same round trip) and COMMIT. Read-only
    snapshots and rolled-back transactions are left out: they are no commits."""
    open_: dict[int, list[PgStatement] | None] = {}
    transactions: list[list[PgStatement]] = []
    for conn, sql, params, rows in statements:
        head = " ".join(sql.split()).upper()
        if head.startswith("BEGIN"):
            open_[conn] = None if "READ ONLY" in head else []
        elif head == "COMMIT":
            current = open_.pop(conn, None)
            if current is not None:
                transactions.append(current)
        elif head == "ROLLBACK":
            open_.pop(conn, None)
        elif (current := open_.get(conn)) is not None:
            current.append((sql, params, rows))
    return transactions


def _swap(value: Any, old: str, new: str) -> Any:
    if value == old:
        return new
    if isinstance(value, list):
        return [new if item == old else item for item in value]
    return value


def _mentions(transaction: list[PgStatement], wf_id: str) -> bool:
    return any(p == wf_id or (isinstance(p, list) and wf_id in p)
               for _, params, _ in transaction for p in params)


@dataclass(frozen=True, slots=True)
class PgTemplate:
    """What durable.py commits on PostgreSQL for one sequential `four_steps` workflow."""

    workflow_id: str
    transactions: list[list[PgStatement]]  # one list of statements per commit
    xids: float  # transaction ids the server handed out per workflow (a check on the count)
    round_trips: float  # statements durable.py's connections executed per workflow
    rows: float  # rows the commits' statements changed or returned, per workflow

    def for_workflow(self, wf_id: str) -> list[list[PgStatement]]:
        return [[(sql, tuple(_swap(p, self.workflow_id, wf_id) for p in params), rows)
                 for sql, params, rows in transaction] for transaction in self.transactions]


def next_xid(conn: Any) -> int:
    """The next transaction id the server will hand out (asking assigns none)."""
    return int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
               .fetchone()[0])


async def learn_pg_commits(url: str, count: int = 10) -> PgTemplate:
    """Run `count` workflows one by one, recording durable.py's statements, and count
    their commits twice: by the recorded transactions and by the transaction ids the
    server handed out meanwhile (more if another client wrote to the server then)."""
    statements: list[tuple[int, str, tuple[Any, ...], int]] = []
    dur = journal(url)
    with pg_recording(statements):
        await dur.open()
    try:
        with contextlib.closing(pg_connect(url)) as watch:
            await (await dur.run("warm", four_steps, 0)).result()
            statements.clear()
            xid = next_xid(watch)
            for i in range(count):
                await (await dur.run(f"template-{i}", four_steps, i)).result()
            xids = (next_xid(watch) - xid) / count
            recorded = list(statements)
    finally:
        await dur.close()
    transactions = [t for t in pg_transactions(recorded)
                    if any(_mentions(t, f"template-{i}") for i in range(count))]
    mine = [t for t in transactions if _mentions(t, "template-0")]
    if not mine or len(transactions) != len(mine) * count:
        raise RuntimeError(f"{len(transactions)} transactions for {count} workflows, "
                           f"{len(mine)} for the first: the workflows shared commits")
    rows = sum(r for t in mine for _, _, r in t)
    return PgTemplate("template-0", mine, xids, len(recorded) / count, rows)


def pg_floor_connect(url: str) -> Any:
    """A plain connection (autocommit: each transaction is an explicit BEGIN ... COMMIT)
    with the synchronous_commit durable.py sets for FULL: COMMIT returns once durable."""
    conn = pg_connect(url)
    conn.execute("SET synchronous_commit = on")
    return conn


def pg_replay(conn: Any, transactions: list[list[PgStatement]]) -> int:
    """Commit `transactions` one after another; the rows their statements touched."""
    rows = 0
    for transaction in transactions:
        conn.execute("BEGIN", prepare=False)
        for sql, params, _ in transaction:
            rows += conn.execute(sql, params).rowcount
        conn.execute("COMMIT", prepare=False)
    return rows


def pg_floor_sequential(url: str, template: PgTemplate, count: int) -> Timing:
    """`count` workflows' commits replayed one workflow after another."""
    asyncio.run(create_journal(url))
    latencies: list[float] = []
    rows = 0
    with contextlib.closing(pg_floor_connect(url)) as conn:
        for i in range(WARMUP):  # as durable.py's: connection and server caches warm
            pg_replay(conn, template.for_workflow(f"warm-{i}"))
        cpu, start = time.process_time(), time.perf_counter()
        for i in range(count):
            began = time.perf_counter()
            rows += pg_replay(conn, template.for_workflow(f"floor-{i}"))
            latencies.append(time.perf_counter() - began)
        timing = Timing(time.perf_counter() - start, time.process_time() - cpu, count,
                        tuple(latencies))
    # A replay that no longer matches (a fence that now finds nothing) is no floor.
    if rows != count * template.rows:
        raise RuntimeError(f"the floor's statements touched {rows} rows for {count} "
                           f"workflows; durable.py's touched {template.rows:g} per workflow")
    return timing


def pg_floor_replay(url: str, transactions: list[list[PgStatement]], count: int) -> Timing:
    """The very commits a concurrent durable.py run made (the same statements, grouped
    in the same transactions), replayed one after another into a fresh schema."""
    asyncio.run(create_journal(url))
    expected = sum(r for t in transactions for _, _, r in t)
    with contextlib.closing(pg_floor_connect(url)) as conn:
        cpu, start = time.process_time(), time.perf_counter()
        rows = pg_replay(conn, transactions)
        timing = Timing(time.perf_counter() - start, time.process_time() - cpu, count)
    if rows != expected:
        raise RuntimeError(f"the replayed commits touched {rows} rows; durable.py's "
                           f"touched {expected}")
    return timing


@dataclass(frozen=True, slots=True)
class PgConcurrent:
    timing: Timing
    transactions: list[list[PgStatement]]  # the commits it made, as recorded
    round_trips: int  # statements its connections executed meanwhile


async def durable_pg_concurrent(url: str, count: int, patience: float) -> PgConcurrent:
    """`count` workflows started at once, as durable_concurrent, recording every
    statement durable.py's connections execute (a list append each: noise)."""
    statements: list[tuple[int, str, tuple[Any, ...], int]] = []
    dur = journal(url)
    with pg_recording(statements):
        await dur.open()
    try:
        with contextlib.closing(pg_connect(url)) as watch:
            await start_all(dur, four_steps, "warm", WARMUP)
            await until_finished(watch, patience, "durable_workflows")
            first = len(statements)
            cpu, wall = time.process_time(), time.time()
            await start_all(dur, four_steps, "con", count)
            await until_finished(watch, patience, "durable_workflows")
            cpu = time.process_time() - cpu
            timing = Timing(last_finished_at(watch, "durable_workflows") - wall, cpu, count)
            window = statements[first:]
    finally:
        await dur.close()
    return PgConcurrent(timing, pg_transactions(window), len(window))


# SCENARIO 8: the same 4-step workflow on DBOS Transact, on the same server, in a child
# process of its own (its threads and globals apart from durable.py's measurement), in
# a database of its own. DBOS is no dependency of durable.py: `make bench` installs it.


def dbos_child(url: str, sequential: int, concurrent: int) -> None:
    """In the child: DBOS's sequential and concurrent runs, as bench.py's own (run, then
    wait for the result; all started at once, until the last is recorded finished);
    prints one JSON line."""
    from dbos import DBOS, SetWorkflowID

    DBOS(config={"name": "durable-bench", "system_database_url": url,
                 "run_admin_server": False, "log_level": "WARNING"})

    @DBOS.step()
    def dbos_add_one(n: int) -> int:
        return n + 1

    @DBOS.workflow()
    def dbos_four_steps(n: int) -> int:
        for _ in range(STEPS):
            n = dbos_add_one(n)
        return n

    def start(wf_id: str, n: int) -> Any:
        with SetWorkflowID(wf_id):
            return DBOS.start_workflow(dbos_four_steps, n)

    DBOS.launch()
    try:
        for i in range(WARMUP):
            start(f"warm-{i}", i).get_result()
        latencies: list[float] = []
        cpu, begin = time.process_time(), time.perf_counter()
        for i in range(sequential):
            began = time.perf_counter()
            if start(f"seq-{i}", i).get_result() != i + STEPS:
                raise RuntimeError("DBOS returned a wrong result")
            latencies.append(time.perf_counter() - began)
        seq = Timing(time.perf_counter() - begin, time.process_time() - cpu, sequential,
                     tuple(latencies))
        cpu, wall = time.process_time(), time.time()
        handles = [start(f"con-{i}", i) for i in range(concurrent)]
        if [h.get_result() for h in handles] != [i + STEPS for i in range(concurrent)]:
            raise RuntimeError("DBOS returned a wrong result")
        cpu = time.process_time() - cpu
    finally:
        DBOS.destroy()
    with contextlib.closing(pg_connect(url)) as conn:  # when DBOS recorded the last end
        done, last = conn.execute(
            "SELECT count(*), max(completed_at) FROM dbos.workflow_status "
            "WHERE workflow_uuid LIKE 'con-%' AND status = 'SUCCESS'").fetchone()
    if done != concurrent:
        raise RuntimeError(f"DBOS recorded {done} of {concurrent} workflows finished")
    con = Timing(last / 1000 - wall, cpu, concurrent)
    print(json.dumps({"sequential": dataclasses.asdict(seq),
                      "concurrent": dataclasses.asdict(con)}), flush=True)


def dbos_installed() -> str | None:
    """DBOS's version, or None when it is not installed."""
    import importlib.metadata
    try:
        return importlib.metadata.version("dbos")
    except importlib.metadata.PackageNotFoundError:
        return None


def dbos_round(base: str, sizes: Sizes) -> tuple[Timing, Timing]:
    """One DBOS child on a fresh database of the server at `base`, dropped afterwards."""
    name = f"durable_bench_dbos_{os.getpid()}_{secrets.token_hex(3)}"
    url = urllib.parse.urlsplit(base)._replace(path=f"/{name}").geturl()
    try:
        proc = subprocess.run([sys.executable, __file__, "--dbos-child", url,
                               str(sizes.sequential), str(sizes.concurrent)],
                              capture_output=True, text=True, timeout=sizes.patience)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"the DBOS child failed:\n{(proc.stderr + proc.stdout)[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        with contextlib.closing(pg_connect(base)) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return tuple(Timing(**{**out[k], "latencies": tuple(out[k]["latencies"])})
                 for k in ("sequential", "concurrent"))  # type: ignore[return-value]


ROW_PG_SEQ = "7 PostgreSQL sequential 4-step vs psycopg"
ROW_PG_CON = "concurrent 4-step vs psycopg"
ROW_DBOS_SEQ = "8 PostgreSQL sequential 4-step vs DBOS"
ROW_DBOS_CON = "concurrent 4-step vs DBOS"


def bench_postgres(base: str, sizes: Sizes) -> tuple[list[Row], str]:
    """Rows 7 and 8, and the server's version for the table's title ("" if none)."""
    n = sizes.concurrent
    con_pg, con_dbos = f"7 PostgreSQL {n:,} {ROW_PG_CON}", f"8 PostgreSQL {n:,} {ROW_DBOS_CON}"
    names = [ROW_PG_SEQ, con_pg, ROW_DBOS_SEQ, con_dbos]
    down = postgres_down(base)
    if down is not None:
        progress(f"7-8/10: {down} (skipping the PostgreSQL rows; --postgres URL names another)")
        return [Row(name, f"skipped: {down}", "", "") for name in names], ""
    version = postgres_version(base)
    dbos = dbos_installed() if sizes is not QUICK_RUN else None
    if sizes is QUICK_RUN:
        no_dbos = "not run in --quick (DBOS only in the full run)"
    else:
        no_dbos = f"skipped: dbos not installed (make bench installs dbos=={DBOS_VERSION})"
    progress(f"7-8/10: PostgreSQL {version}: sequential and {n:,} concurrent workflows "
             "against a psycopg floor" + (f" and DBOS {dbos}" if dbos else ""))
    with pg_schema(base, "template") as url:
        template = asyncio.run(learn_pg_commits(url))
    commits = len(template.transactions)
    if template.xids != commits:
        progress(f"WARNING: {commits} write transactions per workflow recorded, but the "
                 f"server handed out {template.xids:g} transaction ids per workflow "
                 "(another client of the server wrote meanwhile?)")
    floors: dict[str, list[Timing]] = {"seq": [], "con": []}
    durables: dict[str, list[Timing]] = {"seq": [], "con": []}
    dboses: dict[str, list[Timing]] = {"seq": [], "con": []}
    replays: list[PgConcurrent] = []
    for r in range(sizes.rounds):
        with pg_schema(base, f"floor{r}") as url:
            floors["seq"].append(pg_floor_sequential(url, template, sizes.sequential))
        with pg_schema(base, f"seq{r}") as url:
            durables["seq"].append(asyncio.run(durable_sequential(url, "FULL",
                                                                  sizes.sequential)))
        with pg_schema(base, f"con{r}") as url:
            run = asyncio.run(durable_pg_concurrent(url, n, sizes.patience))
        durables["con"].append(run.timing)
        replays.append(run)
        with pg_schema(base, f"cfloor{r}") as url:
            floors["con"].append(pg_floor_replay(url, run.transactions, n))
        if dbos:
            seq, con = dbos_round(base, sizes)
            dboses["seq"].append(seq)
            dboses["con"].append(con)
    base_seq, mine_seq = median_timing(floors["seq"]), median_timing(durables["seq"])
    base_con, mine_con = median_timing(floors["con"]), median_timing(durables["con"])
    # The median round's own commits, as its floor replayed them.
    ran = sorted(replays, key=lambda run: run.timing.seconds)[(len(replays) - 1) // 2]
    ran_statements = sum(len(t) for t in ran.transactions)
    ratio = mine_seq.per_workflow / base_seq.per_workflow
    cpu_ms = mine_con.cpu / n * 1000
    rows = [
        Row(ROW_PG_SEQ,
            f"{ms(mine_seq.per_workflow)}/wf ({mine_seq.rate:,.0f} wf/s), "
            f"p50 {ms(percentile(mine_seq.latencies, 50))}, "
            f"p99 {ms(percentile(mine_seq.latencies, 99))}; {commits} commits/wf "
            f"({template.xids:g} xids on the server), {template.round_trips:g} round trips/wf",
            f"psycopg, the same {commits} commits: {ms(base_seq.per_workflow)}/wf, "
            f"p50 {ms(percentile(base_seq.latencies, 50))}, "
            f"p99 {ms(percentile(base_seq.latencies, 99))}, "
            f"{template.round_trips:g} round trips/wf",
            f"{ratio:.2f}x", verdict(sizes, "<= 1.5x", ratio <= 1.5)),
        Row(con_pg,
            f"{mine_con.rate:,.0f} wf/s, {mine_con.rate * STEPS:,.0f} steps/s, "
            f"{cpu_ms:.3f} ms CPU/wf; {len(ran.transactions)} commits, "
            f"{ran.round_trips / n:.1f} round trips/wf",
            f"psycopg, the same {len(ran.transactions)} commits ({ran_statements:,} "
            f"statements): {base_con.rate:,.0f} wf/s, "
            f"{base_con.cpu / n * 1000:.3f} ms CPU/wf",
            f"{mine_con.per_workflow / base_con.per_workflow:.2f}x"),
    ]
    if not dbos:
        rows += [Row(ROW_DBOS_SEQ, f"{mine_seq.rate:,.0f} wf/s", no_dbos, ""),
                 Row(con_dbos, f"{mine_con.rate:,.0f} wf/s", no_dbos, "")]
        return rows, version
    d_seq, d_con = median_timing(dboses["seq"]), median_timing(dboses["con"])
    faster = mine_con.rate / d_con.rate
    rows += [
        Row(ROW_DBOS_SEQ,
            f"{mine_seq.rate:,.0f} wf/s, p50 {ms(percentile(mine_seq.latencies, 50))}, "
            f"{mine_seq.cpu / mine_seq.count * 1000:.3f} ms CPU/wf",
            f"DBOS {dbos}: {d_seq.rate:,.0f} wf/s, p50 {ms(percentile(d_seq.latencies, 50))}, "
            f"{d_seq.cpu / d_seq.count * 1000:.3f} ms CPU/wf",
            f"{mine_seq.rate / d_seq.rate:.1f}x DBOS's rate"),
        Row(con_dbos,
            f"{mine_con.rate:,.0f} wf/s, {cpu_ms:.3f} ms CPU/wf",
            f"DBOS {dbos}: {d_con.rate:,.0f} wf/s, {d_con.cpu / n * 1000:.3f} ms CPU/wf",
            f"{faster:.1f}x DBOS's rate", verdict(sizes, ">= 10x DBOS's rate", faster >= 10)),
    ]
    return rows, version


# SCENARIOS 9 AND 10: workflows waiting in ctx.receive until dur.send, and one ctx.all of
# many sync steps, on SQLite and (when a server answers) PostgreSQL, each against plain
# workflows of the same shape. Commits are counted on SQLite by connections that count
# their own (write transactions committed), on PostgreSQL by the transaction ids the
# server handed out (as row 7 checks its count).

MESSAGE = "go"  # what the receiving workflows wait for
ROW_WAITING = "9 {n:,} in ctx.receive, {store}: threads, RSS"
ROW_SEND = "9 send to {n:,} waiting, {store}: send -> all done"
ROW_ALL = "10 ctx.all of {n:,} sync steps, {store}"


def receiving(ctx: Context, n: int) -> Generator[Any, Any, int]:
    """`four_steps`, after waiting for a value to add to n."""
    n += yield ctx.receive(MESSAGE)
    return (yield from four_steps(ctx, n))


def one_step(ctx: Context, n: int) -> Generator[Any, Any, int]:
    return (yield ctx.run(add_one, n))


def fan_out(ctx: Context, n: int) -> Generator[Any, Any, int]:
    """n sync steps side by side in one ctx.all."""
    return sum((yield ctx.all(*(ctx.run(add_one, i) for i in range(n)))))


@dataclass(frozen=True, slots=True)
class Measured:
    dur: Durable
    watch: Any  # a connection of our own to the journal
    prefix: str  # of its table names: "" on SQLite, "durable_" on PostgreSQL
    count_commits: Callable[[], int]  # commits so far

    def waiting(self) -> int:
        return int(self.watch.execute(
            f"SELECT count(*) FROM {self.prefix}steps WHERE name = 'ctx.receive:{MESSAGE}' "
            "AND state = 'running'").fetchone()[0])

    async def until_finished(self, patience: float) -> float:
        """Waits as `until_finished`; returns when the journal records the last end."""
        await until_finished(self.watch, patience, f"{self.prefix}workflows")
        return last_finished_at(self.watch, f"{self.prefix}workflows")

    async def until_waiting(self, count: int, patience: float) -> None:
        deadline = time.monotonic() + patience
        while self.waiting() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.waiting()} of {count} workflows waiting in "
                                   f"ctx.receive after {patience:g} s")
            await asyncio.sleep(POLL)


@contextlib.asynccontextmanager
async def measured(target: str) -> AsyncIterator[Measured]:
    """An open Durable (FULL) on `target`, an SQLite file or a postgresql:// URL, with
    scenarios 9-10's workflows registered."""
    dur = Durable(target)
    for workflow in (four_steps, receiving, one_step, fan_out):
        dur.register(workflow)
    connections: list[_Counting] = []
    if target.startswith("postgresql:"):
        await dur.open()
        watch = pg_connect(target)
        m = Measured(dur, watch, "durable_", lambda: next_xid(watch))
    else:
        with recording(connections, _Counting):
            await dur.open()
        watch = sqlite3.connect(target)
        m = Measured(dur, watch, "", lambda: sum(c.commits for c in connections))
    try:
        yield m
    finally:
        watch.close()
        await dur.close()


async def send_all(dur: Durable, count: int) -> None:
    for first in range(0, count, BATCH):
        await asyncio.gather(*(dur.send(f"r-{i}", MESSAGE, 1)
                               for i in range(first, min(first + BATCH, count))))


async def receive_child(patience: float, count: int, targets: list[str]) -> None:
    """In a fresh child (so that RSS and threads are this scenario's alone): per round,
    `count` receiving workflows started and left waiting, then sent their values, all
    at once (from the first send until the journal records the last end), on one
    journal, against `count` plain 4-step workflows on another (from the first run()).
    The first round reads threads and RSS before the waiting ones start and while they
    wait. At the end, commits one workflow at a time. Prints one JSON line."""
    out: dict[str, Any] = {"send": [], "plain": []}
    for r, (recv, plain) in enumerate(zip(targets[::2], targets[1::2], strict=True)):
        async with measured(recv) as m:
            await start_all(m.dur, four_steps, "warm", WARMUP)
            await m.until_finished(patience)
            gc.collect()
            threads, rss, begun = threading.active_count(), rss_kb(), m.count_commits()
            await start_all(m.dur, receiving, "r", count)
            await m.until_waiting(count, patience)
            await asyncio.sleep(0.2)  # the last ones from their journal row to their wait
            if r == 0:
                gc.collect()
                out |= {"threads": [threads, threading.active_count()],
                        "rss_kb": [rss, rss_kb()], "begin": m.count_commits() - begun}
            commits, cpu, wall = m.count_commits(), time.process_time(), time.time()
            await send_all(m.dur, count)
            last = await m.until_finished(patience)
            out["send"].append([dataclasses.asdict(Timing(
                last - wall, time.process_time() - cpu, count)), m.count_commits() - commits])
            if r == len(targets) // 2 - 1:  # one at a time: commits per phase
                phases = []
                for i in range(WARMUP):
                    first = m.count_commits()
                    handle = await m.dur.run(f"one-{i}", receiving, i)
                    await m.until_waiting(1, patience)
                    second = m.count_commits()
                    await m.dur.send(handle.id, MESSAGE, 1)
                    third = m.count_commits()
                    await handle.result()
                    phases.append([second - first, third - second, m.count_commits() - third])
                out["one_by_one"] = [sum(p[k] for p in phases) / WARMUP for k in range(3)]
        async with measured(plain) as m:
            await start_all(m.dur, four_steps, "warm", WARMUP)
            await m.until_finished(patience)
            commits, cpu, wall = m.count_commits(), time.process_time(), time.time()
            await start_all(m.dur, four_steps, "p", count)
            last = await m.until_finished(patience)
            out["plain"].append([dataclasses.asdict(Timing(
                last - wall, time.process_time() - cpu, count)), m.count_commits() - commits])
    print(json.dumps(out), flush=True)


def median_run(runs: list[tuple[Timing, int]]) -> tuple[Timing, int]:
    """The run (timing, commits) with the median wall time."""
    return sorted(runs, key=lambda run: run[0].seconds)[(len(runs) - 1) // 2]


def journals(stack: contextlib.ExitStack, folder: Path, pg: str | None, tag: str,
             count: int) -> list[str]:
    """`count` fresh journals: SQLite files in `folder`, or schemas on the server `pg`
    (dropped when `stack` closes)."""
    if pg is None:
        folder.mkdir(exist_ok=True)
        return [str(folder / f"{tag}-{i}.db") for i in range(count)]
    return [stack.enter_context(pg_schema(pg, f"{tag}{i}")) for i in range(count)]


def bench_receive(folder: Path, sizes: Sizes, pg: str | None) -> list[Row]:
    """Row 9 on SQLite (pg None) or on the PostgreSQL server `pg`."""
    n, store = sizes.many, "PostgreSQL" if pg else "SQLite"
    progress(f"9/10: {store}: {n:,} workflows waiting in ctx.receive, then sent their "
             "values, against plain workflows")
    with contextlib.ExitStack() as stack:
        targets = journals(stack, folder, pg, "receive", 2 * sizes.rounds)
        proc = subprocess.run([sys.executable, __file__, "--receive-child", str(sizes.patience),
                               str(n), *targets], capture_output=True, text=True,
                              timeout=sizes.patience * 4 * sizes.rounds)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"the receive child failed:\n{(proc.stderr + proc.stdout)[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (send, sent), (plain, planned) = (median_run([(Timing(**t), c) for t, c in out[k]])
                                      for k in ("send", "plain"))
    (before, during), (none, waiting) = out["threads"], out["rss_kb"]
    growth, rate = waiting / none, send.rate / plain.rate
    return [
        Row(ROW_WAITING.format(n=n, store=store),
            f"{during} threads, {waiting / 1024:.1f} MB with {n:,} waiting "
            f"({(waiting - none) / n * 1024:,.0f} B each); {out['begin']:,} commits to start them",
            f"{before} threads, {none / 1024:.1f} MB with none (same process, first round)",
            f"{growth:.2f}x", verdict(sizes, "threads unchanged, RSS <= 1.2x",
                                      during == before and growth <= 1.2)),
        Row(ROW_SEND.format(n=n, store=store),
            f"{send.rate:,.0f} wf/s, {send.cpu / n * 1000:.3f} ms CPU/wf; {sent:,} commits; "
            "one at a time: run() + receive {:g} commits, send {:g}, then {:g} (the value with "
            "the next step's)".format(*out["one_by_one"]),
            f"{n:,} plain 4-step, run() -> all done: {plain.rate:,.0f} wf/s, "
            f"{plain.cpu / n * 1000:.3f} ms CPU/wf; {planned:,} commits",
            f"{rate:.2f}x plain's rate", verdict(sizes, ">= 0.5x plain's rate", rate >= 0.5)),
    ]


async def fan_round(target: str, n: int, patience: float, together: bool) -> tuple[Timing, int]:
    """One ctx.all of `n` sync steps (together), or `n` one-step workflows started at
    once: from run() until the journal records the last end; and the commits."""
    async with measured(target) as m:
        await start_all(m.dur, one_step, "warm", WARMUP)
        await (await m.dur.run("warm-all", fan_out, WARMUP)).result()
        commits, cpu, wall = m.count_commits(), time.process_time(), time.time()
        if together:
            handle = await m.dur.run("all", fan_out, n)
        else:
            await start_all(m.dur, one_step, "one", n)
        last = await m.until_finished(patience)
        timing = Timing(last - wall, time.process_time() - cpu, n)
        if together and await handle.result() != n * (n + 1) // 2:
            raise RuntimeError("ctx.all returned a wrong sum")
        return timing, m.count_commits() - commits


def bench_all(folder: Path, sizes: Sizes, pg: str | None) -> list[Row]:
    """Row 10 on SQLite (pg None) or on the PostgreSQL server `pg`."""
    n, store = sizes.many, "PostgreSQL" if pg else "SQLite"
    progress(f"10/10: {store}: ctx.all of {n:,} sync steps against {n:,} one-step workflows")
    runs: dict[bool, list[tuple[Timing, int]]] = {True: [], False: []}
    with contextlib.ExitStack() as stack:
        targets = iter(journals(stack, folder, pg, "all", 2 * sizes.rounds))
        for _ in range(sizes.rounds):
            for together in (False, True):
                runs[together].append(asyncio.run(fan_round(next(targets), n, sizes.patience,
                                                            together)))
    (mine, commits), (base, base_commits) = median_run(runs[True]), median_run(runs[False])
    return [Row(
        ROW_ALL.format(n=n, store=store),
        f"{secs(mine.seconds)} ({mine.rate:,.0f} steps/s), {mine.cpu / n * 1000:.3f} ms "
        f"CPU/step; {commits:,} commits",
        f"{n:,} one-step workflows at once: {secs(base.seconds)}, {base.cpu / n * 1000:.3f} "
        f"ms CPU/wf; {base_commits:,} commits",
        f"{mine.seconds / base.seconds:.2f}x")]


def bench_waits(folder: Path, sizes: Sizes, pg: str | None, sqlite: bool) -> list[Row]:
    """Rows 9 and 10: on SQLite when `sqlite`, on PostgreSQL when `pg` names a server
    (each row saying it was skipped when none answers there)."""
    stores: list[str | None] = ([None] if sqlite else []) + ([pg] if pg else [])
    down = postgres_down(pg) if pg else None
    rows = []
    for bench in (bench_receive, bench_all):
        for store in stores:
            if store is not None and down is not None:
                progress(f"{bench.__name__}: {down} (skipping its PostgreSQL rows)")
                names = [ROW_WAITING, ROW_SEND] if bench is bench_receive else [ROW_ALL]
                rows += [Row(name.format(n=sizes.many, store="PostgreSQL"),
                             f"skipped: {down}", "", "") for name in names]
            else:
                rows += bench(folder / bench.__name__, sizes, store)
    return rows


# INSTRUCTIONS: a count that the machine's noise does not move, for before/after pairs.

# The workload, run in a child with the durable.py of the folder it is given first on
# its path: `count` 4-step workflows one at a time ("seq") or all at once ("con").
INSTRUCTIONS_WORKLOAD = """
import asyncio, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
from durable import Durable
mode, count = sys.argv[2], int(sys.argv[3])

def add_one(n):
    return n + 1

dur = Durable(os.path.join(tempfile.mkdtemp(), "j.db"), synchronous="NORMAL")

@dur.register
def four(ctx, n):
    for _ in range(4):
        n = yield ctx.run(add_one, n)
    return n

async def main():
    async with dur:
        await (await dur.run("warm", four, 0)).result()
        if mode == "seq":
            for i in range(count):
                await (await dur.run(f"w{i}", four, i)).result()
        else:
            handles = await asyncio.gather(*(dur.run(f"w{i}", four, i) for i in range(count)))
            await asyncio.gather(*(h.result() for h in handles))

asyncio.run(main())
"""


def instructions(folder: Path, mode: str, count: int) -> int:
    """Instructions the process executes, counted by valgrind's callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, "-c", INSTRUCTIONS_WORKLOAD, str(folder), mode, str(count)],
            capture_output=True, text=True, check=True).stderr
    return int(out.split("Collected :")[1].split()[0])


def bench_instructions(baseline: Path) -> None:
    """Instructions per workflow, this folder's durable.py against `baseline`'s, each a
    run of `count` workflows less a run of none. Deterministic on a quiet machine (under
    load, thread timing changes the paths taken a little)."""
    print("| workload | baseline | this durable.py | ratio |")
    print("|---|---|---|---|")
    for mode, count, what in (("seq", 100, "sequential 4-step, NORMAL"),
                              ("con", 400, "400 concurrent 4-step, NORMAL")):
        per = []
        for folder in (baseline, HERE):
            progress(f"callgrind: {what}, {folder}")
            per.append((instructions(folder, mode, count) - instructions(folder, mode, 0))
                       / count)
        print(f"| {what} | {per[0]:,.0f} instr/wf | {per[1]:,.0f} instr/wf | "
              f"{per[1] / per[0]:.3f}x |")


# MAIN.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every scenario at tiny sizes: a smoke test of a few seconds")
    parser.add_argument("--instructions", metavar="BASELINE_DIR", type=Path,
                        help="instead: instructions per workflow (valgrind) of this "
                             "durable.py against the one in BASELINE_DIR (a checkout)")
    parser.add_argument("--postgres", metavar="URL",
                        default=os.environ.get("DURABLE_BENCH_POSTGRES", DEFAULT_POSTGRES),
                        help="the PostgreSQL server for rows 7-8 (a schema of its own per "
                             "scenario, a database for DBOS; all dropped afterwards); default: "
                             "$DURABLE_BENCH_POSTGRES or %(default)s")
    parser.add_argument("--only", choices=("sqlite", "postgres", "receive-all"),
                        help="only the SQLite rows (1-6, 9-10), only the PostgreSQL ones "
                             "(7-10), or only rows 9-10 (ctx.receive, ctx.all) on both")
    parser.add_argument("--crash-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--dbos-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--receive-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive_child:
        patience, count, *targets = args.receive_child
        asyncio.run(receive_child(float(patience), int(count), targets))
        return 0
    if args.dbos_child:
        url, sequential, concurrent = args.dbos_child
        dbos_child(url, int(sequential), int(concurrent))
        return 0
    if args.crash_child:
        asyncio.run(crash_child(Path(args.crash_child[0]), int(args.crash_child[1])))
        return 0
    if args.memory_child:
        path, *marks = args.memory_child
        asyncio.run(memory_child(Path(path), [int(m) for m in marks]))
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            parser.error("--instructions needs valgrind (apt-get install valgrind)")
        if not (args.instructions / "durable.py").is_file():
            parser.error(f"no durable.py in {args.instructions}")
        bench_instructions(args.instructions)
        return 0
    sizes = QUICK_RUN if args.quick else FULL_RUN
    started = time.monotonic()
    rows: list[Row] = []
    postgres = ""
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        folder = Path(tmp)
        if args.only in (None, "sqlite"):
            progress("0/10: recording what durable.py commits for one workflow")
            template = asyncio.run(learn_commits(folder / "template.db"))
            rows += [
                *bench_sequential(folder, sizes, template),
                *bench_concurrent(folder, sizes, template),
                *bench_http(folder / "http", sizes),
                *bench_recovery(folder / "recovery", sizes),
                *bench_memory(folder / "memory", sizes),
            ]
        if args.only in (None, "postgres"):
            pg_rows, postgres = bench_postgres(args.postgres, sizes)
            rows += pg_rows
        pg = args.postgres if args.only != "sqlite" else None
        rows += bench_waits(folder, sizes, pg, sqlite=args.only != "postgres")
        if pg and not postgres and postgres_down(pg) is None:
            postgres = postgres_version(pg)
    progress(f"done in {time.monotonic() - started:.0f} s")
    print_table(rows, sizes, postgres)
    return 0


if __name__ == "__main__":
    sys.exit(main())
