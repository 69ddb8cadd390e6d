"""Recovery: which process holds a workflow, leases, and workflows resumed after
their process died, with real processes killed mid-step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import durable
from durable import Durable

HERE = Path(__file__).resolve().parent


# Recovery after a process dies.


def test_owner_liveness_uses_pid_and_process_start_time() -> None:
    host, pid = socket.gethostname(), os.getpid()
    me = f"{host}|{pid}|{durable._process_start(pid)}|n"
    assert not durable._owner_is_dead(me, host)
    # The same pid with another start time is a reused pid: the old owner is gone.
    assert durable._owner_is_dead(f"{host}|{pid}|{durable._place()}:12345|n", host)
    # The same host name on another kernel (a machine or VM given the same name) or in
    # another pid namespace (a container): its pids mean nothing here; the lease tells.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    for elsewhere in ("another-boot/4026531836", durable._place().split("/")[0] + "/1"):
        assert durable._liveness(f"{host}|{child.pid}|{elsewhere}:12345|n", host) is None
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


def _recovery_fixture(db: Path, rows: Any, owner: str | None,
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
    rows(db, "DELETE FROM steps WHERE seq = 2")
    rows(db, "UPDATE workflows SET state = 'running', result = NULL, finished_at = NULL, "
             "owner = ?", (owner,))
    if owner is not None and lease_left is not None:
        rows(db, "INSERT INTO owners (id, expires_at) VALUES (?, ?)",
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


def test_open_resumes_unfinished_workflows_of_a_dead_owner_at_once(db: Path, rows: Any) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    owner = f"{socket.gethostname()}|{child.pid}|{durable._process_start(os.getpid())}|x"
    dur, _, ran = _recovery_fixture(db, rows, owner)
    assert _resumes(dur)
    assert ran == ["two"]  # step one was replayed from the journal


def test_open_resumes_a_workflow_whose_owner_pid_was_reused(db: Path, rows: Any) -> None:
    dur, _, ran = _recovery_fixture(
        db, rows, f"{socket.gethostname()}|{os.getpid()}|{durable._place()}:1|x")
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_resumes_workflows_that_no_process_holds(db: Path, rows: Any) -> None:
    dur, _, ran = _recovery_fixture(db, rows, None)
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_leaves_workflows_of_a_live_owner_alone(db: Path, rows: Any) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = f"{socket.gethostname()}|{live.pid}|{durable._process_start(live.pid)}|x"
        dur, _, ran = _recovery_fixture(db, rows, owner)
        assert not _resumes(dur)
        assert ran == []
        assert rows(db, "SELECT owner FROM workflows") == [(owner,)]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("lease_left", [-1, None])
def test_open_takes_over_a_live_owner_whose_lease_ran_out(db: Path, rows: Any,
                                                          lease_left: float | None) -> None:
    # A process on another machine (or paused here) that stopped renewing its lease.
    dur, _, ran = _recovery_fixture(db, rows, "elsewhere|4242|1:1|x", lease_left)
    assert _resumes(dur)
    assert ran == ["two"]


def test_open_leaves_a_live_lease_of_another_machine_alone(db: Path, rows: Any) -> None:
    dur, _, ran = _recovery_fixture(db, rows, "elsewhere|4242|1:1|x", 60)
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
