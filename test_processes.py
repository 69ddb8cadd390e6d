"""Several real processes on one journal: racing, takeover after SIGKILL and SIGSTOP,
fencing, and the order service with several workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from durable import Durable

HERE = Path(__file__).resolve().parent

WORKER = textwrap.dedent("""
    import asyncio, json, logging, os, socket, sys, time

    if "MACHINE" in os.environ:  # as if on a machine of its own, sharing the journal
        socket.gethostname = lambda: os.environ["MACHINE"]
    if "CLOCK_AHEAD" in os.environ:  # the clock jumps forward (once CLOCK_FROM exists)
        real_time, ahead = time.time, float(os.environ["CLOCK_AHEAD"])
        jump = os.environ.get("CLOCK_FROM")
        time.time = lambda: real_time() + (ahead if not jump or os.path.exists(jump) else 0)

    from durable import Durable, RetryPolicy

    logging.basicConfig(level=logging.INFO)
    db, marks, role = sys.argv[1:4]
    dur = Durable(db, lease=float(os.environ.get("LEASE", "30")),
                  retry=RetryPolicy(max_attempts=5, initial_delay=0))

    def step(wf_id, name):
        fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{wf_id} {name} {os.getpid()}\\n".encode())
        os.close(fd)
        time.sleep(float(os.environ.get(f"HANG_{name.upper()}", "0")))
        return os.getpid()

    @dur.register(name="flow")
    def flow(ctx, n):
        one = yield ctx.run(step, ctx.id, "one")
        two = yield ctx.run(step, ctx.id, "two")
        three = yield ctx.run(step, ctx.id, "three")
        return [one, two, three]

    async def main():
        async with dur:
            if role == "race":
                while not os.path.exists(marks + ".go"):
                    await asyncio.sleep(0.005)
                ids = range(int(os.environ["COUNT"]))
                handles = await asyncio.gather(*(dur.run(f"wf-{i}", flow, i) for i in ids))
                results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
                print(json.dumps({"created": sum(h.created for h in handles),
                                  "results": results}))
            elif role == "start":
                handle = await dur.run("wf", flow, 0)
                print(json.dumps({"result": await handle.result(timeout=60)}))
            else:  # standby: holds nothing, waits for "wf" to be finished by anyone
                open(marks + ".ready", "w").close()  # open: it has looked once already
                print(json.dumps({"result": await (await dur.get("wf")).result(timeout=60)}))

    asyncio.run(main())
