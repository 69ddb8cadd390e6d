"""The fault suite: kill it, starve it, feed it garbage; nothing accepted is lost.

`python test_faults.py --kills 40` is the long version (`make torture`): the order
service under a stream of orders, killed with SIGKILL at random moments, ending with
one line of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from durable import Durable, IdempotencyConflict, JournalError

HERE = Path(__file__).resolve().parent


def count(db: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


# The SIGKILL loop.


@dataclass
class Torture:
    seed: int
    kills: int = 0
    accepted: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    double_charged: list[str] = field(default_factory=list)
    double_emailed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"torture: {self.kills} kills, {len(self.accepted)} orders accepted, "
                f"{len(self.lost)} lost, {len(self.double_charged)} double charges, "
                f"{len(self.double_emailed)} duplicate emails (seed {self.seed})")


def feed(services: list[Any], order: dict[str, Any], seed: int, stop: threading.Event,
         accepted: list[str], pause: float) -> None:
    """POST new orders, to each service in turn, until stopped; keep the ids that got
    a 202."""
    n = 0
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            n += 1
            order_id = f"ord_{seed}_{n}"
            body = {**order, "id": order_id,
                    "items": [{"sku": "widget-pro", "qty": 1 + n % 3, "price": 1999}]}
            url = services[n % len(services)].url
            try:
                response = client.post(f"{url}/orders", content=json.dumps(body))
                if response.status_code == 202:
                    accepted.append(order_id)
                else:
                    assert response.status_code == 503, response.text
            except httpx.TransportError:
                time.sleep(0.02)  # down: being killed or restarting
            time.sleep(pause)


def torture(services: list[Any], order: dict[str, Any], seed: int, kills: int,
            rows: Any, pause: float = 0.002) -> Torture:
    """Run the order services (not started; sharing one journal) under a stream of
    orders, SIGKILL one of them `kills` times at seeded random moments, restart it,
    and count what became of each 202."""
    rng = random.Random(seed)
    report = Torture(seed)
    first = services[0]
    if first.journal.startswith("postgresql://"):  # one database holds both
        journal = providers = first.journal
    else:
        journal, providers = first.folder / "orders.db", first.folder / "orders-providers.db"
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(services, order, seed, stop,
                                                 report.accepted, pause))
    try:
        for service in services:
            service.start()
        feeder.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            victim = rng.choice(services)
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            report.kills += 1
            victim.start()
        time.sleep(rng.uniform(0.2, 0.5))
        stop.set()
        feeder.join()
        settle(rows, journal, report.accepted)
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join()
        for service in services:
            service.stop()
    done = {row[0] for row in rows(journal, "SELECT id FROM workflows WHERE state = 'done'")}
    charges = Counter(row[0] for row in rows(providers, "SELECT order_id FROM charges"))
    emails = Counter(row[0] for row in rows(providers, "SELECT order_id FROM outbox"))
    for order_id in report.accepted:
        if order_id not in done or charges[order_id] == 0 or emails[order_id] == 0:
            report.lost.append(order_id)
    report.double_charged = [o for o, n in charges.items() if n > 1]
    report.double_emailed = [o for o, n in emails.items() if n > 1]
    return report


def settle(rows: Any, journal: Any, accepted: list[str], timeout: float = 60) -> None:
    """Wait until no accepted order is unfinished (the services are running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not rows(journal, "SELECT count(*) FROM workflows WHERE state IN "
                             "('pending', 'running')")[0][0]:
            return
        time.sleep(0.1)


def _torture_settings() -> tuple[int, int, float]:
    seed = int(os.environ.get("TORTURE_SEED", random.randrange(1_000_000)))
    print(f"fault loop seed {seed} (replay: TORTURE_SEED={seed})")
    return (seed, int(os.environ.get("TORTURE_KILLS", "5")),
            float(os.environ.get("TORTURE_PAUSE", "0.002")))


def _check(report: Torture, kills: int) -> None:
    print(report.line())
    assert report.kills == kills and report.accepted
    assert (report.lost, report.double_charged, report.double_emailed) == ([], [], []), \
        report.line()


def test_sigkill_loop_loses_no_accepted_order_and_charges_each_once(
        service: Any, order: Any, rows: Any) -> None:
    # `python test_faults.py --kills N` runs this test alone with more kills.
    seed, kills, pause = _torture_settings()
    _check(torture([service], order, seed, kills, rows, pause), kills)


@pytest.mark.postgres_only
def test_sigkill_loop_on_two_machines_sharing_postgres_loses_nothing_and_charges_once(
        db: str, tmp_path: Path, service_class: Any, order: Any, rows: Any) -> None:
    # Two services on two machines, one database: the journal and the ledger. A killed
    # one's orders are taken over by the other when its lease (2 s) runs out, or by
    # itself at once when it comes back first. `python test_faults.py --postgres`.
    seed, kills, pause = _torture_settings()
    services = []
    for name in ("machine-a", "machine-b"):
        service = service_class(tmp_path / name, db, name)
        service.folder.mkdir()
        services.append(service)
    env = {"DURABLE_LEASE": "2"}
    for service in services:
        service.start = functools.partial(service.start, **env)
    _check(torture(services, order, seed, kills, rows, pause), kills)


# Kill points in the library: at every step boundary and inside every step.

KILLABLE = textwrap.dedent("""
    import asyncio, json, os, sys
    from durable import Durable

    db, marks, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
    dur = Durable(db)

    def point(name):
        if name == kill_at:
            os._exit(9)

    def step(n, x):
        with open(marks, "a") as f:
            f.write(f"{n}\\n")
        point(f"enter:{n}")
        value = x * 10 + n
        point(f"exit:{n}")      # after its work, before its checkpoint
        return value

    @dur.register(name="killable")
    def killable(ctx, x):
        for n in (1, 2, 3):
            x = yield ctx.run(step, n, x)
            point(f"between:{n}")   # workflow code after step n returned
        return x

    async def main():
        async with dur:
            handle = await dur.run("k", killable, 0)
            print(json.dumps(await handle.result(timeout=30)))

    asyncio.run(main())
""")

KILL_POINTS = [f"{where}:{n}" for n in (1, 2, 3) for where in ("enter", "exit", "between")]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_workflow_killed_at_any_point_resumes_to_the_same_result(tmp_path: Path,
                                                                kill_at: str) -> None:
    script, db, marks = tmp_path / "killable.py", tmp_path / "k.db", tmp_path / "marks"
    script.write_text(KILLABLE)
    env = {**os.environ, "PYTHONPATH": str(HERE)}

    def run(point: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(db), str(marks), point],
                              env=env, capture_output=True, text=True, timeout=60)

    assert run(kill_at).returncode == 9
    finished = run("none")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == 123  # as without the kill
    killed_in = int(kill_at.split(":")[1])
    ran = Counter(int(n) for n in marks.read_text().split())
    # Steps before the one the kill hit never ran again; that one ran twice (its result
    # is committed with the next checkpoint); the ones after it ran once.
    assert ran == {n: 2 if n == killed_in else 1 for n in (1, 2, 3)}


