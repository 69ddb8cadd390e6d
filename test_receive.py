"""Waiting for the outside world: ctx.receive and dur.send (CONTRACT.md §7), in both
workflow forms, on both stores, across restarts, processes and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from durable import (
    Durable,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    ReceiveTimeout,
    WorkflowCancelled,
)

HERE = Path(__file__).resolve().parent
FORMS = ("generator", "async")


async def until(done: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await done():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await asyncio.sleep(0.01)


async def waiting(dur: Durable, wf_id: str) -> bool:
    status = await (await dur.get(wf_id)).status()
    return bool(status.steps) and status.steps[-1].name.startswith("ctx.receive:") \
        and status.steps[-1].state == "running"


@pytest.mark.parametrize("form", FORMS)
def test_receive_returns_the_value_sent_and_a_restart_while_waiting_runs_no_step_again(
        db: Any, form: str, register_in: Any) -> None:
    ran: list[str] = []

    def wf(ctx, order_id):
        yield ctx.run(ran.append, f"reserve {order_id}")
        decision = yield ctx.receive("approval")
        yield ctx.run(ran.append, f"after {decision['approved']}")
        return decision

    def build() -> Durable:
        dur = Durable(db)
        register_in(dur, form, wf)
        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("r", "wf", "o1")
            await until(lambda: waiting(dur, "r"), "the receive to begin")
        # Stopped while it waits; the next process resumes it, waiting again.
        async with build() as dur:
            await until(lambda: waiting(dur, "r"), "the receive to begin again")
            assert ran == ["reserve o1"]  # journaled before the wait: not run again
            assert await dur.send("r", "approval", {"approved": True}) is True
            result = await (await dur.get("r")).result(timeout=10)
            status = await (await dur.get("r")).status()
        return result, status

    result, status = asyncio.run(main())
    assert result == {"approved": True}
    assert ran == ["reserve o1", "after True"]
    assert [(s.name, s.state, s.result) for s in status.steps] == [
        ("list.append", "done", None), ("ctx.receive:approval", "done", {"approved": True}),
        ("list.append", "done", None)]


@pytest.mark.parametrize("form", FORMS)
def test_a_value_sent_before_the_receive_waits_for_it(db: Any, form: str, register_in: Any) -> None:
    gate = threading.Event()
    dur = Durable(db)

    def wf(ctx):
        yield ctx.run(gate.wait, 10)
        return (yield ctx.receive("go"))

    register_in(dur, form, wf)

    async def main() -> Any:
        async with dur:
            handle = await dur.run("early", "wf")
            assert await dur.send("early", "go", [1, "two"])  # still in its first step
            gate.set()
            return await handle.result(timeout=10)

    assert asyncio.run(main()) == [1, "two"]


def test_one_value_per_name_and_clear_refusals_that_write_nothing(db: Any, rows: Any) -> None:
    dur = Durable(db)

    def wf(ctx):
        yield ctx.receive("first")  # "approval" waits meanwhile
        return (yield ctx.receive("approval"))

    dur.register(name="wf")(wf)

    def quick(ctx):
        return (yield ctx.run(str, "x"))

    dur.register(name="quick")(quick)

    async def main() -> None:
        async with dur:
            await dur.run("w", "wf")
            assert await dur.send("w", "approval", {"approved": False, "reason": "late"})
            # The same value again, keys in another order: a retried webhook, no change.
            assert await dur.send("w", "approval", {"reason": "late", "approved": False}) \
                is False
            with pytest.raises(IdempotencyConflict, match="another value under 'approval'"):
                await dur.send("w", "approval", {"approved": True})
            await dur.send("w", "first", None)
            assert await (await dur.get("w")).result(timeout=10) == {
                "approved": False, "reason": "late"}
            with pytest.raises(NotFound):
                await dur.send("nobody", "approval", 1)
            await (await dur.run("done", "quick")).result(timeout=10)
            with pytest.raises(InvalidInput, match="is done; nothing can be sent"):
                await dur.send("done", "approval", 1)
            await dur.run("open", "wf")
            for name in ("", "x" * 256, 7, "a\x00b"):
                with pytest.raises(InvalidInput, match="message name"):
                    await dur.send("open", name, 1)  # type: ignore[arg-type]
            for value in (object(), float("nan"), {1j}):
                with pytest.raises(InvalidInput, match="must be JSON"):
                    await dur.send("open", "approval", value)

    asyncio.run(main())
    assert rows(db, "SELECT workflow_id, name FROM messages ORDER BY 2") == [
        ("w", "approval"), ("w", "first")]


def test_bad_receive_calls_are_refused_before_anything_is_written(db: Any, rows: Any) -> None:
    dur = Durable(db)
    refused: list[str] = []

    @dur.register
    def wf(ctx):
        for name, timeout in (("", None), ("x" * 256, None), (3, None), ("ok", -1),
                              ("ok", "soon"), ("ok", float("inf"))):
            try:
                ctx.receive(name, timeout=timeout)
            except InvalidInput as exc:
                refused.append(str(exc).split(",")[0].split(" must")[0])
        return len(refused)
        yield  # a generator workflow

    async def main() -> Any:
        async with dur:
            return await (await dur.run("w", wf)).result(timeout=10)

    assert asyncio.run(main()) == 6
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]


@pytest.mark.parametrize("form", FORMS)
def test_a_receive_timeout_is_catchable_and_its_deadline_survives_a_restart(
        db: Any, form: str, register_in: Any) -> None:
    def wf(ctx):
        try:
            return (yield ctx.receive("reply", timeout=2.0))
        except ReceiveTimeout as exc:
            return f"gave up: {exc}"

    def build() -> Durable:
        dur = Durable(db)
        register_in(dur, form, wf)
        return dur

    async def main() -> tuple[Any, Any]:
        async with build() as dur:
            await dur.run("t", "wf")
            await until(lambda: waiting(dur, "t"), "the receive to begin")
            await asyncio.sleep(1.0)
        async with build() as dur:  # a second left of its two, not two more
            handle = await dur.get("t")
            return await handle.result(timeout=10), await handle.status()

    result, status = asyncio.run(main())
    assert result == "gave up: nothing was sent under 'reply' within 2.0s"
    assert status.steps[0].state == "failed"
    assert status.steps[0].error["type"] == "ReceiveTimeout"
    assert 2.0 <= status.finished_at - status.steps[0].started_at < 2.8


def test_a_timeout_of_zero_with_the_value_already_sent_returns_the_value(db: Any) -> None:
    dur = Durable(db)
    gate = threading.Event()

    @dur.register
    def wf(ctx):
        yield ctx.run(gate.wait, 10)
        return (yield ctx.receive("v", timeout=0))

    async def main() -> Any:
        async with dur:
            handle = await dur.run("z", wf)
            await dur.send("z", "v", "here")
            gate.set()
            return await handle.result(timeout=10)

    assert asyncio.run(main()) == "here"


def test_workflows_waiting_in_receive_hold_no_threads_and_cancel_wakes_them(db: Any) -> None:
    dur = Durable(db, max_threads=1)

    @dur.register
    def wf(ctx, n):
        return (yield ctx.receive("go"))

    @dur.register
    def busy(ctx):
        return (yield ctx.run(lambda: "the one thread is free"))

    async def main() -> Any:
        async with dur:
            threads = threading.active_count()
            for n in range(50):
                await dur.run(f"w{n}", wf, n)
            await until(lambda: waiting(dur, "w49"), "the last receive to begin")
            assert threading.active_count() <= threads + 1
            free = await (await dur.run("busy", busy)).result(timeout=10)
            assert await dur.cancel("w0")
            with pytest.raises(WorkflowCancelled):
                await (await dur.get("w0")).result(timeout=10)
            for n in range(1, 50):
                await dur.send(f"w{n}", "go", n)
            return free, [await (await dur.get(f"w{n}")).result(timeout=10)
                          for n in range(1, 50)]

    free, results = asyncio.run(main())
    assert free == "the one thread is free"
    assert results == list(range(1, 50))


WAITER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from durable import Durable

    db, marks = sys.argv[1], sys.argv[2]
    dur = Durable(db)

    def mark(what):
        with open(marks, "a") as f:
            f.write(what + "\\n")

    @dur.register(name="refund")
    def refund(ctx, order_id):
        yield ctx.run(mark, "asked")
        decision = yield ctx.receive("decision")
        yield ctx.run(mark, "decided")
        return {"decision": decision, "at": time.time()}

    async def main():
        async with dur:
            handle = await dur.run("refund/1", refund, "o1")
            print(json.dumps(await handle.result(timeout=60)), flush=True)

    asyncio.run(main())
""")


