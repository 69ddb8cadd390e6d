"""What only the PostgreSQL store has to prove: fences and claims under concurrent
transactions, migrations racing, leases on the server's clock, a lost connection and
a COMMIT whose answer was lost with it, and psycopg imported only when needed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import durable
from durable import Durable, JournalError

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.postgres_only


def _step_row(seq: int, state: str, result: str | None = None) -> tuple[Any, ...]:
    now = time.time()
    return ("w", seq, f"step{seq}", state, 1, result, None, None, now, now,
            now if state == "done" else None)


@pytest.fixture
def held(db: str) -> Iterator[tuple[Any, Any]]:
    """Two connections to one journal, and workflow 'w' held by "A", running step 2
    (its begin row committed): the holder's and a would-be taker's journals."""
    holder, taker = durable._PostgresJournal(db), durable._PostgresJournal(db)
    try:
        with holder.transaction():
            holder.insert("w", "wf", "{}", "digest", "A", time.time())
        with holder.transaction():
            assert holder.checkpoint("w", "A", [_step_row(1, "done", "1"),
                                                _step_row(2, "running")], None, True)
        yield holder, taker
    finally:
        holder.close()
        taker.close()


def _steps(journal: Any) -> list[tuple[int, str]]:
    return [(seq, state) for seq, _, state, *_ in journal.status("w")[1]]


def test_a_takeover_skips_a_workflow_whose_holder_is_writing_and_never_waits_for_it(
        held: tuple[Any, Any]) -> None:
    # The holder's fenced write comes first and locks the row. A claim meanwhile (the
    # holder's lease has run out, say) skips the row at once: it neither waits for the
    # holder (it would wait forever here: the same thread holds both) nor takes it.
    holder, taker = held
    with holder.transaction():
        assert holder.checkpoint("w", "A", [_step_row(2, "done", "2")], None, False)
        with taker.transaction():
            assert not taker.claim("B", "w", "A", True)
    assert holder.state("w") == ("running", "A")
    # Once the write committed, the next claim takes the workflow, step 2 and all.
    with taker.transaction():
        assert taker.claim("B", "w", "A", True)
    assert _steps(taker) == [(1, "done"), (2, "done")]


def test_a_holder_writing_while_a_takeover_commits_records_nothing(
        held: tuple[Any, Any]) -> None:
    # The takeover comes first, uncommitted: the holder's write waits for it, sees the
    # new owner, and writes nothing. Without the row lock it would read the row as it
    # was when its statement began, and record step 3 after the takeover.
    holder, taker = held
    outcome: list[bool] = []
    with taker.transaction():
        assert taker.claim("B", "w", "A", True)
        writer = threading.Thread(target=lambda: outcome.append(_write(holder)))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not outcome  # it waits for the takeover
    writer.join(10)
    assert outcome == [False]
    assert holder.state("w") == ("running", "B")
    assert _steps(taker) == [(1, "done"), (2, "running")]


def _write(holder: Any) -> bool:
    with holder.transaction():
        return bool(holder.checkpoint("w", "A", [_step_row(2, "done", "2"),
                                                 _step_row(3, "running")], None, False))


def test_four_processes_opening_an_empty_database_at_once_all_succeed(db: str,
                                                                     rows: Any) -> None:
    # With busy_timeout=0 too: the migration's turn is waited for all the same.
    opener = ("import asyncio, sys\nfrom durable import Durable\n"
              "asyncio.run(Durable(sys.argv[1], busy_timeout=0).open())\n")
    procs = [subprocess.Popen([sys.executable, "-c", opener, db], stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
             for _ in range(4)]
    errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, errors
    assert rows(db, "SELECT version FROM durable_schema") == [
        (len(durable._PostgresJournal.MIGRATIONS),)]


def test_a_search_path_schema_that_does_not_exist_is_created(db: str, rows: Any) -> None:
    url = db.replace("options=-csearch_path%3D", "options=-csearch_path%3Dnew_")
    schema = "new_" + db.rsplit("%3D", 1)[1]

    async def main() -> None:
        async with Durable(url):
            pass

    try:
        asyncio.run(main())
        assert rows(db, "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = ? ORDER BY 1", (schema,)) == [
            ("durable_messages",), ("durable_owners",), ("durable_schema",), ("durable_steps",),
            ("durable_workflows",)]
    finally:
        rows(db, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_leases_are_measured_on_the_server_clock_not_the_client_clock(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second process whose clock is an hour ahead sees the first one's lease as the
    # server does: alive. (On SQLite it would see it long expired.)
    def build() -> tuple[Durable, list[str]]:
        dur, ran = Durable(db, lease=30), []

        @dur.register(name="nap")
        def nap(ctx):
            ran.append("nap")
            yield ctx.sleep(30)

        return dur, ran

    async def main() -> tuple[list[str], list[str]]:
        first, ran_first = build()
        async with first:
            await first.run("w", "nap")
            await asyncio.sleep(0.2)
            real = time.time
            monkeypatch.setattr(time, "time", lambda: real() + 3600)
            second, ran_second = build()
            async with second:
                await asyncio.sleep(0.3)
            monkeypatch.setattr(time, "time", real)
            return ran_first, ran_second

    ran_first, ran_second = asyncio.run(main())
    assert ran_first == ["nap"] and ran_second == []


def test_without_psycopg_a_postgres_url_says_what_to_install_and_sqlite_never_imports_it(
        db: str, tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "import durable\n"
        "async def main():\n"
        "    async with durable.Durable(sys.argv[2]):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "assert 'psycopg' not in sys.modules, 'SQLite imported psycopg'\n"
        "sys.modules['psycopg'] = None  # as if it were not installed\n"
        "try:\n"
        "    asyncio.run(durable.Durable(sys.argv[1]).open())\n"
        "except durable.JournalError as exc:\n"
        "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, db, str(tmp_path / "j.db")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(HERE)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ('a postgresql:// journal needs psycopg 3: '
                                   'pip install "psycopg[binary]"')


@pytest.mark.parametrize("target", [
    "mysql://app@db.internal/orders", "host=db.internal dbname=orders user=app"])
def test_a_url_of_another_database_or_a_libpq_string_is_refused_at_construction(
        target: str) -> None:
    # Not taken for the name of an SQLite file, which would quietly be made here.
    with pytest.raises(durable.InvalidInput, match="a file path or a postgresql:// URL"):
        Durable(target)


def test_a_password_in_the_url_is_not_shown() -> None:
    dur = Durable("postgresql://app:s3cret@db.internal:5432/orders")
    assert "s3cret" not in repr(dur) and "app:***@db.internal" in repr(dur)
    dur = Durable("postgresql://app@db.internal/orders?password=s3cret&sslmode=require")
    assert "s3cret" not in repr(dur) and "?password=***&sslmode=require" in repr(dur)


def test_an_unreachable_server_is_a_clear_journal_error(db: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    with pytest.raises(JournalError, match=r"cannot use journal .*server cannot be reached"):
        asyncio.run(Durable(f"postgresql://postgres@127.0.0.1:{port}/postgres").open())
    with pytest.raises(JournalError, match=r'database "no_such_db" does not exist \(the data'):
        asyncio.run(Durable(db.replace("/postgres?", "/no_such_db?")).open())


# A lost connection.


def _steps_and_naps(url: str, count: int, nap: float, **settings: Any
                    ) -> tuple[Durable, Any, list[int]]:
    """A Durable with workflow `wf`: `count` steps n = 0, 1, ... (noted in the list as
    they run), each followed by a durable sleep of `nap`; it returns their sum."""
    ran: list[int] = []
    dur = Durable(url, **settings)

    def step(n: int) -> int:
        ran.append(n)
        return n

    @dur.register
    def wf(ctx):
        total = 0
        for n in range(count):
            total += yield ctx.run(step, n)
            yield ctx.sleep(nap)
        return total

    return dur, wf, ran


def test_connections_killed_by_the_server_are_opened_again_and_nothing_runs_twice(
        db: str, rows: Any) -> None:
    name = f"durable-{db.rsplit('%3D', 1)[1]}"  # this test's connections, and no others
    dur, wf, ran = _steps_and_naps(f"{db}&application_name={name}", 6, 0.05)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", wf)
            for _ in range(3):  # between steps: every connection of this Durable, gone
                await asyncio.sleep(0.12)
                killed = rows(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = ?", (name,))
                assert killed  # the writer's, and the reader's once it read again
            return await handle.result(timeout=30)

    assert asyncio.run(main()) == 15
    assert ran == list(range(6))  # and none of the steps twice


class CuttingProxy:
    """A TCP relay to the server that, once armed, passes the next COMMIT on and then
    cuts the client off before the answer comes back: a commit whose outcome the
    client cannot know."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.down = threading.Event()  # set: the server is unreachable through it
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            cut = threading.Event()  # this pair's: nothing more reaches the client
            for args in ((client, server, cut, True), (server, client, cut, False)):
                threading.Thread(target=self._pipe, args=args, daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cut: threading.Event,
              upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and b"COMMIT" in data and self.armed.is_set():
                    self.armed.clear()
                    cut.set()  # the answer is not passed back
                    self.cut.set()
                    dst.sendall(data)
                    time.sleep(0.2)  # the server has it, and commits
                    break
                if cut.is_set() or self.down.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_commit_whose_answer_is_lost_is_resolved_by_asking_the_server(
        db: str, rows: Any, caplog: pytest.LogCaptureFixture) -> None:
    # run()'s insert is committed by the server, but the connection drops before the
    # answer arrives. durable.py asks the server what became of the transaction: the
    # workflow was created (not "found already there"), and it runs once.
    proxy = CuttingProxy(5432)
    url = db.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert url != db
    ran: list[str] = []
    dur = Durable(url, lease=60)

    @dur.register
    def wf(ctx):
        return (yield ctx.run(ran.append, "once"))

    async def main() -> Any:
        async with dur:
            proxy.armed.set()
            handle = await dur.run("w", wf)
            await handle.result(timeout=30)
            return handle.created

    try:
        with caplog.at_level(logging.INFO, logger="durable"):
            created = asyncio.run(main())
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert created is True
    assert "the server says it committed" in caplog.text
    assert ran == ["once"]
    assert rows(db, "SELECT state FROM workflows") == [("done",)]


def test_the_command_line_on_a_url_refuses_a_database_without_a_journal_and_creates_nothing(
        db: str, rows: Any) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HERE / "durable.py"), *args],
                              capture_output=True, text=True, timeout=60)

    schema = db.rsplit("%3D", 1)[1]
    empty = cli(db, "list")
    assert (empty.returncode, empty.stdout) == (1, "")
    assert "is not a durable.py journal (it holds no journal yet)" in empty.stderr
    assert rows(db, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ?",
                (schema,)) == [(0,)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = cli(f"postgresql://app:pw@127.0.0.1:{port}/orders", "list")
    assert down.returncode == 1 and "server cannot be reached" in down.stderr
    assert "Traceback" not in down.stderr and ":pw@" not in down.stderr


def test_an_outage_that_hides_a_commits_outcome_stops_nothing_for_good(
        db: str, rows: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The connection drops just after a COMMIT went out, and the server stays out of
    # reach for longer than the lease: the outcome cannot be learnt, so it is not
    # assumed; the workflow resumes from the journal once the server is back, and
    # finishes. (The writer thread once died here, and every later write hung.)
    proxy = CuttingProxy(5432)
    url = db.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    dur, wf, ran = _steps_and_naps(url, 4, 0.1, lease=1.0, busy_timeout=0.5)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", wf)
            await asyncio.sleep(0.05)
            proxy.armed.set()  # the next COMMIT's answer is lost...
            while not proxy.cut.is_set():
                await asyncio.sleep(0.01)
            proxy.down.set()  # ...and the server is gone for 2.5 s
            await asyncio.sleep(2.5)
            proxy.down.clear()
            return await handle.result(timeout=30)

    try:
        with caplog.at_level(logging.INFO, logger="durable"):
            assert asyncio.run(main()) == 6
    finally:
        proxy.close()
    assert sorted(set(ran)) == [0, 1, 2, 3]
    assert rows(db, "SELECT state FROM workflows") == [("done",)]


def test_a_write_failed_on_a_locked_row_is_tried_again_until_it_finishes(
        db: str, rows: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Another connection holds the workflow's row past busy_timeout as a step returns:
    # the checkpoint fails, and the resume that follows finds the row still locked (a
    # claim skips it). It must be tried again, not left held here and run by nobody.
    import psycopg
    gate, ran = threading.Event(), []
    dur = Durable(db, busy_timeout=0.05)

    @dur.register
    def wf(ctx):
        yield ctx.run(gate.wait, 10)
        return (yield ctx.run(ran.append, "after"))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", wf)
            with psycopg.connect(db, autocommit=True) as other:
                other.execute("BEGIN")
                other.execute("SELECT 1 FROM durable_workflows WHERE id = 'w' FOR UPDATE")
                gate.set()
                await asyncio.sleep(0.6)
                other.execute("ROLLBACK")
            return await handle.result(timeout=20)

    with caplog.at_level(logging.WARNING, logger="durable"):
        asyncio.run(main())
    assert ran == ["after"]
    assert "could not write its journal" in caplog.text


def _failed_workflow(journal: Any) -> None:
    with journal.transaction():
        journal.insert("w", "wf", "{}", "digest", "A", time.time())
    with journal.transaction():
        assert journal.checkpoint("w", "A", [_step_row(1, "done", "1"), _step_row(2, "failed")],
                                  ("failed", None, '{"type": "X", "message": "x"}'), True)


def test_a_prune_waiting_on_a_retry_spares_the_workflow_it_reopened(db: str) -> None:
    first, second = durable._PostgresJournal(db), durable._PostgresJournal(db)
    try:
        _failed_workflow(first)
        pruned: list[int] = []
        with first.transaction():
            assert durable._retry(first, "w") == 2
            pruner = threading.Thread(target=lambda: pruned.append(
                _in_transaction(second, lambda: durable._prune(second, time.time() + 60, 10))))
            pruner.start()
            pruner.join(0.3)  # it waits for the retry's lock
        pruner.join(10)
        assert pruned == [0]
        assert first.state("w") == ("pending", None)
    finally:
        first.close()
        second.close()


def test_two_retries_at_once_reopen_the_workflow_once(db: str) -> None:
    first, second = durable._PostgresJournal(db), durable._PostgresJournal(db)
    try:
        _failed_workflow(first)
        late: list[BaseException] = []

        def retry_again() -> None:
            try:
                _in_transaction(second, lambda: durable._retry(second, "w"))
            except BaseException as exc:
                late.append(exc)

        with first.transaction():
            assert durable._retry(first, "w") == 2
            racer = threading.Thread(target=retry_again)
            racer.start()
            racer.join(0.3)
        racer.join(10)
        assert [type(exc).__name__ for exc in late] == ["InvalidInput"]
        assert _steps(first) == [(1, "done")]
    finally:
        first.close()
        second.close()


def _in_transaction(journal: Any, fn: Any) -> Any:
    with journal.transaction():
        return fn()


@pytest.mark.parametrize("path, first", [
    ("a, b", "a"), ('"My, Schema", public', '"My, Schema"'), ("$user, public", "$user"),
    ("Mixed", "Mixed"), ("", "")])
def test_the_first_schema_of_a_search_path_is_read_as_postgresql_reads_it(
        path: str, first: str) -> None:
    assert durable._first_in_path(path) == first


def test_schemas_with_odd_names_are_created_as_postgresql_names_them(
        db: str, rows: Any) -> None:
    base = db.split("?")[0]
    for written, named in (('"Odd, Name"', "Odd, Name"), ("MiXeD", "mixed")):
        option = "-csearch_path=" + written.replace(" ", "\\ ")  # libpq: "\ " in options
        url = f"{base}?options={urllib.parse.quote(option, safe='')}"

        async def main(url: str = url) -> None:
            async with Durable(url):
                pass

        try:
            asyncio.run(main())
            assert rows(db, "SELECT count(*) FROM information_schema.tables "
                            "WHERE table_schema = ?", (named,)) == [(5,)]
        finally:
            rows(db, f'DROP SCHEMA IF EXISTS "{named}" CASCADE')


def test_the_order_service_starts_on_a_schema_that_does_not_exist_yet(
        db: str, rows: Any, tmp_path: Path, service_class: Any, order: Any) -> None:
    # Its fake providers make their tables before durable.py opens the journal: the
    # schema the URL names is made for them first.
    schema = "new_" + db.rsplit("%3D", 1)[1]
    service = service_class(tmp_path, db.replace("%3Dt_", "%3Dnew_t_"))
    try:
        service.start()
        assert service.post(order).status_code == 202
        assert service.finished("ord_1001")["status"] == "done"
        assert len(service.charges()) == 1
    finally:
        service.stop()
        rows(db, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
