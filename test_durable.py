"""Tests of durable.py on real SQLite files, with real processes killed mid-step."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import durable
from durable import (
    Durable,
    DurableError,
    IdempotencyConflict,
    InvalidInput,
    JournalError,
    NonDeterminismError,
    NotFound,
    Permanent,
    RetryPolicy,
    StepFailed,
    WorkflowCancelled,
    WorkflowFailed,
)

HERE = Path(__file__).resolve().parent
FAST = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


def failure(dur: Durable, wf: Any) -> WorkflowFailed:
    """Run `wf` once in `dur`; it must fail. Its WorkflowFailed."""
    async def main() -> WorkflowFailed:
        async with dur:
            with pytest.raises(WorkflowFailed) as info:
                await (await dur.run("failing", wf)).result()
            return info.value

    return asyncio.run(main())


# Registration.


def test_register_returns_the_function_unchanged_with_and_without_arguments(db: Path) -> None:
    dur = Durable(db)

    def plain(ctx):
        yield ctx.run(str)

    async def named(ctx):
        return 1

    assert dur.register(plain) is plain
    assert dur.register(name="orders.v2", retry=FAST)(named) is named
    assert dur._workflow("orders.v2").fn is named
    assert dur._workflow(plain).name == "plain"  # without "<locals>."


def test_register_refuses_a_second_function_under_the_same_name(db: Path) -> None:
    dur = Durable(db)

    def one(ctx):
        yield ctx.run(str)

    def two(ctx):
        yield ctx.run(str)

    dur.register(name="wf")(one)
    dur.register(name="wf")(one)  # the same function again is harmless
    with pytest.raises(InvalidInput, match="already registered"):
        dur.register(name="wf")(two)


def test_register_refuses_a_function_that_is_neither_generator_nor_async(db: Path) -> None:
    dur = Durable(db)
    with pytest.raises(InvalidInput, match="generator"):
        dur.register(lambda ctx: 1)


@pytest.mark.parametrize("name", ["", "orders\x00v2", 42])
def test_register_refuses_an_empty_or_non_string_name_or_one_with_nul(
        db: Path, name: Any) -> None:
    def wf(ctx):
        yield ctx.run(str)

    with pytest.raises(InvalidInput, match="non-empty string"):
        Durable(db).register(name=name)(wf)


def test_registered_name_is_recorded_and_usable_in_run(db: Path) -> None:
    dur = Durable(db)

    @dur.register(name="greeting")
    def hello(ctx, who):
        return (yield ctx.run(str.upper, who))

    async def main() -> None:
        async with dur:
            handle = await dur.run("g1", "greeting", "ada")
            assert await handle.result() == "ADA"
            assert (await handle.status()).name == "greeting"

    asyncio.run(main())


# Settings and the journal file.


def test_journal_is_wal_with_synchronous_full_by_default_and_normal_selectable(
        db: Path, rows: Any) -> None:
    async def main(dur: Durable) -> int:
        async with dur:
            assert dur._writer is not None
            return int(dur._writer._conn.execute("PRAGMA synchronous").fetchone()[0])

    assert asyncio.run(main(Durable(db))) == 2  # FULL
    assert asyncio.run(main(Durable(db, synchronous="NORMAL"))) == 1
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(len(durable._MIGRATIONS),)]


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


def test_file_that_is_not_a_database_is_refused_and_left_untouched(db: Path) -> None:
    db.write_bytes(b"this is a text file, not SQLite\n" * 100)
    before = db.read_bytes()
    with pytest.raises(JournalError, match=r"not a durable\.py journal"):
        asyncio.run(Durable(db).open())
    assert db.read_bytes() == before


def test_sqlite_database_of_another_application_is_refused_and_left_untouched(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    before = db.read_bytes()
    with pytest.raises(JournalError, match=r"not a durable\.py journal"):
        asyncio.run(Durable(db).open())
    assert db.read_bytes() == before


def test_journal_with_a_newer_schema_is_refused_with_advice(db: Path) -> None:
    async def touch() -> None:
        async with Durable(db):
            pass

    asyncio.run(touch())
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match=r"upgrade durable\.py"):
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


# Running: the two workflow forms and steps.


def test_run_returns_only_after_the_workflow_is_committed(db: Path, rows: Any) -> None:
    dur = Durable(db)
    gate = threading.Event()

    @dur.register
    def wf(ctx):
        yield ctx.run(gate.wait, 5)

    async def main() -> None:
        async with dur:
            await dur.run("c1", wf)
            # Another connection, as another process would see the file.
            assert rows(db, "SELECT id, state FROM workflows") == [("c1", "pending")] or \
                rows(db, "SELECT id, state FROM workflows") == [("c1", "running")]
            gate.set()

    asyncio.run(main())


@pytest.fixture
def journal_of(rows: Any) -> Any:
    """journal_of(db, wf_id): the workflow's steps as (seq, name, state, attempts, result)."""
    return lambda db, wf_id: rows(db, "SELECT seq, name, state, attempts, result FROM steps "
                                      "WHERE workflow_id = ? ORDER BY seq", (wf_id,))


def test_generator_and_async_workflows_have_the_same_semantics(db: Path, journal_of: Any) -> None:
    dur = Durable(db, retry=FAST)
    ran: list[str] = []

    def reserve(order: dict[str, Any], *, qty: int) -> dict[str, Any]:
        ran.append("reserve")
        return {"sku": order["sku"], "qty": qty}

    async def charge(amount: int) -> str:
        ran.append("charge")
        raise Permanent(f"card declined for {amount}")

    def release(sku: str) -> bool:
        ran.append("release")
        return True

    @dur.register
    def gen_wf(ctx, order):
        held = yield ctx.run(reserve, order, qty=2)
        try:
            yield ctx.run(charge, 100)
        except StepFailed as exc:
            released = yield ctx.run(release, held["sku"])
            return {"held": held, "released": released, "why": exc.message}
        return None

    @dur.register
    async def async_wf(ctx, order):
        held = await ctx.run(reserve, order, qty=2)
        try:
            await ctx.run(charge, 100)
        except StepFailed as exc:
            released = await ctx.run(release, held["sku"])
            return {"held": held, "released": released, "why": exc.message}
        return None

    async def main() -> list[Any]:
        async with dur:
            a = await (await dur.run("g", gen_wf, {"sku": "w"})).result()
            b = await (await dur.run("a", async_wf, {"sku": "w"})).result()
            return [a, b]

    a, b = asyncio.run(main())
    assert a == b == {"held": {"sku": "w", "qty": 2}, "released": True,
                      "why": "card declined for 100"}
    assert journal_of(db, "g") == journal_of(db, "a")
    assert ran == ["reserve", "charge", "release"] * 2


def test_sync_steps_run_in_worker_threads_and_do_not_block_the_event_loop(db: Path) -> None:
    dur = Durable(db)
    threads: list[int] = []

    def slow() -> int:
        threads.append(threading.get_ident())
        time.sleep(0.5)
        return 1

    @dur.register
    def wf(ctx):
        return (yield ctx.run(slow))

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with dur:
            tick = asyncio.create_task(ticker())
            await (await dur.run("t", wf)).result()
            tick.cancel()
        return ticks

    ticks = asyncio.run(main())
    assert threads and threads[0] != threading.get_ident()
    assert ticks >= 10  # the loop kept turning while the step slept in its thread


def test_sync_steps_share_a_bounded_pool_of_threads(db: Path) -> None:
    dur = Durable(db, max_threads=2)
    lock = threading.Lock()
    now, peak = 0, 0

    def busy() -> None:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.1)
        with lock:
            now -= 1

    @dur.register
    def wf(ctx):
        yield ctx.run(busy)

    async def main() -> None:
        async with dur:
            handles = [await dur.run(f"p{i}", wf) for i in range(6)]
            await asyncio.gather(*(h.result() for h in handles))

    asyncio.run(main())
    assert peak == 2