# Group commit under SIGKILL: nothing acknowledged is lost.

BATCHER = textwrap.dedent("""
    import asyncio, os, sys
    from durable import Durable

    db, marks = sys.argv[1], sys.argv[2]
    dur = Durable(db)
    out = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def say(line):
        os.write(out, (line + "\\n").encode())

    def step(wf_id, n):
        # Step n starts only once step n-1's result is committed: an acknowledgement.
        say(f"started {wf_id} {n}")
        return n

    @dur.register(name="many")
    def many(ctx):
        for n in range(1, 6):
            yield ctx.run(step, ctx.id, n)

    async def accept(i):
        await dur.run(f"w{i}", many)
        say(f"accepted w{i}")  # run() returned: the workflow is committed

    async def main():
        async with dur:
            await asyncio.gather(*(accept(i) for i in range(5_000)))
            await asyncio.sleep(60)  # the test kills it long before

    asyncio.run(main())
""")


def test_process_killed_while_batches_commit_loses_nothing_acknowledged(tmp_path: Path) -> None:
    script, db, marks = tmp_path / "batcher.py", tmp_path / "batch.db", tmp_path / "marks"
    script.write_text(BATCHER)
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(marks)],
                            env={**os.environ, "PYTHONPATH": str(HERE)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not marks.exists() or len(re.findall(r"started \S+ [2-5]\n", marks.read_text())) < 1000:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # thousands of workflows in flight, batches committing
    proc.wait()
    lines = [line.split() for line in marks.read_text().splitlines() if line.count(" ") >= 1]
    accepted = {words[1] for words in lines if words[0] == "accepted" and len(words) == 2}
    started = [(words[1], int(words[2])) for words in lines
               if words[0] == "started" and len(words) == 3]
    conn = sqlite3.connect(db)
    try:
        journaled = {row[0] for row in conn.execute("SELECT id FROM workflows")}
        done = set(conn.execute("SELECT workflow_id, seq FROM steps WHERE state = 'done'"))
    finally:
        conn.close()
    assert accepted and started
    # Every run() that returned left its workflow in the journal...
    assert accepted <= journaled
    # ...and every step that started proves its predecessor's result was durable.
    missing = [(wf, n - 1) for wf, n in started if n > 1 and (wf, n - 1) not in done]
    assert missing == []


# Garbage at the door.


@pytest.fixture(scope="module")
def door(service_class: Any) -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="durable-door-") as folder:
        service = service_class(Path(folder)).start()
        try:
            yield service
        finally:
            service.stop()