""")


class Workers:
    """Worker processes on one journal. One given MACHINE runs as if on a machine of
    that name: in a UTS namespace of its own where one can be made (conftest's
    `machine`), else with durable.py's view of the host name patched."""

    def __init__(self, tmp_path: Path, db: Any, machine: Any) -> None:
        self.machine = machine
        self.script = tmp_path / "worker.py"
        self.script.write_text(WORKER)
        self.db = db
        self.marks = tmp_path / "marks.txt"
        self.folder = tmp_path
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, role: str, **env: str) -> subprocess.Popen[str]:
        command = [sys.executable, str(self.script), str(self.db), str(self.marks), role]
        apart = self.machine(env.get("MACHINE"), command)
        if apart is not None:
            command = apart
            env.pop("MACHINE", None)
        proc = subprocess.Popen(
            command, env={**os.environ, "PYTHONPATH": str(HERE), **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.procs.append(proc)
        return proc

    def ran(self) -> list[tuple[str, str, int]]:
        if not self.marks.exists():
            return []
        return [(wf, step, int(pid)) for wf, step, pid in
                (line.split() for line in self.marks.read_text().splitlines())]

    def wait_for_mark(self, wanted: tuple[str, str], proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 30
        while wanted not in [(wf, step) for wf, step, _ in self.ran()]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)

    @staticmethod
    def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)

    @staticmethod
    def outcome(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        return dict(json.loads(out)), err

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_three_processes_racing_run_on_the_same_ids_run_each_step_once(
        tmp_path: Path, db: Any, machine: Any) -> None:
    workers = Workers(tmp_path, db, machine)
    try:
        procs = [workers.start("race", COUNT="100") for _ in range(3)]
        time.sleep(1.0)  # all three are open and waiting
        (tmp_path / "marks.txt.go").touch()
        outcomes = [workers.outcome(proc)[0] for proc in procs]
    finally:
        workers.kill_all()
    # Between them the processes created each workflow once...
    assert sum(o["created"] for o in outcomes) == 100
    # ...every process saw the same results, including for workflows run by another...
    assert outcomes[0]["results"] == outcomes[1]["results"] == outcomes[2]["results"]
    # ...and each step body ran exactly once per workflow.
    counts = Counter((wf, step) for wf, step, _ in workers.ran())
    assert len(counts) == 300 and set(counts.values()) == {1}


@pytest.mark.parametrize("machines", ["one machine", "two machines"])
def test_process_killed_mid_workflow_is_taken_over_by_a_survivor(
        tmp_path: Path, db: Any, machines: str, machine: Any) -> None:
    # On one machine the survivor sees the holder die, and takes over at once; on two,
    # it cannot see the holder, and takes over when the holder's lease runs out.
    apart = {"LEASE": "1.5"} if machines == "two machines" else {}
    workers = Workers(tmp_path, db, machine)
    try:
        holder = workers.start("start", HANG_TWO="60", **apart,
                               **({"MACHINE": "machine-a"} if apart else {}))
        workers.wait_for_mark(("wf", "two"), holder)
        survivor = workers.start("standby", **apart,
                                 **({"MACHINE": "machine-b"} if apart else {}))
        workers.wait_for_file(tmp_path / "marks.txt.ready", survivor)
        time.sleep(0.5)  # a look or two more
        assert len(workers.ran()) == 2  # the survivor leaves a live owner's work alone
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
        outcome, err = workers.outcome(survivor)
    finally:
        workers.kill_all()
    assert outcome["result"] == [holder.pid, survivor.pid, survivor.pid]
    assert [(step, pid) for _, step, pid in workers.ran()] == [
        ("one", holder.pid), ("two", holder.pid), ("two", survivor.pid),
        ("three", survivor.pid)]
    assert "took over 1 workflow(s)" in err


def test_paused_process_elsewhere_is_taken_over_after_its_lease_and_then_fenced(
        tmp_path: Path, db: Any, rows: Any, machine: Any) -> None:
    workers = Workers(tmp_path, db, machine)
    try:
        # On two machines: the survivor cannot see whether the holder lives, only its lease.
        holder = workers.start("start", LEASE="1.5", HANG_TWO="3", MACHINE="machine-a")
        workers.wait_for_mark(("wf", "two"), holder)
        holder.send_signal(signal.SIGSTOP)  # alive, but no longer renewing its lease
        survivor = workers.start("standby", LEASE="1.5", HANG_THREE="2", MACHINE="machine-b")
        workers.wait_for_mark(("wf", "three"), survivor)  # taken over, still running
        holder.send_signal(signal.SIGCONT)  # its step two returns now, too late
        late, err = workers.outcome(holder)
        outcome, _ = workers.outcome(survivor)
        assert outcome["result"] == [holder.pid, survivor.pid, survivor.pid]
    finally:
        workers.kill_all()
    # The paused process reads the survivor's outcome; it recorded nothing itself.
    assert late["result"] == outcome["result"]
    assert "is no longer held by this process" in err
    steps = rows(db, "SELECT seq, state, result FROM steps ORDER BY seq")
    # Exactly one result for step two: the survivor's, not the late one.
    assert steps == [(1, "done", str(holder.pid)), (2, "done", str(survivor.pid)),
                     (3, "done", str(survivor.pid))]
    assert [step for _, step, _ in workers.ran()] == ["one", "two", "two", "three"]


def test_a_live_process_on_this_machine_is_never_taken_over_when_the_clock_jumps_past_its_lease(
        tmp_path: Path, db: Any, machine: Any) -> None:
    workers = Workers(tmp_path, db, machine)
    try:
        holder = workers.start("start", LEASE="1.5", HANG_TWO="2")
        workers.wait_for_mark(("wf", "two"), holder)
        holder.send_signal(signal.SIGSTOP)  # alive, its lease left to run out
        # A neighbour whose clock is an hour ahead (NTP after a VM resumed) sees every
        # lease long expired, and looks every half second.
        neighbour = workers.start("standby", LEASE="1.5", CLOCK_AHEAD="3600")
        workers.wait_for_file(tmp_path / "marks.txt.ready", neighbour)
        time.sleep(2.5)
        # The holder is alive on this machine: its work is not taken, whatever the clocks.
        assert [step for _, step, _ in workers.ran()] == ["one", "two"]
        holder.send_signal(signal.SIGCONT)
        outcome, _ = workers.outcome(holder)
        seen, _ = workers.outcome(neighbour)
    finally:
        workers.kill_all()
    assert outcome["result"] == seen["result"] == [holder.pid] * 3
    assert [step for _, step, _ in workers.ran()] == ["one", "two", "three"]


def test_a_process_whose_clock_jumps_renews_its_lease_by_the_time_that_really_passed(
        tmp_path: Path, db: Any, rows: Any, machine: Any) -> None:
    workers = Workers(tmp_path, db, machine)
    try:
        holder = workers.start("start", LEASE="1.5", HANG_TWO="60", CLOCK_AHEAD="3600",
                               CLOCK_FROM=str(tmp_path / "jump"))
        workers.wait_for_mark(("wf", "two"), holder)
        (tmp_path / "jump").touch()  # its clock is an hour ahead from now on
        time.sleep(1.5)  # three renewals
        (expires,), = rows(db, "SELECT expires_at FROM owners")
    finally:
        workers.kill_all()
    # Renewed for the lease from now, not for an hour more than that.
    assert time.time() < expires < time.time() + 1.5 + 1


# The order service with several processes on one orders.db.


@pytest.fixture
def uvicorn_class(service_class: Any) -> Any:
    """The Service class, run as `uvicorn app:app --workers N` instead of `python app.py`."""

    class Uvicorn(service_class):
        def __init__(self, folder: Path, journal: Any, workers: int) -> None:
            super().__init__(folder, journal)
            self.workers = workers

        def command(self) -> list[str]:
            return [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", str(self.workers), "--app-dir",
                    str(HERE)]

    return Uvicorn


def storm(urls: list[str], body: dict[str, Any], count: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(
                client.post(f"{urls[i % len(urls)]}/orders", content=json.dumps(body),
                            headers={"connection": "close"})
                for i in range(count)))

    return asyncio.run(go())


def test_uvicorn_with_two_workers_on_one_journal_makes_one_workflow_and_one_charge(
        tmp_path: Path, db: Any, uvicorn_class: Any, order: Any) -> None:
    service = uvicorn_class(tmp_path, db, workers=2)
    try:
        service.start()
        responses = storm([service.url], order, 64)
        assert [r.status_code for r in responses] == [202] * 64
        assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
        assert service.finished("ord_1001")["status"] == "done"
        # Every worker answers with the same status, read from the shared journal.
        statuses = {service.status("ord_1001").text for _ in range(20)}
        assert len(statuses) == 1
        assert len(service.charges()) == 1
        log = service.log()
        assert log.count("Started server process") >= 2
        assert log.count("[charge] order ord_1001 - charged") == 1
    finally:
        service.stop()


def test_two_services_sharing_one_journal_make_one_workflow_and_one_charge(
        tmp_path: Path, db: Any, store: str, service_class: Any, order: Any) -> None:
    # On PostgreSQL, on two machines sharing the database's journal and ledger.
    apart = store == "postgres"
    one, two = (service_class(tmp_path, db, "machine-a" if apart else None),
                service_class(tmp_path, db, "machine-b" if apart else None))
    try:
        one.start()
        two.start()
        responses = storm([one.url, two.url], order, 32)
        assert [r.status_code for r in responses] == [202] * 32
        assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
        assert one.finished("ord_1001") == two.finished("ord_1001")
        assert one.finished("ord_1001")["status"] == "done"
        assert len(one.charges()) == 1
        assert (one.log() + two.log()).count("[validate] order ord_1001") == 1
    finally:
        one.stop()
        two.stop()


def test_cli_show_says_who_holds_a_stuck_workflow_and_whether_it_is_alive(
        tmp_path: Path, db: Any, machine: Any) -> None:
    workers = Workers(tmp_path, db, machine)

    def show() -> str:
        done = subprocess.run([sys.executable, str(HERE / "durable.py"), str(workers.db),
                               "show", "wf"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        holder = workers.start("start", HANG_TWO="60")
        workers.wait_for_mark(("wf", "two"), holder)
        alive = show()
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
        dead = show()
    finally:
        workers.kill_all()
    assert "  now: running step 2 'step', attempt 1" in alive
    assert f"  held by: pid {holder.pid} on " in alive and "lease renewed" in alive
    assert f"  held by: pid {holder.pid} on " in dead and "which has exited" in dead


CLOSER = textwrap.dedent("""
    import asyncio, sys, time
    from durable import Durable

    def slow():
        time.sleep(60)
        return "late"

    async def main():
        dur = Durable(sys.argv[1], lease=1.0)

        @dur.register(name="flow")
        def flow(ctx):
            return (yield ctx.run(slow))

        async with dur:
            await dur.run("wf", flow)
            await asyncio.sleep(0.3)  # its step is running
            await dur.close(grace=0.2)  # the step outlives the grace: held under the lease
        print("closed", flush=True)
        time.sleep(60)  # and the process lives on

    asyncio.run(main())
""")


def test_a_workflow_kept_by_a_closed_durable_of_a_live_process_is_taken_over_after_its_lease(
        tmp_path: Path, db: Any) -> None:
    # A live process on this machine is not taken over; one that closed its Durable
    # while a step thread ran on has said it is done with it: its lease decides.
    script = tmp_path / "closer.py"
    script.write_text(CLOSER)
    holder = subprocess.Popen([sys.executable, str(script), str(db)], text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "closed\n"
        time.sleep(1.2)  # its lease has run out; the process is alive

        async def main() -> Any:
            dur = Durable(db, lease=1.0)

            def slow() -> str:  # the same step, quick here
                return "here"

            @dur.register(name="flow")
            def flow(ctx: Any) -> Any:
                return (yield ctx.run(slow))

            async with dur:
                return await (await dur.get("wf")).result(timeout=10)

        assert holder.poll() is None
        assert asyncio.run(main()) == "here"
    finally:
        holder.kill()
        holder.communicate()
