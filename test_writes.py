"""The journal's writes: wide fan-outs fit SQLite's limits, and no checkpoint of a
workflow commits after an earlier write of it failed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from durable import Context, Durable


def test_a_fan_out_wider_than_one_statement_can_bind_records_every_step_once(
        tmp_path: Path) -> None:
    db = tmp_path / "fan.db"
    dur = Durable(db)
    ran: Counter[int] = Counter()

    async def square(n: int) -> int:
        ran[n] += 1
        await asyncio.sleep(0)
        return n * n

    @dur.register
    async def fan_out(ctx: Context, width: int) -> int:
        results = await asyncio.gather(*(ctx.run(square, n) for n in range(width)))
        return sum(results)

    async def main() -> Any:
        async with dur:
            # As on SQLite before 3.32: 999 values a statement, 90 step rows.
            assert dur._writer is not None
            dur._writer.journal._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            handle = await dur.run("wide", fan_out, 400)
            return await handle.result(timeout=60)

    assert asyncio.run(main()) == sum(n * n for n in range(400))
    assert set(ran.values()) == {1} and len(ran) == 400  # no step ran again
    with sqlite3.connect(db) as conn:
        states = conn.execute("SELECT state, count(*) FROM steps GROUP BY state").fetchall()
        assert states == [("done", 400)]
        assert conn.execute("SELECT state FROM workflows").fetchall() == [("done",)]
    conn.close()


def test_a_journal_outage_keeps_one_resume_timer_per_workflow_and_it_finishes_after(
        tmp_path: Path) -> None:
    # Each failed resume schedules the next one: one timer, backing off, not a doubling.
    db = tmp_path / "outage.db"
    dur = Durable(db, busy_timeout=0.05)

    def step() -> int:
        time.sleep(0.3)
        return 1

    @dur.register
    def wf(ctx: Context) -> Any:
        return (yield ctx.run(step))

    async def main() -> tuple[list[int], int, Any]:
        seen = []
        async with dur:
            handle = await dur.run("w", wf)
            blocker = sqlite3.connect(db, isolation_level=None, timeout=2)
            await asyncio.sleep(0.1)
            blocker.execute("BEGIN IMMEDIATE")  # the step's result cannot be written
            for _ in range(6):
                await asyncio.sleep(0.5)
                seen.append(len(dur._timers))
            blocker.execute("ROLLBACK")
            blocker.close()
            result = await handle.result(timeout=30)
            return seen, len(dur._timers), result

    logging.disable(logging.WARNING)
    try:
        seen, left, result = asyncio.run(main())
    finally:
        logging.disable(logging.NOTSET)
    assert max(seen) == 1 and result == 1 and left == 0


def test_a_sync_step_after_an_async_one_shares_its_checkpoint_with_no_commit_of_its_own(
        tmp_path: Path) -> None:
    # The loop's deferred write must not take a row a step thread deferred meanwhile:
    # async a, then sync b and c in one thread: b's result goes with c's start.
    db = tmp_path / "mixed.db"
    dur = Durable(db)
    commits: list[int] = []

    def hog() -> None:  # the loop busy with another callback, as in a loaded service
        time.sleep(0.05)

    async def a() -> int:
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: loop.call_soon(hog))  # lands just before a's deferred write
        return 1

    def b(n: int) -> int:
        return n + 1

    def c(n: int) -> int:
        return n + 1

    @dur.register
    def wf(ctx: Context) -> Any:
        n = yield ctx.run(a)
        n = yield ctx.run(b, n)
        time.sleep(0.1)  # the workflow's own code, in b's thread: the loop is free meanwhile
        return (yield ctx.run(c, n))

    async def main() -> Any:
        async with dur:
            assert dur._writer is not None
            conn = dur._writer.journal._conn
            conn.set_trace_callback(lambda sql: commits.append(1) if sql == "COMMIT" else None)
            result = await (await dur.run("w", wf)).result(timeout=10)
            conn.set_trace_callback(None)
            return result

    assert asyncio.run(main()) == 3
    # run()'s insert, a's start, b's start (with a's result), c's start (with b's), the end.
    assert len(commits) == 5
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT seq, state FROM steps ORDER BY seq").fetchall() == [
            (1, "done"), (2, "done"), (3, "done")]
    conn.close()