def json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
               | st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)


# Values that look almost right to a careless check.
TRICKY = st.sampled_from([True, False, None, 0, -1, 2.0, 1e3, 10**12, "2", "", "x" * 65,
                          [], {}, "a@b", "ord 1"])


@st.composite
def near_orders(draw: st.DrawFn) -> Any:
    """A valid order with one part replaced by anything or removed, or an extra field:
    each check of the door gets its turn."""
    order = {"id": draw(st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)),
             "customer": {"id": "cus_x", "email": "x@example.com"},
             "items": [{"sku": draw(st.sampled_from(["widget-pro", "widget-nope"])),
                        "qty": draw(st.integers(1, 5)), "price": draw(st.integers(0, 9999))}
                       for _ in range(draw(st.integers(1, 3)))]}
    parents = [(order, "id"), (order, "customer"), (order, "items"),
               (order["customer"], "id"), (order["customer"], "email"),
               (order["items"], 0), (order["items"][0], "sku"),
               (order["items"][0], "qty"), (order["items"][0], "price")]
    parent, key = draw(st.sampled_from(parents))
    change = draw(st.sampled_from(["replace"] * 4 + ["remove", "extra", "none"]))
    if change == "replace":
        parent[key] = draw(TRICKY | json_values())
    elif change == "remove" and isinstance(parent, dict):
        del parent[key]
    elif change == "extra" and isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(json_values())
    return order


def is_order(value: Any) -> bool:
    """CONTRACT section 4's order, checked independently of app.py."""
    def text(v: Any, limit: int = 64) -> bool:
        return isinstance(v, str) and 1 <= len(v) <= limit \
            and not any("\ud800" <= c <= "\udfff" for c in v)  # lone surrogates

    def number(v: Any, low: int) -> bool:
        return type(v) is int and low <= v <= 1_000_000_000

    return (isinstance(value, dict) and set(value) == {"id", "customer", "items"}
            and text(value["id"]) and all(c.isascii() and (c.isalnum() or c in "_-.")
                                          for c in value["id"])
            and value["id"] not in (".", "..")  # the README: clients resolve them away
            and isinstance(value["customer"], dict)
            and set(value["customer"]) == {"id", "email"} and text(value["customer"]["id"])
            and text(value["customer"]["email"], 254)
            and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value["customer"]["email"]) is not None
            and isinstance(value["items"], list) and 1 <= len(value["items"]) <= 100
            and all(isinstance(i, dict) and set(i) == {"sku", "qty", "price"}
                    and text(i["sku"]) and number(i["qty"], 1) and number(i["price"], 0)
                    for i in value["items"]))


