"""The journal file: settings, opening it, its schema, what it holds, and
trouble writing it."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import durable
from durable import Durable, DurableError, InvalidInput, JournalError

# Settings and the journal file.


@pytest.mark.sqlite_only
def test_journal_is_wal_with_synchronous_full_by_default_and_normal_selectable(
        db: Path, rows: Any) -> None:
    async def main(dur: Durable) -> int:
        async with dur:
            assert dur._writer is not None
            return int(dur._writer.journal._conn.execute("PRAGMA synchronous").fetchone()[0])

    assert asyncio.run(main(Durable(db))) == 2  # FULL
    assert asyncio.run(main(Durable(db, synchronous="NORMAL"))) == 1
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(len(durable._SqliteJournal.MIGRATIONS),)]


@pytest.mark.postgres_only
def test_postgres_journal_commits_synchronously_by_default_and_normal_selectable(
        db: Any) -> None:
    async def main(dur: Durable) -> tuple[str, str, str]:
        async with dur:
            assert dur._writer is not None
            conn = dur._writer.journal._conn
            return tuple(conn.execute(  # type: ignore[return-value]
                "SELECT current_setting('synchronous_commit'), "
                "current_setting('idle_in_transaction_session_timeout'), "
                "current_setting('lock_timeout')").fetchone())

    assert asyncio.run(main(Durable(db))) == ("on", "30s", "5s")
    assert asyncio.run(main(Durable(db, synchronous="NORMAL", lease=2, busy_timeout=0.5))) \
        == ("off", "2s", "500ms")


@pytest.mark.parametrize("settings", [
    {"synchronous": "OFF"}, {"busy_timeout": -1}, {"retry": 3}, {"max_threads": 0},
    {"max_running": 0}, {"max_running": True}, {"max_running": 2.0}, {"lease": 0},
    {"lease": "30"},
])
def test_bad_settings_are_refused_at_construction(db: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        Durable(db, **settings)


def test_memory_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="file path"):
        Durable(":memory:")


@pytest.mark.sqlite_only
def test_file_that_is_not_a_database_is_refused_and_left_untouched(db: Path) -> None:
    db.write_bytes(b"this is a text file, not SQLite\n" * 100)
    before = db.read_bytes()
    with pytest.raises(JournalError, match=r"not a durable\.py journal"):
        asyncio.run(Durable(db).open())
    assert db.read_bytes() == before


@pytest.mark.sqlite_only
def test_sqlite_database_of_another_application_is_refused_and_left_untouched(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    before = db.read_bytes()
    with pytest.raises(JournalError, match=r"not a durable\.py journal"):
        asyncio.run(Durable(db).open())
    assert db.read_bytes() == before


def test_journal_with_a_newer_schema_is_refused_with_advice(db: Path, rows: Any,
                                                           store: str) -> None:
    async def touch() -> None:
        async with Durable(db):
            pass

    asyncio.run(touch())
    rows(db, "UPDATE durable_schema SET version = 99" if store == "postgres"
         else "PRAGMA user_version = 99")
    with pytest.raises(JournalError, match=r"schema version 99, newer than this durable\.py"
                                           r".*; upgrade durable\.py to open it"):
        asyncio.run(touch())


def test_journal_in_a_missing_directory_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot open journal"):
        asyncio.run(Durable(tmp_path / "nope" / "j.db").open())


def test_run_before_open_says_how_to_open(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx):
        yield ctx.run(str)

    with pytest.raises(DurableError, match="async with dur"):
        asyncio.run(dur.run("x", wf))


def test_journal_holds_json_only(db: Path, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, order):
        total = yield ctx.run(lambda o: sum(i["price"] for i in o["items"]), order)
        return {"total": total}

    async def main() -> None:
        async with dur:
            await (await dur.run("j1", wf, {"items": [{"price": 5}, {"price": 7}]})).result()

    asyncio.run(main())
    (text, result), = rows(db, "SELECT input, result FROM workflows")
    assert json.loads(text) == {"args": [{"items": [{"price": 5}, {"price": 7}]}], "kwargs": {}}
    assert json.loads(result) == {"total": 12}
    assert [json.loads(r) for r, in rows(db, "SELECT result FROM steps")] == [12]


# Journal trouble.


def test_open_that_fails_leaves_nothing_running_and_can_be_tried_again(
        db: Path, write_lock: Any) -> None:
    async def open_and_close(dur: Durable) -> None:
        async with dur:
            pass

    asyncio.run(open_and_close(Durable(db)))  # a journal to lock
    dur = Durable(db, busy_timeout=0.05)
    threads = set(threading.enumerate())
    with write_lock(db) as says, pytest.raises(JournalError, match=says):
        asyncio.run(dur.open())
    assert not [t for t in set(threading.enumerate()) - threads if t.name.startswith("durable")]
    asyncio.run(open_and_close(dur))  # not "already open"


def test_journal_locked_past_busy_timeout_delays_the_workflow_then_it_finishes(
        db: Path, write_lock: Any, caplog: pytest.LogCaptureFixture) -> None:
    dur = Durable(db, busy_timeout=0.05)
    gate = threading.Event()

    @dur.register
    def wf(ctx):
        yield ctx.run(gate.wait, 10)
        return (yield ctx.run(str, "done"))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("l", wf)
            with write_lock(db) as says:  # another process holds the write lock
                gate.set()
                await asyncio.sleep(0.4)
                assert not await handle.done()
            return says, await handle.result(timeout=10)

    with caplog.at_level(logging.WARNING, logger="durable"):
        says, result = asyncio.run(main())
    assert result == "done"
    assert "could not write its journal" in caplog.text
    assert says in caplog.text


def test_a_checkpoint_writing_one_step_twice_keeps_its_last_row_and_first_start(
        db: Any) -> None:
    # A failed attempt's row and the next attempt's begin row can share a checkpoint;
    # on PostgreSQL one statement may not write a row twice, so the store merges them.
    journal = durable._open_journal(str(db))
    try:
        with journal.transaction():
            journal.insert("w", "wf", "{}", "digest", "me", 1.0)
        first = ("w", 1, "step", "running", 1, None, None, None, 10.0, 10.0, None)
        second = ("w", 1, "renamed", "running", 2, None, None, '[{"attempt": 1}]', 20.0,
                  20.0, None)
        done = ("w", 2, "next", "done", 1, '"x"', None, None, 30.0, 31.0, 31.0)
        with journal.transaction():
            assert journal.checkpoint("w", "me", [first, second, done], None, True)
        assert journal.status("w")[1] == [
            (1, "step", "running", 2, None, None, '[{"attempt": 1}]', 10.0, 20.0, None),
            (2, "next", "done", 1, '"x"', None, None, 30.0, 31.0, 31.0)]
    finally:
        journal.close()