def test_max_running_bounds_workflows_at_once_and_the_rest_wait_recorded(
        db: Path, rows: Any) -> None:
    dur = Durable(db, max_running=2)
    inside, peak = 0, 0
    starts: dict[str, int] = {}

    async def hold() -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        try:
            await asyncio.sleep(0.05)
        finally:  # close() cancels it
            inside -= 1

    @dur.register
    def wf(ctx):
        starts[ctx.id] = starts.get(ctx.id, 0) + 1
        yield ctx.run(hold)
        yield ctx.run(hold)
        return ctx.id

    async def main() -> None:
        async with dur:
            started = time.monotonic()
            handles = [await dur.run(f"m{i}", wf) for i in range(6)]
            assert time.monotonic() - started < 1  # run() does not wait for a slot
            assert len(dur._running) == 2  # the others wait as plain values, not tasks
            states = {(await h.status()).state for h in handles}
            assert "pending" in states  # the waiting ones are recorded, not yet started
            again = await dur.run("m4", wf)  # a duplicate of a waiting one starts nothing
            assert not again.created
            assert await dur.cancel("m5")  # cancelled while waiting for its turn
            assert [await h.result() for h in handles[:5]] == [f"m{i}" for i in range(5)]
            with pytest.raises(WorkflowCancelled):
                await handles[5].result()
            assert not dur._running  # nothing is left waiting for a slot
            # close() with workflows still waiting for a slot ends at once; they stay
            # unfinished in the journal and run at the next open.
            for i in range(6, 10):
                await dur.run(f"m{i}", wf)

    asyncio.run(main())
    assert peak == 2
    assert all(starts[f"m{i}"] == 1 for i in range(5)) and "m5" not in starts
    assert rows(db, "SELECT count(*) FROM workflows WHERE state IN ('pending', 'running')") \
        != [(0,)]

    async def reopen() -> list[Any]:
        again = Durable(db, max_running=2)
        again.register(wf)
        async with again:
            return [await (await again.get(f"m{i}")).result() for i in range(6, 10)]

    assert asyncio.run(reopen()) == [f"m{i}" for i in range(6, 10)]
    assert peak == 2


def test_consecutive_sync_steps_go_on_in_their_thread_without_the_event_loop(
        db: Path, rows: Any) -> None:
    # A generator workflow's next sync step begins in the thread that ran the last one:
    # steps go on while the event loop is busy, and the journal is the same.
    dur = Durable(db, retry=FAST)
    first_ran, ran_at = threading.Event(), {}
    tries = {"flaky": 0}

    def step(name: str) -> str:
        if name == "a":
            first_ran.set()
            time.sleep(0.05)
        if name == "flaky" and tries["flaky"] < 1:
            tries["flaky"] += 1
            raise ConnectionError("try again")
        ran_at[name] = time.monotonic()
        return name.upper()

    @dur.register
    def wf(ctx):
        a = yield ctx.run(step, "a")
        b = yield ctx.run(step, "b")
        c = yield ctx.run(step, "c")
        d = yield ctx.run(step, "flaky")  # fails once in the thread: retried by the loop
        return a + b + c + d

    async def main() -> tuple[Any, float]:
        async with dur:
            handle = await dur.run("w", wf)
            await asyncio.to_thread(first_ran.wait, 5)
            time.sleep(0.5)  # the event loop is blocked: steps b and c still run
            unblocked = time.monotonic()
            return await handle.result(timeout=10), unblocked

    result, unblocked = asyncio.run(main())
    assert result == "ABCFLAKY"
    assert ran_at["c"] < unblocked
    assert rows(db, "SELECT seq, name, state, attempts, result FROM steps ORDER BY seq") == [
        (1, "step", "done", 1, '"A"'), (2, "step", "done", 1, '"B"'),
        (3, "step", "done", 1, '"C"'), (4, "step", "done", 2, '"FLAKY"')]
    failures = json.loads(rows(db, "SELECT failures FROM steps WHERE seq = 4")[0][0])
    assert [f["error"]["type"] for f in failures] == ["ConnectionError"]


def test_a_workflow_run_alone_starts_in_a_step_thread(db: Path, rows: Any) -> None:
    # With nothing else running, run() hands a generator workflow to a step thread that
    # commits the insert, answers run() and starts the workflow there: its code up to
    # the first step runs in that thread, not the event loop's. With another workflow
    # running, a new one starts from the event loop. Duplicates start nothing.
    dur = Durable(db)
    began_in: dict[str, str] = {}
    release = threading.Event()

    def step(name: str) -> str:
        if name == "hold-a":
            release.wait(5)
        return name.upper()

    @dur.register
    def wf(ctx, tag):
        began_in[tag] = threading.current_thread().name
        a = yield ctx.run(step, f"{tag}-a")
        b = yield ctx.run(step, f"{tag}-b")
        return a + b

    async def main() -> None:
        async with dur:
            handle = await dur.run("alone", wf, "alone")
            assert handle.created and await handle.result() == "ALONE-AALONE-B"
            again = await dur.run("alone", wf, "alone")
            assert not again.created and await again.result() == "ALONE-AALONE-B"
            with pytest.raises(IdempotencyConflict):
                await dur.run("alone", wf, "other")
            held = await dur.run("hold", wf, "hold")  # alone too; holds its step thread
            second = await dur.run("second", wf, "second")  # not alone: from the loop
            assert await second.result() == "SECOND-ASECOND-B"
            release.set()
            assert await held.result() == "HOLD-AHOLD-B"

    asyncio.run(main())
    assert began_in["alone"].startswith("durable-step-")
    assert began_in["hold"].startswith("durable-step-")
    assert began_in["second"] == threading.main_thread().name
    assert rows(db, "SELECT id, state FROM workflows ORDER BY id") == [
        ("alone", "done"), ("hold", "done"), ("second", "done")]
    assert rows(db, "SELECT seq, state, attempts, result FROM steps WHERE workflow_id = "
                    "'alone' ORDER BY seq") == [(1, "done", 1, '"ALONE-A"'),
                                                (2, "done", 1, '"ALONE-B"')]


REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                       default=None)


def test_workflow_code_between_sync_steps_sees_its_own_context_variables(db: Path) -> None:
    # The code between two sync steps may run in a step thread: it must still see the
    # context of the run() that started it, and nothing another workflow set there.
    dur = Durable(db)
    seen: list[tuple[str, str | None]] = []

    def step(n: int) -> int:
        return n

    @dur.register
    def wf(ctx, tag):
        yield ctx.run(step, 1)
        seen.append((tag, REQUEST_ID.get()))
        REQUEST_ID.set(f"set-by-{tag}")
        yield ctx.run(step, 2)
        seen.append((tag, REQUEST_ID.get()))

    async def main() -> None:
        async with dur:
            for tag in ("A", "B"):
                REQUEST_ID.set(f"req-{tag}")
                await (await dur.run(tag, wf, tag)).result()

    asyncio.run(main())
    assert seen == [("A", "req-A"), ("A", "set-by-A"), ("B", "req-B"), ("B", "set-by-B")]


STEP_NOTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("step_note",
                                                                      default=None)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "beside-another"])