def post_and_check(door: Any, body: bytes) -> None:
    journal = door.folder / "orders.db"
    before = count(journal, "SELECT count(*) FROM workflows")
    response = httpx.post(f"{door.url}/orders", content=body, timeout=10)
    after = count(journal, "SELECT count(*) FROM workflows")
    try:
        valid = is_order(json.loads(body))
    except ValueError:
        valid = False
    if valid:  # accepted, or refused as a reused id with another body
        assert response.status_code in (202, 422), (body, response.text)
    else:
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]
    if response.status_code != 202:
        assert after == before, body  # refused: nothing written


# A valid order, for the examples below to break one part of.
VALID = {"id": "ord_x", "customer": {"id": "cus_x", "email": "x@example.com"},
         "items": [{"sku": "widget-pro", "qty": 1, "price": 1999}]}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=json_values() | near_orders())
@example(value={**VALID, "items": [{"sku": "widget-pro", "qty": True, "price": 1}]})
@example(value={**VALID, "items": [{"sku": "widget-pro", "qty": 2.0, "price": False}]})
@example(value={**VALID, "customer": {"id": "\ud800", "email": "a@b.co"}})
def test_any_json_body_gets_an_answer_never_a_500(door: Any, value: Any) -> None:
    post_and_check(door, json.dumps(value).encode())


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.binary(max_size=300))
def test_any_bytes_body_gets_an_answer_never_a_500(door: Any, body: bytes) -> None:
    post_and_check(door, body)


# Journal trouble.

WORKER = textwrap.dedent("""
    import asyncio, json, sys
    from durable import Durable, DurableError

    db, action = sys.argv[1], sys.argv[2]
    dur = Durable(db)

    @dur.register(name="w")
    def w(ctx, n):
        return (yield ctx.run(str, n))

    async def main():
        try:
            async with dur:
                if action == "run":
                    print(json.dumps(await (await dur.run("new", w, 1)).result(timeout=20)))
                else:
                    await asyncio.sleep(0.5)  # resume what is unfinished
        except DurableError as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(1)

    asyncio.run(main())
""")


