"""Operating it: cancel, retry, prune, durable sleep, and the command line, used
against journals that a running process writes at the same time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from durable import (
    Durable,
    InvalidInput,
    NotFound,
    RetryPolicy,
    WorkflowCancelled,
    WorkflowFailed,
)

HERE = Path(__file__).resolve().parent
FAST = RetryPolicy(max_attempts=2, initial_delay=0, jitter=0)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HERE / "durable.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


# Cancel.


def test_cancel_stops_a_sleeping_workflow_and_result_raises_cancelled(db: Path, rows: Any) -> None:
    dur = Durable(db)
    ran: list[str] = []

    @dur.register
    def wf(ctx):
        yield ctx.run(ran.append, "before")
        yield ctx.sleep(30)
        yield ctx.run(ran.append, "after")

    async def main() -> Any:
        async with dur:
            handle = await dur.run("c", wf)
            while not rows(db, "SELECT 1 FROM steps WHERE name = 'ctx.sleep'"):
                await asyncio.sleep(0.01)
            start = time.monotonic()
            assert await dur.cancel("c") is True
            with pytest.raises(WorkflowCancelled):
                await handle.result(timeout=5)
            assert time.monotonic() - start < 5  # woken, not left to sleep 30 s
            return await handle.status()

    status = asyncio.run(main())
    assert status.state == "cancelled" and status.finished_at is not None
    assert ran == ["before"]


def test_cancel_lets_a_running_step_finish_but_nothing_after_it(db: Path) -> None:
    dur = Durable(db)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(10)
        ran.append("slow finished")
        return "late"

    @dur.register
    def wf(ctx):
        yield ctx.run(slow)
        yield ctx.run(ran.append, "next step")

    async def main() -> Any:
        async with dur:
            handle = await dur.run("c", wf)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            waiter = asyncio.create_task(handle.result(timeout=2))
            await asyncio.sleep(0.05)
            assert await dur.cancel("c") is True
            # Waiters learn at once, while the step is still running.
            with pytest.raises(WorkflowCancelled):
                await waiter
            assert await handle.done()
            release.set()
            await asyncio.sleep(0.2)
            return await handle.status()

    status = asyncio.run(main())
    assert ran == ["slow finished"]
    # The step's late result was not recorded.
    assert [(s.name, s.state, s.result) for s in status.steps] == [("slow", "running", None)]


def test_cancelling_a_finished_workflow_is_a_clear_no_op(db: Path, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx):
        return (yield ctx.run(str, "ok"))

    async def main() -> None:
        async with dur:
            handle = await dur.run("d", wf)
            assert await handle.result() == "ok"
            before = rows(db, "SELECT * FROM workflows")
            assert await dur.cancel("d") is False
            assert rows(db, "SELECT * FROM workflows") == before
            with pytest.raises(NotFound):
                await dur.cancel("nope")

    asyncio.run(main())


def test_an_id_cancelled_pruned_and_reused_runs_once_its_old_step_returns(db: Path) -> None:
    dur = Durable(db)
    started, release = threading.Event(), threading.Event()

    def slow(n: int) -> int:
        started.set()
        release.wait(10)
        return n

    @dur.register
    def wf(ctx, n):
        return (yield ctx.run(slow, n))

    async def main() -> Any:
        async with dur:
            await dur.run("reused", wf, 1)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            await dur.cancel("reused")
            assert await dur.prune(0) == 1
            again = await dur.run("reused", wf, 2)  # the old step still runs
            assert again.created
            release.set()
            return await again.result(timeout=10)

    assert asyncio.run(main()) == 2


# Retry.


def test_retry_runs_a_failed_workflow_again_from_its_failed_step(db: Path) -> None:
    dur = Durable(db, retry=FAST)
    ran: list[str] = []
    broken = [True]

    def first() -> str:
        ran.append("first")
        return "one"

    def flaky() -> str:
        ran.append("flaky")
        if broken[0]:
            raise ConnectionError("still down")
        return "two"

    @dur.register
    def wf(ctx):
        a = yield ctx.run(first)
        b = yield ctx.run(flaky)
        return [a, b]

    async def main() -> Any:
        async with dur:
            handle = await dur.run("r", wf)
            with pytest.raises(WorkflowFailed):
                await handle.result()
            broken[0] = False
            assert await dur.retry("r") == 2
            assert await handle.result(timeout=5) == ["one", "two"]
            with pytest.raises(InvalidInput, match="only a failed workflow"):
                await dur.retry("r")
            with pytest.raises(NotFound):
                await dur.retry("nope")
            return await handle.status()

    status = asyncio.run(main())
    # Step 1 stayed journaled; step 2 got fresh attempts (2 failed, then 1 that worked).
    assert ran == ["first", "flaky", "flaky", "flaky"]
    assert [(s.name, s.attempts) for s in status.steps] == [("first", 1), ("flaky", 1)]


# Prune.


def test_prune_deletes_old_finished_workflows_only_and_frees_their_ids(db: Path, rows: Any) -> None:
    dur = Durable(db)
    gate, waiting = asyncio.Event(), asyncio.Event()

    async def wait() -> None:
        waiting.set()
        await gate.wait()

    @dur.register
    async def wf(ctx, n):
        await ctx.run(str, n)
        if n == "open":
            await ctx.run(wait)

    async def main() -> None:
        async with dur:
            for n in ("a", "b"):
                await (await dur.run(n, wf, n)).result()
            await dur.run("open", wf, "open")
            await waiting.wait()  # its steps are journaled: they must stay
            assert await dur.prune(timedelta(hours=1)) == 0  # none is that old
            assert await dur.prune(0) == 2
            assert rows(db, "SELECT id FROM workflows") == [("open",)]
            assert rows(db, "SELECT DISTINCT workflow_id FROM steps") == [("open",)]
            again = await dur.run("a", wf, "a-again")  # the id is free again
            assert again.created and await again.result() is None
            with pytest.raises(InvalidInput):
                await dur.prune(-1)
            gate.set()

    asyncio.run(main())


# Durable sleep.


def sleeping(rows: Any, db: Path) -> bool:
    try:
        return bool(rows(db, "SELECT 1 FROM steps WHERE name = 'ctx.sleep'"))
    except sqlite3.OperationalError:  # the file is there, its tables not yet
        return False


SLEEPER = textwrap.dedent("""
    import asyncio, json, sys, time
    from durable import Durable

    dur = Durable(sys.argv[1])

    @dur.register(name="nap")
    def nap(ctx):
        yield ctx.sleep(3)
        return "awake"

    async def main():
        async with dur:
            handle = await dur.run("s", nap)
            print(json.dumps(await handle.result(timeout=30)), flush=True)

    asyncio.run(main())
