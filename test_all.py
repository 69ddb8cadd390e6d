"""Doing several things at once: ctx.all (and asyncio.gather of ctx calls in an async
workflow), CONTRACT.md §7, in both workflow forms, on both stores."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from durable import Durable, InvalidInput, RetryPolicy, StepFailed

HERE = Path(__file__).resolve().parent
FORMS = ("generator", "async", "gather")
ONCE = RetryPolicy(max_attempts=1)


def register(dur: Durable, form: str, body: Any, register_in: Any) -> None:
    """`body` is a generator function taking (ctx, all): `all(*calls)` is ctx.all in
    the first two forms; in the third ("gather") a tuple of the calls, which the
    async def awaits with asyncio.gather."""
    def gathered(*calls: Any) -> tuple[Any, ...]:
        return calls

    def generator(ctx, *args):
        return (yield from body(ctx, gathered if form == "gather" else ctx.all, *args))

    register_in(dur, "generator" if form == "generator" else "async", generator)


@pytest.mark.parametrize("form", FORMS)
def test_calls_run_side_by_side_and_return_in_argument_order(
        db: Any, form: str, register_in: Any) -> None:
    # Three sync steps that can only pass a barrier together: they run in parallel
    # threads. The results come back in argument order, not the order they finished.
    barrier = threading.Barrier(3, timeout=10)
    dur = Durable(db)

    def meet(n: int, pause: float) -> int:
        barrier.wait()
        time.sleep(pause)
        return n

    def wf(ctx, all_of):
        return (yield all_of(ctx.run(meet, 1, 0.2), ctx.run(meet, 2, 0.0),
                             ctx.run(meet, 3, 0.1)))

    register(dur, form, wf, register_in)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", "wf")
            return await handle.result(timeout=20), await handle.status()

    result, status = asyncio.run(main())
    assert result == [1, 2, 3]
    assert [(s.seq, s.state, s.result) for s in status.steps] == [
        (1, "done", 1), (2, "done", 2), (3, "done", 3)]


@pytest.mark.parametrize("form", FORMS)
def test_the_first_failure_in_argument_order_is_raised_after_every_call_settled(
        db: Any, form: str, register_in: Any) -> None:
    ran: list[str] = []
    dur = Durable(db, retry=ONCE)

    def late_failure() -> None:
        time.sleep(0.2)
        ran.append("late failure")
        raise ValueError("the first in argument order")

    def early_failure() -> None:
        ran.append("early failure")
        raise KeyError("failed first")

    def slow_success() -> str:
        time.sleep(0.4)
        ran.append("slow success")
        return "recorded"

    def wf(ctx, all_of):
        try:
            yield all_of(ctx.run(late_failure), ctx.run(early_failure), ctx.run(slow_success))
        except StepFailed as exc:
            return exc.error_type, exc.message

    register(dur, form, wf, register_in)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", "wf")
            return await handle.result(timeout=20), await handle.status()

    result, status = asyncio.run(main())
    if form == "gather":  # raises the first to fail, at once, as asyncio.gather does
        assert result == ["KeyError", "'failed first'"]
        return
    assert result == ["ValueError", "the first in argument order"]
    assert sorted(ran) == ["early failure", "late failure", "slow success"]
    assert [(s.seq, s.state) for s in status.steps] == [(1, "failed"), (2, "failed"),
                                                        (3, "done")]


@pytest.mark.parametrize("form", ["generator", "async"])
def test_steps_sleeps_receives_and_nested_alls_mix_and_replay_in_their_places(
        db: Any, form: str, register_in: Any) -> None:
    ran: Counter[str] = Counter()

    def step(name: str) -> str:
        ran[name] += 1
        return name

    def wf(ctx, all_of):
        first = yield all_of(ctx.run(step, "a"), ctx.sleep(0.05), ctx.receive("mail"),
                             all_of(ctx.run(step, "b"), ctx.run(step, "c")))
        yield ctx.receive("go on")
        last = yield ctx.run(step, "d")
        return [first, last]

    def build() -> Durable:
        dur = Durable(db)
        register(dur, form, wf, register_in)
        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("w", "wf")
            await dur.send("w", "mail", {"m": 1})
            deadline = time.monotonic() + 10
            while len((await (await dur.get("w")).status()).steps) < 6:  # at "go on"
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        async with build() as dur:  # a restart: the all is replayed from the journal
            await dur.send("w", "go on", True)
            return await (await dur.get("w")).result(timeout=10)

    result = asyncio.run(main())
    assert result == [["a", None, {"m": 1}, ["b", "c"]], "d"]
    assert ran == {"a": 1, "b": 1, "c": 1, "d": 1}


KILLED = textwrap.dedent("""
    import asyncio, os, sys, time
    from durable import Durable

    db, marks = sys.argv[1], sys.argv[2]
    dur = Durable(db)

    def step(name, pause):
        time.sleep(pause)
        with open(marks, "a") as f:
            f.write(name + "\\n")
        if name == "slow" and not os.environ.get("SECOND_LIFE"):
            os._exit(9)  # dies before its own result is recorded
        return name

    @dur.register(name="fan")
    def fan(ctx):
        return (yield ctx.all(ctx.run(step, "quick", 0), ctx.run(step, "also quick", 0),
                              ctx.run(step, "slow", 1.0)))

    async def main():
        async with dur:
            handle = await dur.run("fan", fan)
            print(await handle.result(timeout=60), flush=True)

    asyncio.run(main())
""")


def test_a_process_killed_in_the_middle_of_an_all_runs_no_finished_call_again(
        tmp_path: Path, db: Any) -> None:
    script, marks = tmp_path / "fan.py", tmp_path / "marks.txt"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    first = subprocess.run([sys.executable, str(script), str(db), str(marks)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 9, first.stderr
    second = subprocess.run([sys.executable, str(script), str(db), str(marks)],
                            env={**env, "SECOND_LIFE": "1"}, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "['quick', 'also quick', 'slow']"
    assert Counter(marks.read_text().splitlines()) == {"quick": 1, "also quick": 1, "slow": 2}


@pytest.mark.parametrize("form", ["generator", "gather"])
def test_ten_thousand_calls_in_one_all_each_run_once(
        db: Any, form: str, rows: Any, register_in: Any) -> None:
    ran: Counter[int] = Counter()
    dur = Durable(db)

    def square(n: int) -> int:
        ran[n] += 1
        return n * n

    def wf(ctx, all_of):
        return sum((yield all_of(*(ctx.run(square, n) for n in range(10_000)))))

    register(dur, form, wf, register_in)

    async def main() -> Any:
        async with dur:
            return await (await dur.run("wide", "wf")).result(timeout=120)

    assert asyncio.run(main()) == sum(n * n for n in range(10_000))
    assert len(ran) == 10_000 and set(ran.values()) == {1}
    assert rows(db, "SELECT state, count(*) FROM steps GROUP BY state") == [("done", 10_000)]


def test_async_steps_of_one_all_run_concurrently(db: Any) -> None:
    dur = Durable(db)

    async def meet(arrived: list[int], n: int) -> int:
        arrived.append(n)
        deadline = time.monotonic() + 5
        while len(arrived) < 3:  # only if all three are under way at once
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        return n

    @dur.register
    def wf(ctx):
        arrived: list[int] = []
        return (yield ctx.all(*(ctx.run(meet, arrived, n) for n in range(3))))

    async def main() -> Any:
        async with dur:
            return await (await dur.run("w", wf)).result(timeout=20)

    assert asyncio.run(main()) == [0, 1, 2]


def test_an_all_of_something_else_is_refused_before_anything_is_written(db: Any, rows: Any) -> None:
    dur = Durable(db)
    refused: list[str] = []

    @dur.register
    def other(ctx):
        return (yield ctx.run(str, "x"))

    @dur.register
    def wf(ctx):
        for bad in (42, "ctx.run", print):
            try:
                ctx.all(ctx.run(str, "fine"), bad)
            except InvalidInput as exc:
                refused.append(str(exc).split(",")[0])
        return len(refused), (yield ctx.all())

    async def main() -> Any:
        async with dur:
            return await (await dur.run("w", wf)).result(timeout=10)

    assert asyncio.run(main()) == [3, []]
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]
    assert refused[0].startswith("ctx.all() takes calls made by this workflow's ctx")


@pytest.mark.parametrize("form", ["generator", "async"])
def test_two_receives_in_one_all_both_wake_when_their_values_come_later(
        db: Any, form: str, register_in: Any) -> None:
    dur = Durable(db)

    def wf(ctx, all_of):
        return (yield all_of(ctx.receive("left"), ctx.receive("right"), ctx.sleep(0.05)))

    register(dur, form, wf, register_in)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", "wf")
            deadline = time.monotonic() + 10
            while len((await handle.status()).steps) < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # both wait now
            await dur.send("w", "right", 2)
            await dur.send("w", "left", 1)
            return await handle.result(timeout=10)

    assert asyncio.run(main()) == [1, 2, None]


def test_two_receives_of_one_name_in_an_all_both_get_the_value(db: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx):
        return (yield ctx.all(ctx.receive("x"), ctx.receive("x")))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", wf)
            deadline = time.monotonic() + 10
            while len((await handle.status()).steps) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            await dur.send("w", "x", "both")
            return await handle.result(timeout=10)

    assert asyncio.run(main()) == ["both", "both"]


def test_a_changed_call_in_an_all_fails_the_workflow_and_stops_its_waiting_siblings(
        db: Any) -> None:
    from durable import WorkflowFailed

    def build(step: Any) -> Durable:
        dur = Durable(db)

        @dur.register(name="wf")
        def wf(ctx):
            return (yield ctx.all(ctx.receive("x"), ctx.run(step)))

        return dur

    def before() -> str:
        time.sleep(0.3)
        return "old"

    def renamed() -> str:
        return "new"

    async def main() -> Any:
        async with build(before) as dur:
            await dur.run("w", "wf")
            await asyncio.sleep(0.1)
        async with build(renamed) as dur:  # the code changed under a waiting workflow
            with pytest.raises(WorkflowFailed) as failed:
                await (await dur.get("w")).result(timeout=10)
            return failed.value.error_type

    assert asyncio.run(main()) == "NonDeterminismError"


def test_nested_alls_take_their_places_in_program_order(db: Any) -> None:
    # Depth-first, as written: not in whatever order the event loop starts tasks.
    dur = Durable(db)

    @dur.register
    def wf(ctx):
        yield ctx.all(ctx.run(str, "a"), ctx.all(ctx.run(str, "b"), ctx.all(ctx.run(str, "c"))),
                      ctx.sleep(0), ctx.run(str, "d"))
        twice = ctx.run(str, "e")
        for bad in ((twice, twice), ()):
            try:
                yield ctx.all(*bad) if bad else ctx.all(ctx.run(str, "f"), twice)
            except InvalidInput as exc:
                return str(exc).split(";")[0]

    async def main() -> Any:
        async with dur:
            handle = await dur.run("w", wf)
            return await handle.result(timeout=10), await handle.status()

    result, status = asyncio.run(main())
    assert [(s.seq, s.name, s.result) for s in status.steps] == [
        (1, "str", "a"), (2, "str", "b"), (3, "str", "c"), (4, "ctx.sleep", status.steps[3].result),
        (5, "str", "d")]
    assert result == "ctx.all() was given the same call twice"


def test_close_waits_for_a_running_step_of_an_all_not_for_its_waiting_sibling(
        db: Any) -> None:
    ran: list[str] = []
    dur = Durable(db)

    def slow() -> str:
        time.sleep(0.3)
        ran.append("slow")
        return "slow"

    @dur.register
    def wf(ctx):
        return (yield ctx.all(ctx.run(slow), ctx.receive("never")))

    async def main() -> float:
        async with dur:
            await dur.run("w", wf)
            await asyncio.sleep(0.1)
            began = time.monotonic()
            await dur.close(grace=5)
            return time.monotonic() - began

    took = asyncio.run(main())
    assert ran == ["slow"]
    assert took < 2.5  # the step's 0.3 s, not the whole grace