def make_read_only(what: str, folder: Path, journal: Path) -> tuple[Path, Any]:
    """Make the journal (`file`) or its folder (`directory`) read-only, even for root:
    an immutable file, or a read-only bind mount. Returns the journal's path to use
    and how to undo it."""
    def run(*command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"{' '.join(command)} is not possible here: {done.stderr.strip()}")

    if what == "file":
        run("chattr", "+i", str(journal))
        return journal, lambda: run("chattr", "-i", str(journal))
    mount = folder.parent / (folder.name + "-ro")
    mount.mkdir()
    run("mount", "--bind", str(folder), str(mount))
    try:
        run("mount", "-o", "remount,ro,bind", str(mount))
    except BaseException:
        run("umount", str(mount))
        raise
    return mount / journal.name, lambda: run("umount", str(mount))


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr and mount need root")
@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_journal_gives_a_clear_error_then_work_resumes(tmp_path: Path,
                                                                 what: str) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    journal, script = folder / "ro.db", tmp_path / "worker.py"
    script.write_text(WORKER)

    async def accept() -> None:  # one accepted workflow, left unfinished
        dur = Durable(journal)

        @dur.register(name="w")
        def w(ctx, n):
            yield ctx.run(str, n)

        async with dur:
            await dur.run("accepted", w, 7)
        conn = sqlite3.connect(journal)
        conn.execute("UPDATE workflows SET state = 'running', result = NULL, owner = NULL")
        conn.execute("DELETE FROM steps")
        conn.commit()
        conn.close()

    asyncio.run(accept())
    before = journal.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    path, undo = make_read_only(what, folder, journal)
    try:
        refused = subprocess.run([sys.executable, str(script), str(path), "run"], env=env,
                                 capture_output=True, text=True, timeout=60)
    finally:
        undo()
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith("JournalError: "), refused.stderr
    assert "read-only" in refused.stderr or "folder must exist and be writable" \
        in refused.stderr, refused.stderr
    assert journal.read_bytes() == before
    # The trouble is gone: the accepted workflow finishes.
    resumed = subprocess.run([sys.executable, str(script), str(journal), "resume"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert count(journal, "SELECT count(*) FROM workflows WHERE state = 'done'") == 1


def test_locked_journal_refuses_new_work_clearly_then_accepts_it(tmp_path: Path) -> None:
    journal = tmp_path / "locked.db"
    dur = Durable(journal, busy_timeout=0.2)

    @dur.register
    def wf(ctx, n):
        return (yield ctx.run(str, n))

    async def main() -> None:
        async with dur:
            blocker = sqlite3.connect(journal, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(JournalError, match="database is locked"):
                await dur.run("x", wf, 1)
            blocker.execute("ROLLBACK")
            blocker.close()
            assert count(journal, "SELECT count(*) FROM workflows") == 0
            assert await (await dur.run("x", wf, 1)).result() == "1"

    asyncio.run(main())


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-another"])
def test_locked_journal_still_answers_run_of_a_recorded_workflow_from_a_read(
        tmp_path: Path, beside: bool) -> None:
    journal = tmp_path / "locked.db"
    dur = Durable(journal, busy_timeout=0.2)
    release = threading.Event()

    @dur.register
    def wf(ctx, n):
        return (yield ctx.run(str, n))

    @dur.register
    def held(ctx):
        yield ctx.run(release.wait, 30)

    async def main() -> None:
        async with dur:
            assert await (await dur.run("done", wf, 1)).result() == "1"
            if beside:  # run() then goes through the writer thread, not a step thread
                await dur.run("held", held)
                while not count(journal, "SELECT count(*) FROM steps WHERE workflow_id = 'held'"):
                    await asyncio.sleep(0.01)
            blocker = sqlite3.connect(journal, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                again = await dur.run("done", wf, 1)  # a client's retry: answered
                assert again.created is False and await again.result() == "1"
                with pytest.raises(IdempotencyConflict):
                    await dur.run("done", wf, 2)
                with pytest.raises(JournalError, match="database is locked"):
                    await dur.run("new", wf, 1)  # new work needs the write lock
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
                release.set()
            assert await (await dur.run("new", wf, 1)).result() == "1"

    asyncio.run(main())
    assert count(journal, "SELECT count(*) FROM workflows") == (3 if beside else 2)


async def posts(url: str, *bodies: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/orders", content=json.dumps(body))
                                      for body in bodies))


def test_locked_journal_answers_503_at_the_door_and_loses_nothing(
        tmp_path: Path, service_class: Any, order: Any) -> None:
    service = service_class(tmp_path).start()
    try:
        assert service.post(order).status_code == 202
        assert service.finished("ord_1001")["status"] == "done"
        blocker = sqlite3.connect(tmp_path / "orders.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            # A new order, and a finished order's retry (answered from a read), at once.
            response, replayed = asyncio.run(posts(service.url, {**order, "id": "ord_1002"},
                                                   order))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert response.status_code == 503
        assert replayed.status_code == 202 and replayed.headers["idempotent-replayed"] == "true"
        assert response.headers["retry-after"] == "5"
        assert "unavailable" in response.json()["error"]
        assert service.status("ord_1002").status_code == 404  # nothing half-written
        assert service.post({**order, "id": "ord_1002"}).status_code == 202
        assert service.finished("ord_1002")["status"] == "done"
        assert service.finished("ord_1001")["status"] == "done"
    finally:
        service.stop()


@pytest.mark.parametrize("where", ["header", "pages"])
def test_corrupted_journal_gives_a_clear_error(tmp_path: Path, where: str) -> None:
    journal = tmp_path / "corrupt.db"

    async def fill() -> None:
        dur = Durable(journal)

        @dur.register
        def wf(ctx, n):
            return (yield ctx.run(str, n))

        async with dur:
            for i in range(200):
                await dur.run(f"w{i}", wf, "x" * 200)
            await (await dur.get("w199")).result()

    asyncio.run(fill())
    conn = sqlite3.connect(journal)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(journal.read_bytes())
    if where == "header":
        data[0:16] = b"garbage garbage!"
    else:
        for page in range(1, len(data) // 4096):
            data[page * 4096:page * 4096 + 64] = os.urandom(64)
    journal.write_bytes(bytes(data))

    async def reopen() -> None:
        async with Durable(journal):
            pass

    with pytest.raises(JournalError) as info:
        asyncio.run(reopen())
    assert "malformed" in str(info.value) or "not a durable.py journal" in str(info.value)
    shown = subprocess.run([sys.executable, str(HERE / "durable.py"), str(journal), "list"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1 and shown.stderr.startswith("durable: ")
    assert "Traceback" not in shown.stderr


def test_full_journal_refuses_new_work_keeps_accepted_work_and_recovers(
        tmp_path: Path) -> None:
    journal = tmp_path / "full.db"
    dur = Durable(journal)
    gate = asyncio.Event()

    async def wait_for_room() -> str:
        await gate.wait()
        return "made it"

    @dur.register
    async def wf(ctx, payload):
        await ctx.run(str, len(payload))
        return await ctx.run(wait_for_room)

    async def main() -> None:
        async with dur:
            accepted = await dur.run("accepted", wf, "small")
            while count(journal, "SELECT count(*) FROM steps") < 2:
                await asyncio.sleep(0.01)
            assert dur._writer is not None
            conn = dur._writer.journal._conn  # the journal's own connection: cap its size here
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
            with pytest.raises(JournalError, match="full"):
                await dur.run("too-big", wf, "x" * 200_000)
            assert count(journal, "SELECT count(*) FROM workflows") == 1
            conn.execute("PRAGMA max_page_count = 1073741823")  # the trouble is gone
            gate.set()
            assert await accepted.result(timeout=10) == "made it"
            assert await (await dur.run("too-big", wf, "x" * 200_000)).result(timeout=10) \
                == "made it"

    asyncio.run(main())


def main() -> None:
    """`python test_faults.py --kills N [--postgres]` (make torture): pytest runs the
    SIGKILL loop's test alone (it needs conftest.py's fixtures), killing N times: one
    service on SQLite, or two "machines" sharing PostgreSQL."""
    parser = argparse.ArgumentParser(description="The order service under SIGKILL.")
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--postgres", action="store_true",
                        help="two services on two machines sharing DURABLE_TEST_POSTGRES")
    parser.add_argument("--seed", type=int, default=random.randrange(1_000_000))
    parser.add_argument("--pause", type=float, default=0.002,
                        help="seconds between orders from the feeder")
    args = parser.parse_args()
    env = {**os.environ, "TORTURE_KILLS": str(args.kills), "TORTURE_SEED": str(args.seed),
           "TORTURE_PAUSE": str(args.pause)}
    test = (test_sigkill_loop_on_two_machines_sharing_postgres_loses_nothing_and_charges_once
            if args.postgres else test_sigkill_loop_loses_no_accepted_order_and_charges_each_once
            ).__name__
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", f"{Path(__file__).resolve()}::{test}",
                             "-q", "-s", "--timeout=0", "-p", "no:cacheprovider"],
                            env=env, cwd=HERE).returncode)


if __name__ == "__main__":
    main()