""")


def test_sleep_survives_a_restart_and_sleeps_only_the_time_left(tmp_path: Path, rows: Any) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    db = tmp_path / "sleep.db"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    first = subprocess.Popen([sys.executable, str(script), str(db)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not sleeping(rows, db):
        time.sleep(0.02)
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    start = time.monotonic()
    second = subprocess.run([sys.executable, str(script), str(db)], env=env,
                            capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - start
    assert json.loads(second.stdout) == "awake", second.stderr
    # About 2 s were left of the 3 s sleep (process start-up included), not 3.
    assert 1.4 < elapsed < 2.8, elapsed


def test_sleeping_workflows_hold_no_threads(db: Path) -> None:
    dur = Durable(db, max_threads=1)

    @dur.register
    def wf(ctx, n):
        yield ctx.sleep(0.5)
        return n

    async def main() -> float:
        async with dur:
            handles = [await dur.run(f"z{i}", wf, i) for i in range(100)]
            start = time.monotonic()
            assert await asyncio.gather(*(h.result() for h in handles)) == list(range(100))
            return time.monotonic() - start

    # With one worker thread, 100 sleeps of 0.5 s that held a thread would take 50 s.
    assert asyncio.run(main()) < 10


def test_sleep_refuses_a_negative_or_non_number_duration(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, seconds):
        yield ctx.sleep(seconds)

    async def main() -> list[str]:
        messages = []
        async with dur:
            for i, bad in enumerate([-1, "5", None, True]):
                with pytest.raises(WorkflowFailed) as info:
                    await (await dur.run(f"b{i}", wf, bad)).result()
                messages.append(info.value.message)
        return messages

    assert all("seconds >= 0" in m for m in asyncio.run(main()))


# The command line, against a journal a running process writes.


WORKER = textwrap.dedent("""
    import asyncio, logging, os, sys
    from durable import Durable, RetryPolicy, WorkflowCancelled, WorkflowFailed

    logging.basicConfig(level=logging.INFO)
    db, broken = sys.argv[1], sys.argv[2]
    dur = Durable(db, lease=1.5, retry=RetryPolicy(max_attempts=2, initial_delay=0))

    def fragile():
        if os.path.exists(broken):
            raise ConnectionError("the backend is down")
        return "fixed"

    @dur.register(name="fragile")
    def fragile_flow(ctx):
        return (yield ctx.run(fragile))

    @dur.register(name="sleepy")
    def sleepy(ctx):
        yield ctx.sleep(60)
        return "woke"

    async def main():
        async with dur:
            await dur.run("will-fail", fragile_flow)
            sleeping = await dur.run("sleeping", sleepy)
            try:
                await sleeping.result(timeout=60)
            except WorkflowCancelled:  # returns once this process has stopped it
                print("sleeping: cancelled", flush=True)
            while not os.path.exists(broken + ".stop"):
                await asyncio.sleep(0.05)

    asyncio.run(main())
