"""The journal's writes: wide fan-outs fit SQLite's limits, and no checkpoint of a
workflow commits after an earlier write of it failed."""

from __future__ import annotations

import asyncio
import sqlite3
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
