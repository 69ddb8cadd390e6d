"""The core behaviours, each run down every route a workflow takes through durable.py.

The `route` fixture (conftest.py) runs each test four times: the workflow alone (its
code starts in a step thread, which commits the checkpoints), beside another one busy
in a sync step (it starts on the event loop, then runs on in step threads), crowded
past max_threads (the loop writes every checkpoint), and written as an async def.
Each workflow is written once, as a generator; `route.check()` asserts that its code
really ran where the route says. Every workflow starts with an ordinary sync step, so
that the routes part ways before the behaviour under test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from durable import Permanent, StepFailed, WorkflowCancelled, WorkflowFailed


def steps_of(rows: Any, db: Path, wf_id: str = "w") -> list[tuple[Any, ...]]:
    return rows(db, "SELECT seq, name, state, attempts, result FROM steps "
                    "WHERE workflow_id = ? ORDER BY seq", (wf_id,))


def outcome_of(rows: Any, db: Path, wf_id: str = "w") -> tuple[Any, Any, Any]:
    (state, result, error), = rows(db, "SELECT state, result, error FROM workflows "
                                       "WHERE id = ?", (wf_id,))
    return state, json.loads(result) if result else None, json.loads(error) if error else None


async def until(done: Any, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await asyncio.sleep(0.005)


def fails(route: Any, db: Path, wf: Any, *args: Any, **settings: Any) -> WorkflowFailed:
    """Run `wf` on the route as workflow "w"; it must fail. Its WorkflowFailed."""
    async def main() -> WorkflowFailed:
        async with route.open(db, wf, **settings) as dur:
            with pytest.raises(WorkflowFailed) as info:
                await (await dur.run("w", "wf", *args)).result(timeout=10)
            return info.value

    return asyncio.run(main())


def test_a_step_result_is_recorded_once_and_returned(route: Any, db: Path, rows: Any) -> None:
    ran: list[str] = []

    def reserve(sku: str) -> dict[str, Any]:
        ran.append(sku)
        return {"sku": sku, "held": True}

    def wf(ctx, sku):
        first = yield ctx.run(reserve, sku)
        second = yield ctx.run(reserve, f"{sku}-cable")
        return [first, second]

    async def main() -> tuple[Any, Any]:
        async with route.open(db, wf) as dur:
            handle = await dur.run("w", "wf", "widget")
            return await handle.result(timeout=10), await handle.status()

    result, status = asyncio.run(main())
    route.check()
    assert result == [{"sku": "widget", "held": True}, {"sku": "widget-cable", "held": True}]
    assert ran == ["widget", "widget-cable"]  # each step's body ran once
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '{"sku":"widget","held":true}'),
                                  (2, "reserve", "done", 1, '{"sku":"widget-cable","held":true}')]
    assert [step.result for step in status.steps] == result


def test_a_failed_attempt_is_retried_and_its_history_journaled(
        route: Any, db: Path, rows: Any, fast: Any) -> None:
    calls: list[int] = []

    def reserve(sku: str) -> str:
        return sku

    def charge(amount: int) -> str:
        calls.append(amount)
        if len(calls) < 3:
            raise ConnectionError(f"gateway timeout {len(calls)}")
        return f"ch_{amount}"

    def wf(ctx, amount):
        yield ctx.run(reserve, "widget")
        return (yield ctx.run(charge, amount))

    async def main() -> Any:
        async with route.open(db, wf, retry=fast) as dur:
            return await (await dur.run("w", "wf", 100)).result(timeout=10)

    assert asyncio.run(main()) == "ch_100"
    route.check()
    assert calls == [100] * 3
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '"widget"'),
                                  (2, "charge", "done", 3, '"ch_100"')]
    (failures,), = rows(db, "SELECT failures FROM steps WHERE workflow_id = 'w' AND seq = 2")
    history = json.loads(failures)
    assert [(f["attempt"], f["error"]) for f in history] == [
        (1, {"type": "ConnectionError", "message": "gateway timeout 1"}),
        (2, {"type": "ConnectionError", "message": "gateway timeout 2"})]
    assert all(f["started_at"] <= f["finished_at"] for f in history)


def test_a_step_failing_for_good_raises_step_failed_inside_and_the_workflow_goes_on(
        route: Any, db: Path, rows: Any, fast: Any) -> None:
    ran: list[str] = []

    def reserve(sku: str) -> str:
        ran.append("reserve")
        return sku

    def charge(amount: int) -> str:
        ran.append("charge")
        raise ConnectionError("card network down")

    def release(sku: str) -> bool:
        ran.append("release")
        return True

    def wf(ctx):
        held = yield ctx.run(reserve, "widget")
        try:
            yield ctx.run(charge, 100)
        except StepFailed as exc:
            released = yield ctx.run(release, held)
            return {"released": released, "step": exc.step, "type": exc.error_type,
                    "message": exc.message, "attempts": exc.attempts}
        return "charged"

    async def main() -> Any:
        async with route.open(db, wf, retry=fast) as dur:
            return await (await dur.run("w", "wf")).result(timeout=10)

    assert asyncio.run(main()) == {"released": True, "step": "charge", "type": "ConnectionError",
                                   "message": "card network down", "attempts": 3}
    route.check()
    assert ran == ["reserve", "charge", "charge", "charge", "release"]
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '"widget"'),
                                  (2, "charge", "failed", 3, None),
                                  (3, "release", "done", 1, "true")]
    assert outcome_of(rows, db)[0] == "done"


def test_a_permanent_error_is_not_retried_and_fails_the_workflow(
        route: Any, db: Path, rows: Any, fast: Any) -> None:
    calls: list[int] = []

    def reserve(sku: str) -> str:
        return sku

    def charge(amount: int) -> str:
        calls.append(amount)
        raise Permanent("card declined")

    def wf(ctx):
        yield ctx.run(reserve, "widget")
        yield ctx.run(charge, 100)
        return "charged"

    failed = fails(route, db, wf, retry=fast)
    route.check()
    assert (failed.error_type, failed.message, failed.step) == ("Permanent", "card declined",
                                                               "charge")
    assert calls == [100]
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '"widget"'),
                                  (2, "charge", "failed", 1, None)]
    assert outcome_of(rows, db) == ("failed", None, {
        "type": "Permanent", "message": "card declined", "step": "charge", "attempts": 1})


def test_a_step_returning_a_value_that_is_not_json_fails_the_workflow_clearly(
        route: Any, db: Path, rows: Any, fast: Any) -> None:
    calls: list[str] = []

    def reserve(sku: str) -> str:
        return sku

    def lookup(sku: str) -> object:
        calls.append(sku)
        return {sku, "not JSON"}

    def wf(ctx):
        sku = yield ctx.run(reserve, "widget")
        yield ctx.run(lookup, sku)
        return "found"

    failed = fails(route, db, wf, retry=fast)
    route.check()
    assert (failed.error_type, failed.step) == ("TypeError", "lookup")
    assert failed.message.startswith("the step returned a value that is not JSON")
    assert calls == ["widget"]  # not retried: the same code would return the same
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '"widget"'),
                                  (2, "lookup", "failed", 1, None)]
    assert outcome_of(rows, db)[0] == "failed"


def test_a_workflow_that_raises_fails_with_its_error_and_keeps_its_steps(
        route: Any, db: Path, rows: Any) -> None:
    def price(qty: int) -> int:
        return qty * 2999

    def wf(ctx, qty):
        total = yield ctx.run(price, qty)
        raise ValueError(f"total {total} is over the limit")

    failed = fails(route, db, wf, 4)
    route.check()
    assert (failed.error_type, failed.message, failed.step) == (
        "ValueError", "total 11996 is over the limit", None)
    assert steps_of(rows, db) == [(1, "price", "done", 1, "11996")]  # recorded with the end
    assert outcome_of(rows, db) == ("failed", None, {"type": "ValueError",
                                                     "message": "total 11996 is over the limit"})


def test_a_workflow_returning_a_value_that_is_not_json_fails_clearly(
        route: Any, db: Path, rows: Any) -> None:
    def price(qty: int) -> int:
        return qty * 2999

    def wf(ctx, qty):
        total = yield ctx.run(price, qty)
        return {total}

    failed = fails(route, db, wf, 1)
    route.check()
    assert failed.error_type == "TypeError"
    assert failed.message.startswith("the workflow returned a value that is not JSON")
    assert steps_of(rows, db) == [(1, "price", "done", 1, "2999")]
    assert outcome_of(rows, db)[0] == "failed"


def test_the_final_result_is_committed_and_answered_to_every_caller(
        route: Any, db: Path, rows: Any) -> None:
    ran: Counter[str] = Counter()

    def reserve(sku: str, qty: int) -> dict[str, Any]:
        ran["reserve"] += 1
        return {"sku": sku, "qty": qty}

    def charge(amount: int, key: str) -> str:
        ran["charge"] += 1
        return f"ch_{key}_{amount}"

    def wf(ctx, order):
        held = yield ctx.run(reserve, order["sku"], order["qty"])
        charge_id = yield ctx.run(charge, held["qty"] * order["price"], ctx.id)
        return {"held": held, "chargeId": charge_id}

    order = {"sku": "widget", "qty": 2, "price": 2999}
    expected = {"held": {"sku": "widget", "qty": 2}, "chargeId": "ch_w_5998"}

    async def main() -> list[Any]:
        async with route.open(db, wf) as dur:
            handle = await dur.run("w", "wf", order)
            first = await handle.result(timeout=10)
            again = await dur.run("w", "wf", order)  # the same id: answered, not run
            status = await handle.status()
            return [first, again.created, await again.result(timeout=10), status.state,
                    status.result, status.finished_at is not None, await handle.done()]

    assert asyncio.run(main()) == [expected, False, expected, "done", expected, True, True]
    route.check()
    assert ran == {"reserve": 1, "charge": 1}
    assert outcome_of(rows, db) == ("done", expected, None)
    assert [row[2] for row in steps_of(rows, db)] == ["done", "done"]


def test_after_a_restart_a_finished_step_is_replayed_and_never_run_again(
        route: Any, db: Path, rows: Any) -> None:
    # close(grace=0) gives up on a step that is still running: the workflow is left
    # unfinished, held under a lease that runs out as if its process had died.
    ran: Counter[str] = Counter()
    inside, let_go = threading.Event(), threading.Event()

    def reserve(sku: str) -> dict[str, Any]:
        ran["reserve"] += 1
        return {"sku": sku}

    def charge(amount: int) -> str:
        ran["charge"] += 1
        if ran["charge"] == 1:
            inside.set()
            let_go.wait(10)
        return f"ch_{amount}"

    def wf(ctx):
        held = yield ctx.run(reserve, "widget")
        charge_id = yield ctx.run(charge, 100)
        return {"held": held, "chargeId": charge_id}

    async def main() -> tuple[list[Any], Any]:
        async with route.open(db, wf, lease=0.5) as dur:
            await dur.run("w", "wf")
            await until(inside.is_set, "the charge to start")
            await dur.close(grace=0)
        let_go.set()  # the abandoned attempt returns; nothing records its result
        left = steps_of(rows, db)
        async with route.open(db, wf, lease=0.5) as dur:  # takes it over past the lease
            return left, await (await dur.get("w")).result(timeout=10)

    left, result = asyncio.run(main())
    route.check()
    assert left == [(1, "reserve", "done", 1, '{"sku":"widget"}'),
                    (2, "charge", "running", 1, None)]
    assert result == {"held": {"sku": "widget"}, "chargeId": "ch_100"}
    assert ran == {"reserve": 1, "charge": 2}  # reserve replayed from the journal
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '{"sku":"widget"}'),
                                  (2, "charge", "done", 2, '"ch_100"')]
    (failures,), = rows(db, "SELECT failures FROM steps WHERE workflow_id = 'w' AND seq = 2")
    assert [(f["attempt"], f["error"]["type"]) for f in json.loads(failures)] == [
        (1, "Interrupted")]


def test_cancel_while_a_step_runs_records_nothing_after_it(
        route: Any, db: Path, rows: Any) -> None:
    ran: list[str] = []
    inside, let_go = threading.Event(), threading.Event()

    def reserve(sku: str) -> str:
        ran.append("reserve")
        return sku

    def charge(amount: int) -> str:
        ran.append("charge")
        inside.set()
        let_go.wait(10)
        return f"ch_{amount}"

    def confirm(charge_id: str) -> str:
        ran.append("confirm")
        return "sent"

    def wf(ctx):
        yield ctx.run(reserve, "widget")
        charge_id = yield ctx.run(charge, 100)
        yield ctx.run(confirm, charge_id)
        return "done"

    async def main() -> None:
        async with route.open(db, wf) as dur:
            handle = await dur.run("w", "wf")
            await until(inside.is_set, "the charge to start")
            assert await dur.cancel("w")
            let_go.set()  # the charge returns after the cancel
            with pytest.raises(WorkflowCancelled):
                await handle.result(timeout=10)
        # closed: close() waited for the charge's thread, and nothing can write now

    asyncio.run(main())
    route.check()
    assert ran == ["reserve", "charge"]
    assert steps_of(rows, db) == [(1, "reserve", "done", 1, '"widget"'),
                                  (2, "charge", "running", 1, None)]
    assert outcome_of(rows, db) == ("cancelled", None, {"type": "WorkflowCancelled",
                                                        "message": "cancelled by request"})


def test_a_journal_that_cannot_be_written_stops_the_workflow_unfinished(
        route: Any, db: Path, rows: Any, write_lock: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # Another connection holds the write lock past busy_timeout while a step returns:
    # its checkpoint fails, so nothing after it runs or is recorded; once the lock is
    # gone the workflow resumes from its journal.
    ran: Counter[str] = Counter()
    inside, let_go, returned = threading.Event(), threading.Event(), threading.Event()

    def reserve(sku: str) -> str:
        ran["reserve"] += 1
        return sku

    def charge(amount: int) -> str:
        ran["charge"] += 1
        if ran["charge"] == 1:
            inside.set()
            let_go.wait(10)
            returned.set()
        return f"ch_{amount}"

    def confirm(charge_id: str) -> str:
        ran["confirm"] += 1
        return "sent"

    def wf(ctx):
        sku = yield ctx.run(reserve, "widget")
        charge_id = yield ctx.run(charge, 100)
        note = yield ctx.run(confirm, charge_id)
        return [sku, charge_id, note]

    async def main() -> tuple[Any, ...]:
        async with route.open(db, wf, busy_timeout=0.05) as dur:
            handle = await dur.run("w", "wf")
            await until(inside.is_set, "the charge to start")
            with write_lock(db) as says:  # as another process would hold it
                let_go.set()
                await until(returned.is_set, "the charge to return")
                await until(lambda: "could not write its journal" in caplog.text,
                            "the failed checkpoint")
                await asyncio.sleep(0.2)  # and nothing else happens meanwhile
                locked = (steps_of(rows, db), outcome_of(rows, db), dict(ran),
                          await handle.done(), says)
            return locked, await handle.result(timeout=10)

    with caplog.at_level(logging.WARNING, logger="durable"):
        (steps, outcome, ran_then, done, says), result = asyncio.run(main())
    route.check()
    assert steps == [(1, "reserve", "done", 1, '"widget"'), (2, "charge", "running", 1, None)]
    assert outcome == ("running", None, None) and not done
    assert ran_then == {"reserve": 1, "charge": 1}  # confirm never began
    assert says in caplog.text
    assert result == ["widget", "ch_100", "sent"]
    assert ran == {"reserve": 1, "charge": 2, "confirm": 1}  # charge's result was lost
    assert [row[:4] for row in steps_of(rows, db)] == [
        (1, "reserve", "done", 1), (2, "charge", "done", 2), (3, "confirm", "done", 1)]


def test_each_route_sets_its_scene(route: Any, db: Path) -> None:
    # The scene itself: what runs beside the workflow, and its form.
    def wf(ctx):
        yield ctx.run(str, "x")

    async def main() -> tuple[int, int, bool]:
        async with route.open(db, wf) as dur:
            others = len(dur._runs)
            is_async = dur._workflow("wf").is_async
            await (await dur.run("w", "wf")).result(timeout=10)
            return others, dur.max_threads, is_async

    others, max_threads, is_async = asyncio.run(main())
    route.check()
    assert (others, is_async) == {"alone": (0, False), "beside": (1, False),
                                  "crowded": (2, False), "async": (0, True)}[route.name]
    assert (max_threads == 1) == (route.name == "crowded")