def _waiter(tmp_path: Path, db: Any) -> tuple[subprocess.Popen[str], Path]:
    script, marks = tmp_path / "waiter.py", tmp_path / "marks.txt"
    script.write_text(WAITER)
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(marks)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(HERE)})
    return proc, marks


def _until_waiting(db: Any, rows: Any, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:  # the journal may not be there yet
            if rows(db, "SELECT count(*) FROM steps "
                        "WHERE name = 'ctx.receive:decision'") == [(1,)]:
                return
        except Exception:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_workflow_waiting_in_another_process_wakes_within_a_second_of_a_send(
        tmp_path: Path, db: Any, rows: Any) -> None:
    proc, _ = _waiter(tmp_path, db)
    try:
        _until_waiting(db, rows, proc)

        async def send() -> float:
            async with Durable(db) as dur:  # holds nothing; the waiter holds the workflow
                sent = time.time()
                assert await dur.send("refund/1", "decision", {"approved": True})
                return sent

        sent = asyncio.run(send())
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["decision"] == {"approved": True}
    assert result["at"] - sent < 1.0


def test_a_process_killed_while_waiting_is_resumed_and_its_steps_before_do_not_run_again(
        tmp_path: Path, db: Any, rows: Any) -> None:
    proc, marks = _waiter(tmp_path, db)
    try:
        _until_waiting(db, rows, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()

        async def resume() -> Any:
            dur = Durable(db)

            def mark(what: str) -> None:
                with open(marks, "a") as f:
                    f.write(what + "\n")

            @dur.register(name="refund")
            def refund(ctx, order_id):
                yield ctx.run(mark, "asked")
                decision = yield ctx.receive("decision")
                yield ctx.run(mark, "decided")
                return {"decision": decision}

            async with dur:  # the dead holder's workflow is taken over at once
                assert await dur.send("refund/1", "decision", "yes")
                return await (await dur.get("refund/1")).result(timeout=10)

        assert asyncio.run(resume()) == {"decision": "yes"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert marks.read_text().split() == ["asked", "decided"]


def test_the_command_line_sends_and_show_says_what_a_workflow_waits_for(
        db: Any, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HERE / "durable.py"), str(db), *args],
                              capture_output=True, text=True, timeout=60)

    dur = Durable(db)

    @dur.register
    def wf(ctx):
        return (yield ctx.receive("approval", timeout=3600))

    async def start() -> None:
        async with dur:
            await dur.run("w", wf)
            await until(lambda: waiting(dur, "w"), "the receive to begin")

    asyncio.run(start())
    shown = cli("show", "w")
    assert shown.returncode == 0, shown.stderr
    assert "  now: waiting in step 1 for a value under 'approval' since " in shown.stdout
    assert " UTC, until " in shown.stdout and "s from now)" in shown.stdout
    bad = cli("send", "w", "approval", "{approved: yes}")
    assert bad.returncode == 2 and "the value must be JSON" in bad.stderr
    sent = cli("send", "w", "approval", '{"approved": true}')
    assert (sent.returncode, sent.stdout.split(";")[0]) == (
        0, "sent to workflow 'w' under 'approval'")
    again = cli("send", "w", "approval", '{"approved": true}', "--json")
    assert json.loads(again.stdout) == {"id": "w", "name": "approval", "sent": False}
    other = cli("send", "w", "approval", '{"approved": false}')
    assert other.returncode == 1 and "another value under 'approval'" in other.stderr
    assert "Traceback" not in bad.stderr + other.stderr

    async def finish() -> Any:
        async with dur:
            return await (await dur.get("w")).result(timeout=10)

    assert asyncio.run(finish()) == {"approved": True}
    shown = cli("show", "w")
    assert "  received\n  step 1: 'approval' = {\"approved\":true}" in shown.stdout


def test_a_journal_of_the_first_schema_gains_messages_and_parents(
        db: Any, rows: Any, store: str) -> None:
    async def touch() -> None:
        async with Durable(db):
            pass

    asyncio.run(touch())
    # Back to what version 1 held: no messages, no parents.
    rows(db, "DROP TABLE messages")
    if store == "sqlite":  # PostgreSQL drops it with its column
        rows(db, "DROP INDEX workflows_parent")
    rows(db, "ALTER TABLE workflows DROP COLUMN parent")
    rows(db, "UPDATE durable_schema SET version = 1" if store == "postgres"
         else "PRAGMA user_version = 1")
    asyncio.run(touch())
    assert rows(db, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(db, "SELECT count(parent) FROM workflows") == [(0,)]


def test_values_that_differ_as_json_conflict_and_a_value_sent_just_before_the_deadline_counts(
        db: Any) -> None:
    # 1, true and 1.0 are three values; and a value another process sends before the
    # deadline is received even when the twice-a-second look would come too late.
    dur, other = Durable(db), Durable(db)

    @dur.register
    def wf(ctx):
        first = yield ctx.receive("one")
        try:
            return [first, (yield ctx.receive("late", timeout=0.4))]
        except ReceiveTimeout:
            return [first, "timed out"]

    async def main() -> Any:
        async with dur, other:
            handle = await dur.run("w", wf)
            await dur.send("w", "one", 1)
            for value in (True, 1.0):
                with pytest.raises(IdempotencyConflict):
                    await dur.send("w", "one", value)
            await until(lambda: waiting(dur, "w"), "the second receive")
            await asyncio.sleep(0.1)
            assert await other.send("w", "late", "just in time")  # from elsewhere
            return await handle.result(timeout=10)

    assert asyncio.run(main()) == [1, "just in time"]