def test_a_workflow_keeps_its_context_variables_wherever_its_code_runs(
        db: Path, alone: bool) -> None:
    # A workflow's code runs on the event loop or in a step thread (alone, from its
    # start; between sync steps). Wherever it runs it sees the run() caller's context
    # variables and what it set itself earlier, also after an async step or a sleep
    # brought it back to the loop, and may reset it with its token; steps, sync or
    # async, see the workflow's variables, and what a step sets stays in that step.
    dur = Durable(db)
    seen: list[tuple[str, str, str | None, str | None]] = []
    gate = threading.Event()

    def step(n: int) -> int:
        STEP_NOTE.set("set-by-a-step")
        return n

    async def async_step(tag: str) -> str:
        seen.append((tag, "in async step", REQUEST_ID.get(), STEP_NOTE.get()))
        STEP_NOTE.set("set-by-an-async-step")
        return tag

    @dur.register
    def wf(ctx, tag):
        seen.append((tag, "start", REQUEST_ID.get(), STEP_NOTE.get()))
        token = REQUEST_ID.set(f"set-by-{tag}")
        yield ctx.run(step, 1)
        yield ctx.run(step, 2)
        yield ctx.run(async_step, tag)  # back on the event loop
        seen.append((tag, "after async step", REQUEST_ID.get(), STEP_NOTE.get()))
        yield ctx.sleep(0)
        seen.append((tag, "after sleep", REQUEST_ID.get(), STEP_NOTE.get()))
        yield ctx.run(step, 3)
        REQUEST_ID.reset(token)  # as OpenTelemetry's detach() does
        seen.append((tag, "after reset", REQUEST_ID.get(), STEP_NOTE.get()))

    @dur.register
    async def async_wf(ctx, tag):
        seen.append((tag, "start", REQUEST_ID.get(), STEP_NOTE.get()))

    @dur.register
    def hold(ctx):
        yield ctx.run(gate.wait, 10)

    async def main() -> None:
        async with dur:
            held = None if alone else await dur.run("held", hold)
            for tag, fn in (("A", wf), ("B", wf), ("C", async_wf)):
                REQUEST_ID.set(f"req-{tag}")
                await (await dur.run(tag, fn, tag)).result(timeout=10)
            gate.set()
            if held is not None:
                await held.result(timeout=10)

    asyncio.run(main())
    assert seen == [
        (tag, where, request_id, None) for tag in ("A", "B") for where, request_id in [
            ("start", f"req-{tag}"), ("in async step", f"set-by-{tag}"),
            ("after async step", f"set-by-{tag}"), ("after sleep", f"set-by-{tag}"),
            ("after reset", f"req-{tag}")]] + [("C", "start", "req-C", None)]


def test_done_is_true_for_a_finished_workflow_while_a_duplicate_run_is_answered(
        db: Path, lambda_free_workflow: Any) -> None:
    # A duplicate run() of a finished workflow goes the alone path too; until its insert
    # answers, done() must still read the journal rather than trust the new context.
    dur = Durable(db)
    dur.register(name="w")(lambda_free_workflow(lambda: 1))

    async def main() -> list[bool]:
        async with dur:
            handle = await dur.run("w1", "w")
            await handle.result()
            answers = []
            for _ in range(20):
                again = asyncio.create_task(dur.run("w1", "w"))
                await asyncio.sleep(0)  # the duplicate is on its way
                answers.append(await handle.done())
                assert not (await again).created
            return answers

    assert asyncio.run(main()) == [True] * 20


def test_no_step_of_a_cancelled_workflow_starts_even_if_its_id_is_reused(
        db: Path, rows: Any) -> None:
    # Cancelled while its code runs between two steps (in a step thread), then pruned
    # and its id used again: the old workflow's next step never runs or writes.
    dur = Durable(db)
    between, ran = threading.Event(), []

    def step(tag: str, n: int) -> int:
        ran.append((tag, n))
        return n

    @dur.register
    def wf(ctx, tag):
        if tag == "new":
            return (yield ctx.options(name="only").run(step, tag, 1))
        yield ctx.run(step, tag, 1)
        between.set()
        time.sleep(0.3)  # workflow code between steps
        yield ctx.options(name="charge").run(step, tag, 2)
        return tag

    async def main() -> Any:
        async with dur:
            await dur.run("x", wf, "old")
            await asyncio.to_thread(between.wait, 5)
            assert await dur.cancel("x")
            await asyncio.sleep(0.01)
            assert await dur.prune(0) == 1
            result = await (await dur.run("x", wf, "new")).result(timeout=5)
            await asyncio.sleep(0.5)  # the old workflow's code has long returned
            return result

    assert asyncio.run(main()) == 1
    assert ("old", 2) not in ran
    assert rows(db, "SELECT seq, name, state FROM steps ORDER BY seq") == [(1, "only", "done")]


def test_async_steps_are_awaited_on_the_event_loop(db: Path) -> None:
    dur = Durable(db)

    async def step() -> int:
        return threading.get_ident()

    @dur.register
    async def wf(ctx):
        return await ctx.run(step)

    async def main() -> Any:
        async with dur:
            return await (await dur.run("s", wf)).result()

    assert asyncio.run(main()) == threading.get_ident()


def test_step_options_never_collide_with_the_steps_own_keyword_arguments(db: Path) -> None:
    dur = Durable(db, retry=FAST)
    seen: list[Any] = []

    def step(x: int, retry: str, name: str) -> None:
        seen.append((x, retry, name))
        raise ConnectionError("down")

    @dur.register
    def wf(ctx):
        opts = ctx.options(retry=RetryPolicy(max_attempts=2, initial_delay=0), name="custom")
        yield opts.run(step, 1, retry="mine", name="theirs")

    async def main() -> Any:
        async with dur:
            handle = await dur.run("o", wf)
            with pytest.raises(WorkflowFailed):
                await handle.result()
            return await handle.status()

    status = asyncio.run(main())
    assert seen == [(1, "mine", "theirs")] * 2
    assert [(s.name, s.attempts) for s in status.steps] == [("custom", 2)]


def test_retry_policy_is_taken_from_step_then_workflow_then_durable(db: Path) -> None:
    dur = Durable(db, retry=RetryPolicy(max_attempts=4, initial_delay=0))

    def flaky() -> None:
        raise ConnectionError("down")

    @dur.register
    def default_policy(ctx):
        yield ctx.run(flaky)

    @dur.register(retry=RetryPolicy(max_attempts=3, initial_delay=0))
    def workflow_policy(ctx):
        yield ctx.run(flaky)

    @dur.register(retry=RetryPolicy(max_attempts=3, initial_delay=0))
    def step_policy(ctx):
        yield ctx.options(retry=RetryPolicy(max_attempts=2, initial_delay=0)).run(flaky)

    async def main() -> list[int]:
        attempts = []
        async with dur:
            for wf in (default_policy, workflow_policy, step_policy):
                handle = await dur.run(wf.__name__, wf)
                with pytest.raises(WorkflowFailed):
                    await handle.result()
                attempts.append((await handle.status()).steps[0].attempts)
        return attempts

    assert asyncio.run(main()) == [4, 3, 2]


# Idempotency.


def test_same_id_and_arguments_returns_the_existing_workflow_without_new_work(
        db: Path, count: Any) -> None:
    dur = Durable(db)
    ran: list[int] = []

    @dur.register
    def wf(ctx, n, *, label):
        return (yield ctx.run(lambda: ran.append(n) or n * 2))

    async def main() -> None:
        async with dur:
            first = await dur.run("i1", wf, 21, label="x")
            assert first.created and await first.result() == 42
            again = await dur.run("i1", wf, 21, label="x")
            assert not again.created and await again.result() == 42

    asyncio.run(main())
    assert ran == [21]
    assert count(db, "workflows") == 1