""")


def test_cli_cancel_and_retry_steer_workflows_of_a_running_process(tmp_path: Path) -> None:
    script, db, broken = tmp_path / "worker.py", tmp_path / "live.db", tmp_path / "broken"
    script.write_text(WORKER)
    broken.touch()
    worker = subprocess.Popen([sys.executable, str(script), str(db), str(broken)],
                              env={**os.environ, "PYTHONPATH": str(HERE)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def state(wf_id: str) -> str:
            shown = cli(str(db), "show", wf_id, "--json")
            return str(json.loads(shown.stdout)["state"]) if shown.returncode == 0 else ""

        def wait_for(wf_id: str, wanted: str) -> None:
            deadline = time.monotonic() + 20
            while state(wf_id) != wanted:
                assert time.monotonic() < deadline, (wf_id, wanted, state(wf_id))
                time.sleep(0.1)

        wait_for("will-fail", "failed")
        wait_for("sleeping", "running")
        # retry: the running process picks the workflow up again on its own.
        broken.unlink()
        retried = cli(str(db), "retry", "will-fail")
        assert retried.returncode == 0 and "restarts at step 1" in retried.stdout
        wait_for("will-fail", "done")
        # cancel: the sleeping workflow in the other process stops.
        cancelled = cli(str(db), "cancel", "sleeping")
        assert (cancelled.returncode, cancelled.stdout) == (0, "cancelled workflow 'sleeping'\n")
        again = cli(str(db), "cancel", "sleeping", "--json")
        assert json.loads(again.stdout) == {"id": "sleeping", "cancelled": False}
        listed = json.loads(cli(str(db), "list", "--json").stdout)
        assert {(w["id"], w["state"]) for w in listed} == {("will-fail", "done"),
                                                           ("sleeping", "cancelled")}
        (broken.parent / "broken.stop").touch()
        out, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert out == "sleeping: cancelled\n"
    assert "workflow 'sleeping' is no longer held by this process: it was cancelled" in err
    assert "took over 1 workflow(s)" in err  # the retried one, released by the CLI


def test_cli_reads_and_prunes_while_the_order_service_takes_orders(
        service: Any, order: Any, rows: Any) -> None:
    service.start()
    try:
        check_cli_alongside(service, order, rows)
    finally:
        service.stop()


def check_cli_alongside(service: Any, order: dict[str, Any], rows: Any) -> None:
    db = service.where
    stop = threading.Event()
    accepted: list[int] = []

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            response = service.post({**order, "id": f"ord_{n}"})
            accepted.append(response.status_code)

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        time.sleep(0.5)
        for _ in range(5):
            listed = cli(str(db), "list", "--limit", "5")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.startswith("ID  ")
            done = json.loads(cli(str(db), "list", "--state", "done", "--json").stdout)
            shown = cli(str(db), "show", done[0]["id"])
            assert shown.returncode == 0, shown.stderr
            assert "  now: done" in shown.stdout
            assert "validate" in shown.stdout and "confirm" in shown.stdout
            pruned = cli(str(db), "prune", "0s", "--json")
            assert pruned.returncode == 0, pruned.stderr
            assert json.loads(pruned.stdout)["pruned"] >= 0
    finally:
        stop.set()
        feeder.join()
    assert accepted and set(accepted) == {202}
    # Pruning never touched an unfinished order: each accepted one finishes or is gone
    # because it had finished.
    deadline = time.monotonic() + 20
    while rows(db, "SELECT count(*) FROM workflows WHERE state NOT IN ('done')")[0][0]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_cli_gives_clear_errors_and_changes_nothing(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a journal")
    empty = tmp_path / "empty.db"
    empty.touch()
    journal = tmp_path / "j.db"

    async def make() -> None:
        async with Durable(journal):
            pass

    asyncio.run(make())
    before = journal.read_bytes()
    cases = [
        ((str(tmp_path / "missing.db"), "list"), 1, "no journal at"),
        ((str(text), "list"), 1, "not a durable.py journal"),
        ((str(journal), "show", "ghost"), 1, "no workflow has id 'ghost'"),
        ((str(journal), "cancel", "ghost"), 1, "no workflow has id 'ghost'"),
        ((str(journal), "retry", "ghost"), 1, "no workflow has id 'ghost'"),
        ((str(journal), "prune", "soon"), 2, "is not an age"),
        ((str(journal), "list", "--state", "odd"), 2, "invalid choice"),
        ((str(journal), "list", "--limit", "-1"), 2, "not a whole number"),
        ((str(empty), "list"), 1, "holds no journal yet"),
        ((str(empty), "show", "x"), 1, "holds no journal yet"),
    ]
    for args, code, message in cases:
        result = cli(*args)
        assert (result.returncode, result.stdout) == (code, ""), (args, result)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert text.read_text() == "not a journal"
    assert not (tmp_path / "missing.db").exists()
    assert journal.read_bytes() == before
    assert empty.stat().st_size == 0


def test_cli_output_cut_short_by_a_pipe_is_not_an_error(db: Path) -> None:
    dur = Durable(db)

    @dur.register
    def wf(ctx, n):
        yield ctx.run(str, n)

    async def fill() -> None:
        async with dur:
            for i in range(300):
                await dur.run(f"w{i}", wf, i)

    asyncio.run(fill())
    piped = subprocess.run(f"{sys.executable} {HERE / 'durable.py'} {db} list --limit 300 "
                           "| head -1", shell=True, capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("ID ")
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr
