"""Steps: the two workflow forms, where their code and steps run, retries and
failures, and replay."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from durable import (
    Durable,
    InvalidInput,
    NonDeterminismError,
    Permanent,
    RetryPolicy,
    StepFailed,
    WorkflowFailed,
)

# The two workflow forms, and where their code and steps run.


@pytest.fixture
def journal_of(rows: Any) -> Any:
    """journal_of(db, wf_id): the workflow's steps as (seq, name, state, attempts, result)."""
    return lambda db, wf_id: rows(db, "SELECT seq, name, state, attempts, result FROM steps "
                                      "WHERE workflow_id = ? ORDER BY seq", (wf_id,))


def test_generator_and_async_workflows_have_the_same_semantics(
        db: Path, journal_of: Any, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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


def test_consecutive_sync_steps_go_on_in_their_thread_without_the_event_loop(
        db: Path, rows: Any, fast: Any) -> None:
    # A generator workflow's next sync step begins in the thread that ran the last one:
    # steps go on while the event loop is busy, and the journal is the same.
    dur = Durable(db, retry=fast)
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


def test_step_options_never_collide_with_the_steps_own_keyword_arguments(
        db: Path, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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


# Retries and failures.


def failure(dur: Durable, wf: Any) -> WorkflowFailed:
    """Run `wf` once in `dur`; it must fail. Its WorkflowFailed."""
    async def main() -> WorkflowFailed:
        async with dur:
            with pytest.raises(WorkflowFailed) as info:
                await (await dur.run("failing", wf)).result()
            return info.value

    return asyncio.run(main())


def test_transient_failure_is_retried_and_attempts_are_journaled(db: Path, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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
        db: Path, caplog: pytest.LogCaptureFixture, fast: Any) -> None:
    dur = Durable(db, retry=fast)

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
def test_permanent_errors_are_never_retried(db: Path, exc: Exception, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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


def test_uncaught_step_failure_fails_the_workflow_with_type_and_message(
        db: Path, fast: Any) -> None:
    dur = Durable(db, retry=fast)

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
        db: Path, raised: BaseException, form: str, rows: Any, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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


def test_step_returning_non_json_fails_without_retrying(db: Path, fast: Any) -> None:
    dur = Durable(db, retry=fast)
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
        db: Path, fast: Any) -> None:
    ran: list[str] = []
    blocker: dict[str, asyncio.Event] = {}

    def build() -> tuple[Durable, Any]:
        dur = Durable(db, retry=fast)

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