def test_keyword_order_does_not_change_the_idempotency_hash(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, a, b):
        yield ctx.run(str)

    async def main() -> bool:
        async with dur:
            await dur.run("k", wf, a={"x": 1, "y": 2}, b=2)
            return (await dur.run("k", wf, b=2, a={"y": 2, "x": 1})).created

    assert asyncio.run(main()) is False


def test_same_id_with_different_arguments_raises_conflict_and_changes_nothing(
        db: Path, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, n):
        yield ctx.run(str, n)

    @dur.register
    def other(ctx, n):
        yield ctx.run(str, n)

    async def main() -> None:
        async with dur:
            await (await dur.run("i2", wf, 1)).result()
            before = rows(db, "SELECT * FROM workflows")
            with pytest.raises(IdempotencyConflict, match="different arguments"):
                await dur.run("i2", wf, 2)
            with pytest.raises(IdempotencyConflict, match="already exists as"):
                await dur.run("i2", other, 1)
            assert rows(db, "SELECT * FROM workflows") == before

    asyncio.run(main())


def test_a_refused_run_does_not_disturb_the_others_committed_with_it(db: Path, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, n):
        return (yield ctx.run(str, n))

    async def main() -> list[Any]:
        async with dur:
            await dur.run("taken", wf, 1)
            # Queued together, these share one transaction (group commit).
            return await asyncio.gather(
                dur.run("a", wf, 1), dur.run("taken", wf, 2), dur.run("b", wf, 1),
                return_exceptions=True)

    a, conflict, b = asyncio.run(main())
    assert isinstance(conflict, IdempotencyConflict)
    assert a.created and b.created
    assert sorted(r[0] for r in rows(db, "SELECT id FROM workflows")) == ["a", "b", "taken"]
    assert rows(db, "SELECT input FROM workflows WHERE id = 'taken'") == [
        ('{"args":[1],"kwargs":{}}',)]


def test_concurrent_duplicate_runs_in_one_process_execute_once(db: Path) -> None:
    dur = Durable(db)
    ran: list[str] = []
    lock = threading.Lock()

    def step(name: str) -> str:
        with lock:
            ran.append(name)
        return name

    @dur.register
    def wf(ctx, order):
        yield ctx.run(step, "validate")
        yield ctx.run(step, "charge")
        return order

    async def main() -> list[Any]:
        async with dur:
            handles = await asyncio.gather(*(dur.run("dup", wf, {"id": 7}) for _ in range(50)))
            results = await asyncio.gather(*(h.result() for h in handles))
            return [sum(h.created for h in handles), results]

    created, results = asyncio.run(main())
    assert created == 1
    assert results == [{"id": 7}] * 50
    assert ran == ["validate", "charge"]


