"""Shutdown: close() waits for running steps within its grace, records what
returned, and hands the rest back for the next open."""

from __future__ import annotations

import asyncio
import contextvars
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from durable import Durable, DurableError, Permanent, RetryPolicy, StepFailed

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                       default=None)


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

    async def main() -> None:
        for i in range(8):  # new workflows each round, in the same journal
            ids = [f"w-{i}", f"w2-{i}"] if form.endswith("two-at-once") else [f"w-{i}"]
            life[0] = 1
            async with build(db) as dur:
                for wf_id in ids:
                    await dur.run(wf_id, "wf")
                await asyncio.sleep(rng.uniform(0.01, 0.05))
            life[0] = 2
            async with build(db) as dur:
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
        # Recorded and handed back; under load its first step may have begun before
        # close() did (then it is running, its result recorded or its step to run again).
        (state, owner), = rows(db, "SELECT state, owner FROM workflows")
        assert state in ("pending", "running") and owner is None
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


def test_close_starts_no_queued_workflow_and_hands_every_one_back_for_the_next_open(
        db: Path, rows: Any) -> None:
    # Phase 1 (nothing starts from here on) and phase 4 (everything held is handed back)
    # of close(): workflows waiting for one of max_running places stay unfinished and
    # unheld, and the next open runs them.
    ran: list[str] = []
    inside = threading.Event()

    def step(wf_id: str) -> str:
        ran.append(wf_id)
        inside.set()
        time.sleep(0.2)
        return wf_id

    def build() -> Durable:
        dur = Durable(db, max_running=1)

        @dur.register(name="wf")
        def wf(ctx):
            return (yield ctx.run(step, ctx.id))
        return dur

    async def main() -> list[Any]:
        async with build() as dur:
            for wf_id in ("a", "b", "c"):
                await dur.run(wf_id, "wf")
            while not inside.is_set():
                await asyncio.sleep(0.01)
        assert ran == ["a"]  # b and c never started
        assert rows(db, "SELECT id, state, owner FROM workflows ORDER BY id") == [
            ("a", "running", None), ("b", "pending", None), ("c", "pending", None)]
        async with build() as again:
            return [await (await again.get(wf_id)).result(timeout=10)
                    for wf_id in ("a", "b", "c")]

    assert asyncio.run(main()) == ["a", "b", "c"]
    assert sorted(ran) == ["a", "b", "c"]  # a's step returned within the grace: recorded


def test_close_of_a_closed_or_never_opened_durable_does_nothing_and_run_is_refused(
        db: Path) -> None:
    # Phase 5 (shut): after close() nothing is left to stop, and the journal is closed.
    async def main() -> None:
        dur = Durable(db)
        await dur.close()  # never opened
        async with dur:
            pass
        await dur.close()  # closed already
        with pytest.raises(DurableError, match="is not open"):
            await dur.run("x", "wf")

    asyncio.run(main())
