"""Registering workflows, and run(): when it returns, idempotency, bad input,
handles."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from durable import Durable, IdempotencyConflict, InvalidInput, NotFound, WorkflowCancelled

# Registration.


def test_register_returns_the_function_unchanged_with_and_without_arguments(
        db: Path, fast: Any) -> None:
    dur = Durable(db)

    def plain(ctx):
        yield ctx.run(str)

    async def named(ctx):
        return 1

    assert dur.register(plain) is plain
    assert dur.register(name="orders.v2", retry=fast)(named) is named
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


def test_register_with_a_string_says_to_use_name(db: Path) -> None:
    with pytest.raises(InvalidInput, match=r"register\(name="):
        Durable(db).register("orders.v2")


# Running.


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
            assert len(dur._runs) == 2  # the others wait as plain values, not tasks
            states = {(await h.status()).state for h in handles}
            assert "pending" in states  # the waiting ones are recorded, not yet started
            again = await dur.run("m4", wf)  # a duplicate of a waiting one starts nothing
            assert not again.created
            assert await dur.cancel("m5")  # cancelled while waiting for its turn
            assert [await h.result() for h in handles[:5]] == [f"m{i}" for i in range(5)]
            with pytest.raises(WorkflowCancelled):
                await handles[5].result()
            assert not dur._runs  # nothing is left waiting for a slot
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