def test_many_runs_committed_together_answer_as_if_one_after_another(db: Path, rows: Any) -> None:
    # Inserts queued together are written in one statement: duplicates and conflicts
    # inside one batch must still get the answers a one-by-one order would give.
    dur = Durable(db)

    @dur.register
    async def wf(ctx, n):
        return n

    @dur.register
    async def other(ctx, n):
        return n

    async def main() -> list[Any]:
        async with dur:
            await dur.run("old", wf, 0)
            calls = []
            for i in range(300):
                calls += [dur.run(f"w{i}", wf, i), dur.run(f"w{i}", wf, i),
                          dur.run(f"w{i}", wf, -1), dur.run(f"w{i}", other, i)]
            calls += [dur.run("old", wf, 0), dur.run("old", wf, 1)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            results = [await (await dur.get(f"w{i}")).result() for i in range(300)]
            return [outcomes, results]

    outcomes, results = asyncio.run(main())
    for i in range(300):
        first, again, other_args, other_name = outcomes[4 * i:4 * i + 4]
        assert (first.created, again.created) == (True, False)
        assert isinstance(other_args, IdempotencyConflict) and "arguments" in str(other_args)
        assert isinstance(other_name, IdempotencyConflict) and "'wf'" in str(other_name)
    assert outcomes[-2].created is False and isinstance(outcomes[-1], IdempotencyConflict)
    assert results == list(range(300))
    assert rows(db, "SELECT count(*) FROM workflows") == [(301,)]


# Bad input.


@pytest.mark.parametrize("wf_id, args, kwargs, message", [
    ("", (1,), {}, "must not be empty"),
    ("x" * 256, (1,), {}, "at most 255"),
    (42, (1,), {}, "must be a string"),
    (None, (1,), {}, "must be a string"),
    ("a\x00b", (1,), {}, "NUL"),
    ("ok", ({1, 2},), {}, "JSON"),
    ("ok", (float("nan"),), {}, "JSON"),
    ("ok", (object(),), {}, "JSON"),
    ("ok", (functools.reduce(lambda inner, _: [inner], range(5000), []),), {},
     "nested too deeply"),
    ("ok", (), {}, "do not fit"),
    ("ok", (1, 2), {}, "do not fit"),
    ("ok", (1,), {"nope": 1}, "do not fit"),
])
def test_bad_input_to_run_is_refused_before_anything_is_written(
        db: Path, wf_id: Any, args: tuple[Any, ...], kwargs: dict[str, Any], message: str,
        count: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, n):
        yield ctx.run(str, n)

    async def main() -> None:
        async with dur:
            with pytest.raises(InvalidInput, match=message):
                await dur.run(wf_id, wf, *args, **kwargs)

    asyncio.run(main())
    assert count(db, "workflows") == 0


def test_unregistered_workflow_is_refused_before_anything_is_written(db: Path, count: Any) -> None:
    dur = Durable(db)

    def stray(ctx):
        yield ctx.run(str)

    async def main() -> None:
        async with dur:
            with pytest.raises(InvalidInput, match="not a registered workflow"):
                await dur.run("u", stray)
            with pytest.raises(InvalidInput, match="not a registered workflow"):
                await dur.run("u", "no-such-name")

    asyncio.run(main())
    assert count(db, "workflows") == 0


def test_an_id_of_255_characters_is_accepted(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx):
        yield ctx.run(str)

    async def main() -> bool:
        async with dur:
            return (await dur.run("x" * 255, wf)).created

    assert asyncio.run(main())


# Retries and failures.


def test_transient_failure_is_retried_and_attempts_are_journaled(db: Path) -> None:
    dur = Durable(db, retry=FAST)
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("try again")
        return "ok"

    @dur.register
    def wf(ctx):
        return (yield ctx.run(flaky))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("r", wf)
            assert await handle.result() == "ok"
            return await handle.status()

    status = asyncio.run(main())
    assert calls == 3
    assert [(s.state, s.attempts) for s in status.steps] == [("done", 3)]


def test_each_retry_logs_a_warning_and_a_failed_workflow_logs_an_error(
        db: Path, caplog: pytest.LogCaptureFixture) -> None:
    dur = Durable(db, retry=FAST)

    @dur.register
    def wf(ctx):
        yield ctx.run(lambda: 1 / 0)

    async def main() -> None:
        async with dur:
            with pytest.raises(WorkflowFailed):
                await (await dur.run("log", wf)).result()

    with caplog.at_level(logging.WARNING, logger="durable"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 2 and "ZeroDivisionError" in warnings[0].getMessage()
    assert len(errors) == 1 and "'log' failed" in errors[0].getMessage()


def test_backoff_grows_exponentially_up_to_the_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, initial_delay=1, backoff=2, max_delay=5, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = RetryPolicy(initial_delay=1, backoff=2, max_delay=100, jitter=0.5)
    assert jittered.delay(3, rand=lambda: 0.0) == 4
    assert jittered.delay(3, rand=lambda: 1.0) == 2
    assert all(2 <= jittered.delay(3) <= 4 for _ in range(100))
    assert RetryPolicy(backoff=10, jitter=0).delay(10_000) == RetryPolicy().max_delay


def test_retries_wait_between_attempts(db: Path) -> None:
    dur = Durable(db, retry=RetryPolicy(max_attempts=3, initial_delay=0.1, backoff=2, jitter=0))

    @dur.register
    def wf(ctx):
        yield ctx.run(lambda: 1 / 0)

    async def main() -> float:
        async with dur:
            handle = await dur.run("w", wf)
            start = time.monotonic()
            with pytest.raises(WorkflowFailed):
                await handle.result()
            return time.monotonic() - start

    assert asyncio.run(main()) >= 0.1 + 0.2


def test_default_retry_policy_is_finite() -> None:
    assert 1 < RetryPolicy().max_attempts < 100
    assert RetryPolicy().max_delay < float("inf")


@pytest.mark.parametrize("settings", [
    {"max_attempts": 0}, {"max_attempts": 1.5}, {"max_attempts": True}, {"initial_delay": -1},
    {"backoff": 0.5}, {"max_delay": -1}, {"jitter": 2}, {"initial_delay": "1"},
])
def test_bad_retry_policy_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        RetryPolicy(**settings)


class Declined(Permanent):
    pass


@pytest.mark.parametrize("exc", [Permanent("no"), Declined("no")])
def test_permanent_errors_are_never_retried(db: Path, exc: Exception) -> None:
    dur = Durable(db, retry=FAST)
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        raise exc

    @dur.register
    def wf(ctx):
        yield ctx.run(step)

    failed = failure(dur, wf)
    assert calls == 1
    assert (failed.error_type, failed.message, failed.step) == (type(exc).__name__, "no", "step")


def test_uncaught_step_failure_fails_the_workflow_with_type_and_message(db: Path) -> None:
    dur = Durable(db, retry=FAST)

    def step() -> None:
        raise ConnectionRefusedError("payment gateway down")

    @dur.register
    def wf(ctx):
        yield ctx.run(step)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("f", wf)
            with pytest.raises(WorkflowFailed, match="payment gateway down") as info:
                await handle.result()
            return info.value, await handle.status(), await handle.done()

    failed, status, done = asyncio.run(main())
    assert failed.error_type == "ConnectionRefusedError"
    assert status.state == "failed" and done
    assert status.error["type"] == "ConnectionRefusedError"
    assert [(s.state, s.attempts) for s in status.steps] == [("failed", 3)]


class Abort(BaseException):
    """Not an Exception: what a step's own code might raise, like CancelledError."""


@pytest.mark.parametrize("raised", [Abort("stop"), asyncio.CancelledError()],
                         ids=["BaseException", "CancelledError"])
@pytest.mark.parametrize("form", ["generator", "async"])
def test_step_raising_a_base_exception_fails_its_workflow_after_its_attempts(
        db: Path, raised: BaseException, form: str, rows: Any) -> None:
    dur = Durable(db, retry=FAST)
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        raise raised

    def gen_wf(ctx):
        yield ctx.run(step)

    async def async_wf(ctx):
        await ctx.run(step)

    wf = dur.register(name="wf")(gen_wf if form == "generator" else async_wf)
    failed = failure(dur, wf)
    assert (failed.error_type, failed.message) == (
        "RuntimeError", f"the step raised {raised!r}")
    assert calls == 3  # retried like any failure, then recorded: nothing left running
    assert rows(db, "SELECT state, attempts FROM steps") == [("failed", 3)]


def test_step_returning_non_json_fails_without_retrying(db: Path) -> None:
    dur = Durable(db, retry=FAST)
    calls = 0

    def step() -> object:
        nonlocal calls
        calls += 1
        return object()

    @dur.register
    def wf(ctx):
        yield ctx.run(step)

    assert failure(dur, wf).message.startswith("the step returned a value that is not JSON")
    assert calls == 1


def test_workflow_returning_non_json_or_yielding_a_non_step_fails_clearly(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def bad_result(ctx):
        yield ctx.run(str)
        return {1, 2}

    @dur.register
    def bad_yield(ctx):
        yield 42

    async def main() -> list[str]:
        messages = []
        async with dur:
            for wf in (bad_result, bad_yield):
                with pytest.raises(WorkflowFailed) as info:
                    await (await dur.run(wf.__name__, wf)).result()
                messages.append(info.value.message)
        return messages

    returned, yielded = asyncio.run(main())
    assert "not JSON" in returned
    assert "yielded 42" in yielded


# Replay and restarts in one process (close, then open again).


def test_replay_returns_journaled_results_and_reraises_recorded_step_failures(
        db: Path) -> None:
    ran: list[str] = []
    blocker: dict[str, asyncio.Event] = {}

    def build() -> tuple[Durable, Any]:
        dur = Durable(db, retry=FAST)

        def reserve() -> str:
            ran.append("reserve")
            return "r-1"

        def charge() -> None:
            ran.append("charge")
            raise Permanent("declined")

        def release(r: str) -> str:
            ran.append("release")
            return r

        async def notify() -> str:
            ran.append("notify")
            await blocker["gate"].wait()
            return "sent"

        @dur.register(name="order")
        def wf(ctx):
            held = yield ctx.run(reserve)
            try:
                yield ctx.run(charge)
            except StepFailed as exc:
                yield ctx.run(release, held)
                note = yield ctx.run(notify)
                return {"failed": exc.message, "note": note}
            return None

        return dur, wf

    async def first() -> None:
        blocker["gate"] = asyncio.Event()  # never set: the workflow stops inside notify
        dur, wf = build()
        async with dur:
            await dur.run("o1", wf)
            while "notify" not in ran:
                await asyncio.sleep(0.01)

    async def second() -> Any:
        blocker["gate"] = asyncio.Event()
        blocker["gate"].set()
        dur, _ = build()
        async with dur:  # resumes o1
            return await (await dur.get("o1")).result()

    asyncio.run(first())
    assert ran == ["reserve", "charge", "release", "notify"]
    assert asyncio.run(second()) == {"failed": "declined", "note": "sent"}
    # Only the unfinished step ran again; the recorded failure was replayed, not re-run.
    assert ran == ["reserve", "charge", "release", "notify", "notify"]


def test_changed_step_fails_the_workflow_with_nondeterminism_and_keeps_the_journal(
        db: Path, count: Any, journal_of: Any) -> None:
    gate = asyncio.Event

    def build(second_step: Any) -> tuple[Durable, Any]:
        dur = Durable(db)

        @dur.register(name="flow")
        async def wf(ctx):
            await ctx.run(str, "a")
            with contextlib.suppress(NonDeterminismError):  # even caught, it fails the workflow
                await ctx.run(second_step)
            return "finished"

        return dur, wf

    async def hang() -> None:
        await gate().wait()

    async def renamed() -> None:
        return None

    async def first() -> None:
        dur, wf = build(hang)
        async with dur:
            await dur.run("nd", wf)
            while count(db, "steps") < 2:
                await asyncio.sleep(0.01)

    async def second() -> WorkflowFailed:
        dur, _ = build(renamed)
        async with dur:
            with pytest.raises(WorkflowFailed) as info:
                await (await dur.get("nd")).result()
            return info.value

    asyncio.run(first())
    failed = asyncio.run(second())
    assert failed.error_type == "NonDeterminismError"
    assert "'renamed'" in failed.message and "'hang'" in failed.message
    assert [(s, n) for s, n, *_ in journal_of(db, "nd")] == [(1, "str"), (2, "hang")]


# Handles.


def test_get_of_an_unknown_id_raises_not_found(db: Path) -> None:
    async def main() -> None:
        async with Durable(db) as dur:
            with pytest.raises(NotFound, match="no workflow has id 'ghost'"):
                await dur.get("ghost")

    asyncio.run(main())


def test_handle_reports_done_status_and_times_out_while_running(db: Path) -> None:
    dur = Durable(db)
    gate = threading.Event()

    @dur.register
    def wf(ctx, n):
        yield ctx.run(gate.wait, 10)
        return n

    async def main() -> None:
        async with dur:
            handle = await dur.run("h", wf, 5)
            assert not await handle.done()
            with pytest.raises(TimeoutError):
                await handle.result(timeout=0.05)
            status = await handle.status()
            assert status.state in ("pending", "running") and status.finished_at is None
            gate.set()
            assert await handle.result() == 5
            assert await handle.done()
            status = await (await dur.get("h")).status()
            assert (status.id, status.state, status.result) == ("h", "done", 5)
            assert status.created_at <= status.updated_at <= status.finished_at
            assert [(s.seq, s.name, s.state) for s in status.steps] == [(1, "Event.wait", "done")]

    asyncio.run(main())


# Recovery after a process dies.


def test_owner_liveness_uses_pid_and_process_start_time() -> None:
    host, pid = socket.gethostname(), os.getpid()
    me = f"{host}|{pid}|{durable._process_start(pid)}|n"
    assert not durable._owner_is_dead(me, host)
    # The same pid with another start time is a reused pid: the old owner is gone.
    assert durable._owner_is_dead(f"{host}|{pid}|0:12345|n", host)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert durable._owner_is_dead(f"{host}|{child.pid}|{durable._process_start(pid)}|n", host)
    # A killed process that its parent has not reaped yet (a zombie) is dead too.
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = f"{host}|{zombie.pid}|{durable._process_start(zombie.pid)}|n"
    assert not durable._owner_is_dead(owner, host)
    zombie.kill()
    time.sleep(0.3)
    assert durable._owner_is_dead(owner, host)
    zombie.wait()
    # A process on another machine is not judged from here.
    assert not durable._owner_is_dead(f"elsewhere|{child.pid}|x|n", host)


def _recovery_fixture(db: Path, owner: str | None,
                      lease_left: float | None = 60) -> tuple[Durable, Any, list[str]]:
    """A journal with workflow 'rec' stopped after step 1, held by `owner`, whose lease
    has `lease_left` seconds to run (None: the owner has no lease row at all)."""
    ran: list[str] = []

    def build() -> tuple[Durable, Any]:
        dur = Durable(db)

        @dur.register(name="rec")
        def wf(ctx):
            yield ctx.run(ran.append, "one")
            yield ctx.run(ran.append, "two")
            return len(ran)

        return dur, wf

    dur, wf = build()

    async def start() -> None:
        async with dur:
            await (await dur.run("rec", wf)).result()

    asyncio.run(start())
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM steps WHERE seq = 2")
        conn.execute("UPDATE workflows SET state = 'running', result = NULL, finished_at = NULL,"
                     " owner = ?", (owner,))
        if owner is not None and lease_left is not None:
            conn.execute("INSERT INTO owners (id, expires_at) VALUES (?, ?)",
                         (owner, time.time() + lease_left))
    ran.clear()
    dur, wf = build()
    return dur, wf, ran


def _resumes(dur: Durable) -> bool:
    async def main() -> bool:
        async with dur:
            await asyncio.sleep(0.2)
            return await (await dur.get("rec")).done()

    return bool(asyncio.run(main()))


def test_open_resumes_unfinished_workflows_of_a_dead_owner_at_once(db: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    owner = f"{socket.gethostname()}|{child.pid}|{durable._process_start(os.getpid())}|x"
    dur, _, ran = _recovery_fixture(db, owner)
    assert _resumes(dur)
    assert ran == ["two"]  # step one was replayed from the journal


def test_open_resumes_a_workflow_whose_owner_pid_was_reused(db: Path) -> None:
    dur, _, ran = _recovery_fixture(db, f"{socket.gethostname()}|{os.getpid()}|0:1|x")
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_resumes_workflows_that_no_process_holds(db: Path) -> None:
    dur, _, ran = _recovery_fixture(db, None)
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_leaves_workflows_of_a_live_owner_alone(db: Path, rows: Any) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = f"{socket.gethostname()}|{live.pid}|{durable._process_start(live.pid)}|x"
        dur, _, ran = _recovery_fixture(db, owner)
        assert not _resumes(dur)
        assert ran == []
        assert rows(db, "SELECT owner FROM workflows") == [(owner,)]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("lease_left", [-1, None])
def test_open_takes_over_a_live_owner_whose_lease_ran_out(db: Path,
                                                          lease_left: float | None) -> None:
    # A process on another machine (or paused here) that stopped renewing its lease.
    dur, _, ran = _recovery_fixture(db, "elsewhere|4242|1:1|x", lease_left)
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_leaves_a_live_lease_of_another_machine_alone(db: Path) -> None:
    dur, _, ran = _recovery_fixture(db, "elsewhere|4242|1:1|x", 60)
    assert not _resumes(dur)
    assert ran == []


def test_lease_is_one_row_per_process_renewed_while_open(db: Path, rows: Any) -> None:
    dur = Durable(db, lease=0.3)

    async def main() -> list[float]:
        seen = []
        async with dur:
            for _ in range(3):
                (expires,), = rows(db, "SELECT expires_at FROM owners")
                seen.append(expires)
                await asyncio.sleep(0.25)
        assert rows(db, "SELECT count(*) FROM owners") == [(0,)]  # gone after close
        return seen

    seen = asyncio.run(main())
    assert seen == sorted(seen) and seen[0] < seen[-1]


# Real processes killed in the middle of a step.

WORKER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from durable import Durable, RetryPolicy, WorkflowFailed

    db, marks, mode = sys.argv[1:4]
    dur = Durable(db, retry=RetryPolicy(max_attempts=3, initial_delay=0))

    def mark(name):
        with open(marks, "a") as f:
            f.write(name + "\\n")

    def step1(x):
        mark("step1")
        return x + 1

    def step2(x):
        mark("step2")
        if mode == "hang":
            time.sleep(60)         # the test kills the process here
        if mode == "poison":
            os._exit(17)           # dies on every attempt
        return x * 10

    def step2_renamed(x):
        mark("step2_renamed")
        return x * 10

    def step3(x):
        mark("step3")
        return x - 1

    @dur.register(name="three")
    def three(ctx, x):
        a = yield ctx.run(step1, x)
        b = yield ctx.run(step2_renamed if mode == "changed" else step2, a)
        return (yield ctx.run(step3, b))

    async def main():
        async with dur:
            handle = await dur.run("wf-1", three, 1)
            try:
                print(json.dumps({"result": await handle.result(timeout=30)}))
            except WorkflowFailed as exc:
                print(json.dumps({"failed": exc.error_type, "message": exc.message}))

    asyncio.run(main())
""")


class Worker:
    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "worker.py"
        self.script.write_text(WORKER)
        self.db = tmp_path / "crash.db"
        self.marks = tmp_path / "marks.txt"
        self.env = {**os.environ, "PYTHONPATH": str(HERE)}

    def start(self, mode: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(self.script), str(self.db), str(self.marks), mode],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def finish(self, mode: str) -> dict[str, Any]:
        proc = self.start(mode)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return dict(json.loads(out))

    def ran(self) -> list[str]:
        return self.marks.read_text().split() if self.marks.exists() else []

    def kill_inside_step2(self) -> None:
        proc = self.start("hang")
        deadline = time.monotonic() + 30
        while "step2" not in self.ran():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL


def test_process_killed_inside_step_two_is_finished_by_the_next_process(tmp_path: Path) -> None:
    worker = Worker(tmp_path)
    worker.kill_inside_step2()
    assert worker.finish("normal") == {"result": 19}
    # Step 1 was journaled before the kill, so only step 2 ran again.
    assert worker.ran() == ["step1", "step2", "step2", "step3"]


def test_poison_step_stops_after_max_attempts_across_restarts(tmp_path: Path, rows: Any) -> None:
    worker = Worker(tmp_path)
    for _ in range(3):
        proc = worker.start("poison")
        proc.communicate(timeout=60)
        assert proc.returncode == 17
    # Attempt 3 of 3 was journaled before it died: the next start gives up on the step.
    outcome = worker.finish("poison")
    assert outcome["failed"] == "Interrupted"
    assert worker.ran() == ["step1"] + ["step2"] * 3
    (state, attempts), = rows(worker.db, "SELECT state, attempts FROM steps WHERE seq = 2")
    assert (state, attempts) == ("failed", 3)


def test_step_replaced_between_crash_and_restart_fails_with_nondeterminism(
        tmp_path: Path, rows: Any) -> None:
    worker = Worker(tmp_path)
    worker.kill_inside_step2()
    outcome = worker.finish("changed")
    assert outcome["failed"] == "NonDeterminismError"
    assert "'step2_renamed'" in outcome["message"] and "'step2'" in outcome["message"]
    assert worker.ran() == ["step1", "step2"]  # the new step never ran
    assert rows(worker.db, "SELECT seq, name FROM steps ORDER BY seq") == [
        (1, "step1"), (2, "step2")]


# Shutdown, cancellation and journal trouble.


@pytest.mark.parametrize("form", ["alone", "two-at-once", "async"])
def test_close_waits_for_running_sync_steps_records_their_results_and_hands_back(
        db: Path, form: str, rows: Any) -> None:
    # Closing is not a crash: a step that returns within the grace ran once, and is
    # not to run again at the next start (the journal records its result).
    runs: Counter[tuple[str, int]] = Counter()
    ends: list[float] = []

    def slow(wf_id: str, n: int) -> int:
        runs[wf_id, n] += 1
        time.sleep(0.3)
        ends.append(time.monotonic())
        return n

    def build() -> Durable:
        dur = Durable(db)
        if form == "async":
            @dur.register(name="wf")
            async def async_wf(ctx):
                return await ctx.run(slow, ctx.id, 1) + await ctx.run(slow, ctx.id, 2)
        else:
            @dur.register(name="wf")
            def wf(ctx):
                one = yield ctx.run(slow, ctx.id, 1)
                two = yield ctx.run(slow, ctx.id, 2)
                return one + two
        return dur

    ids = ["s", "t"] if form == "two-at-once" else ["s"]

    async def main() -> list[Any]:
        async with build() as dur:
            for wf_id in ids:
                await dur.run(wf_id, "wf")
            await asyncio.sleep(0.05)  # step 1's threads are running
        closed = time.monotonic()
        assert closed >= max(ends)  # close() waited for them
        assert rows(db, "SELECT workflow_id, seq, state FROM steps ORDER BY 1") == [
            (wf_id, 1, "done") for wf_id in ids]
        assert rows(db, "SELECT DISTINCT owner FROM workflows") == [(None,)]
        async with build() as again:
            return [await (await again.get(wf_id)).result() for wf_id in ids]

    assert asyncio.run(main()) == [3] * len(ids)
    assert runs == {(wf_id, n): 1 for wf_id in ids for n in (1, 2)}


@pytest.mark.parametrize("form", ["generator-two-at-once", "async"])
def test_close_at_any_moment_between_quick_steps_runs_no_returned_step_again(
        db: Path, form: str) -> None:
    # A step that returned before or during close() is recorded, whether its outcome
    # was still on its way to the workflow or the next step's start was refused.
    returned: dict[tuple[str, int], list[int]] = {}
    life = [0]
    rng = random.Random(7)

    def step(wf_id: str, n: int) -> int:
        time.sleep(0.0005)
        returned.setdefault((wf_id, n), []).append(life[0])
        return n

    def build(path: Path) -> Durable:
        dur = Durable(path, synchronous="NORMAL")
        if form == "async":
            @dur.register(name="wf")
            async def async_wf(ctx):
                for n in range(1, 200):
                    await ctx.run(step, ctx.id, n)
        else:
            @dur.register(name="wf")
            def wf(ctx):
                for n in range(1, 200):
                    yield ctx.run(step, ctx.id, n)
        return dur

    ids = ["w", "w2"] if form.endswith("two-at-once") else ["w"]

    async def main() -> None:
        for i in range(8):
            path = db.with_name(f"life-{i}.db")
            life[0] = 1
            async with build(path) as dur:
                for wf_id in ids:
                    await dur.run(wf_id, "wf")
                await asyncio.sleep(rng.uniform(0.01, 0.05))
            life[0] = 2
            async with build(path) as dur:
                for wf_id in ids:
                    await (await dur.get(wf_id)).result(timeout=30)
            assert [key for key, lives in returned.items() if lives != [lives[0]]] == [], i
            returned.clear()

    asyncio.run(main())


def test_a_step_failing_for_good_while_close_waits_is_recorded_not_retried(
        db: Path, rows: Any) -> None:
    runs: list[int] = []

    def declined() -> None:
        runs.append(1)
        time.sleep(0.3)
        raise Permanent("card declined")

    def build() -> Durable:
        dur = Durable(db)

        @dur.register(name="wf")
        def wf(ctx):
            try:
                yield ctx.run(declined)
            except StepFailed as failed:
                return f"compensated after {failed.error_type}: {failed.message}"

        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("w", "wf")
            await asyncio.sleep(0.05)  # the step's thread is running
        assert rows(db, "SELECT state, attempts FROM steps") == [("failed", 1)]
        async with build() as again:
            return await (await again.get("w")).result()

    assert asyncio.run(main()) == "compensated after Permanent: card declined"
    assert runs == [1]


def test_a_step_failing_while_close_waits_keeps_its_error_and_its_next_attempt_runs_at_reopen(
        db: Path, rows: Any, lambda_free_workflow: Any) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
            raise ConnectionError("gateway timeout")
        return "ok"

    def build() -> Durable:
        dur = Durable(db, retry=RetryPolicy(max_attempts=3, initial_delay=30, jitter=0))
        dur.register(name="wf")(lambda_free_workflow(flaky))
        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("w", "wf")
            await asyncio.sleep(0.05)  # attempt 1 is running; close() waits for it
        async with build() as again:  # no 30 s backoff: attempt 2 runs at once
            return await (await again.get("w")).result(timeout=5)

    assert asyncio.run(main()) == "ok"
    assert calls == [1, 1]
    ((attempts, failures),) = rows(db, "SELECT attempts, failures FROM steps")
    assert attempts == 2
    assert [(f["attempt"], f["error"]["type"]) for f in json.loads(failures)] == [
        (1, "ConnectionError")]  # its own error, not "Interrupted"


def test_a_generator_stopped_while_its_code_runs_in_a_step_thread_still_resets_its_token(
        db: Path) -> None:
    # close() gives up on the grace while the workflow's own code (between two steps)
    # runs in a step thread: that thread closes the generator when it is done, in the
    # workflow's context, so its `finally` can reset what it set.
    finished: list[str] = []

    def build() -> Durable:
        dur = Durable(db)

        @dur.register(name="wf")
        def wf(ctx):
            token = REQUEST_ID.set("set-by-the-workflow")
            try:
                yield ctx.run(str, 1)
                time.sleep(0.6)  # workflow code, not a step
                yield ctx.run(str, 2)
            finally:
                try:
                    REQUEST_ID.reset(token)
                    finished.append("reset")
                except ValueError as exc:
                    finished.append(f"failed: {exc}")

        return dur

    async def main() -> None:
        async with build() as dur:
            await dur.run("w", "wf")
            await asyncio.sleep(0.2)
            await dur.close(grace=0.1)
        deadline = time.monotonic() + 5
        while not finished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert finished == ["reset"]


def test_close_keeps_holding_a_workflow_whose_step_thread_outlives_the_grace(
        db: Path, rows: Any, lambda_free_workflow: Any) -> None:
    gate = threading.Event()
    dur = Durable(db)
    dur.register(name="stuck")(lambda_free_workflow(lambda: gate.wait(10)))

    async def main() -> None:
        async with dur:
            await dur.run("s", "stuck")
            await asyncio.sleep(0.05)
            owner = dur._owner
            await dur.close(grace=0)
        # Still held by this (live) process: no other process may run it meanwhile.
        assert rows(db, "SELECT owner FROM workflows") == [(owner,)]
        gate.set()

    asyncio.run(main())


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "beside-another"])
def test_run_cancelled_after_its_insert_was_queued_still_starts_the_workflow(
        db: Path, alone: bool, count: Any, lambda_free_workflow: Any) -> None:
    # Alone, run() hands the insert to a step thread; beside a running workflow, to
    # the writer thread. Either way a cancelled caller does not stop the workflow.
    dur = Durable(db)
    ran: list[int] = []
    gate = threading.Event()
    dur.register(name="w")(lambda_free_workflow(lambda: ran.append(1)))
    dur.register(name="hold")(lambda_free_workflow(lambda: gate.wait(10)))

    async def main() -> Any:
        async with dur:
            held = None if alone else await dur.run("held", "hold")
            call = asyncio.create_task(dur.run("c", "w"))
            await asyncio.sleep(0)  # run() has queued its insert
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            while count(db, "workflows") == (1 if alone else 2) - 1:  # it commits anyway
                await asyncio.sleep(0.01)
            result = await (await dur.get("c")).result(timeout=5)
            gate.set()
            if held is not None:
                await held.result(timeout=5)
            return result

    asyncio.run(main())
    assert ran == [1]


def test_run_racing_close_leaves_a_workflow_that_the_next_open_runs(
        db: Path, rows: Any, lambda_free_workflow: Any) -> None:
    ran: list[int] = []

    def build() -> Durable:
        dur = Durable(db)
        dur.register(name="w")(lambda_free_workflow(lambda: ran.append(1)))
        return dur

    async def main() -> Any:
        dur = build()
        await dur.open()
        call = asyncio.create_task(dur.run("r", "w"))
        await asyncio.sleep(0)
        await dur.close()
        assert (await call).created
        assert rows(db, "SELECT state, owner FROM workflows") == [("pending", None)]
        async with build() as again:
            return await (await again.get("r")).result(timeout=5)

    asyncio.run(main())
    assert ran == [1]


@pytest.mark.parametrize("form", ["generator", "async"])
def test_steps_in_finally_do_not_run_while_closing_and_the_workflow_resumes(
        db: Path, form: str, rows: Any) -> None:
    ran: list[str] = []

    async def slow() -> str:
        ran.append("slow")
        await asyncio.sleep(0.2)
        return "ok"

    def cleanup() -> None:
        ran.append("cleanup")

    def build() -> Durable:
        dur = Durable(db)
        if form == "generator":
            @dur.register(name="f")
            def wf(ctx):
                try:
                    return (yield ctx.run(slow))
                finally:
                    yield ctx.run(cleanup)
        else:
            @dur.register(name="f")
            async def wf(ctx):
                try:
                    return await ctx.run(slow)
                finally:
                    await ctx.run(cleanup)
        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("f1", "f")
            await asyncio.sleep(0.05)
        # A deploy is not a failure: nothing recorded, the cleanup step did not run.
        assert rows(db, "SELECT state FROM workflows") == [("running",)]
        assert ran == ["slow"]
        async with build() as dur:
            return await (await dur.get("f1")).result(timeout=5)

    assert asyncio.run(main()) == "ok"
    assert ran == ["slow", "slow", "cleanup"]


def test_open_that_fails_leaves_nothing_running_and_can_be_tried_again(db: Path) -> None:
    async def open_and_close(dur: Durable) -> None:
        async with dur:
            pass

    asyncio.run(open_and_close(Durable(db)))  # a journal to lock
    dur = Durable(db, busy_timeout=0.05)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    threads = set(threading.enumerate())
    with pytest.raises(JournalError, match="locked"):
        asyncio.run(dur.open())
    blocker.execute("ROLLBACK")
    blocker.close()
    assert not [t for t in set(threading.enumerate()) - threads if t.name.startswith("durable")]
    asyncio.run(open_and_close(dur))  # not "already open"


def test_journal_locked_past_busy_timeout_delays_the_workflow_then_it_finishes(
        db: Path, caplog: pytest.LogCaptureFixture) -> None:
    dur = Durable(db, busy_timeout=0.05)
    gate = threading.Event()

    @dur.register
    def wf(ctx):
        yield ctx.run(gate.wait, 10)
        return (yield ctx.run(str, "done"))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("l", wf)
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            gate.set()
            await asyncio.sleep(0.4)
            assert not await handle.done()
            blocker.execute("ROLLBACK")
            blocker.close()
            return await handle.result(timeout=10)

    with caplog.at_level(logging.WARNING, logger="durable"):
        assert asyncio.run(main()) == "done"
    assert "could not write its journal" in caplog.text
    assert "database is locked" in caplog.text


def test_code_with_fewer_steps_than_the_journal_fails_with_nondeterminism(
        db: Path, count: Any) -> None:
    gate: dict[str, asyncio.Event] = {}

    async def block() -> None:
        await gate["e"].wait()

    def build(steps: int) -> Durable:
        dur = Durable(db)

        @dur.register(name="n")
        async def wf(ctx):
            await ctx.run(str, "a")
            if steps == 2:
                await ctx.run(block)
            return "end"

        return dur

    async def main() -> WorkflowFailed:
        gate["e"] = asyncio.Event()
        async with build(2) as dur:
            await dur.run("n1", "n")
            while count(db, "steps") < 2:
                await asyncio.sleep(0.01)
        async with build(1) as dur:
            with pytest.raises(WorkflowFailed) as info:
                await (await dur.get("n1")).result(timeout=5)
            return info.value

    failed = asyncio.run(main())
    assert failed.error_type == "NonDeterminismError"
    assert "'block'" in failed.message


@pytest.mark.parametrize("call, message", [
    (lambda dur: dur.run("\ud800", "w"), "valid Unicode"),
    (lambda dur: dur.run("ok", "w", "\udc80"), "JSON"),
    (lambda dur: dur.run("ok", [1]), "registered function"),
    (lambda dur: dur.get(["x"]), "must be a string"),
])
def test_odd_input_gets_a_clear_error_and_writes_nothing(db: Path, call: Any,
                                                         message: str, count: Any) -> None:
    dur = Durable(db)

    @dur.register(name="w")
    def wf(ctx, *args):
        yield ctx.run(str)

    async def main() -> None:
        async with dur:
            with pytest.raises(InvalidInput, match=message):
                await call(dur)

    asyncio.run(main())
    assert count(db, "workflows") == 0


def test_register_with_a_string_says_to_use_name(db: Path) -> None:
    with pytest.raises(InvalidInput, match=r"register\(name="):
        Durable(db).register("orders.v2")
