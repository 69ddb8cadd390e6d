"""Several real processes opening one new journal at the same moment: each of them
opens it (none is refused as "not a durable.py journal" or "database is locked"), and
the file ends up one journal in WAL mode with the current schema."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import durable

HERE = Path(__file__).resolve().parent
PROCESSES = 4
ROUNDS = 40

# Reads one journal path a line from stdin, opens it (as a service does: `async with`),
# and answers one line: "ok", or the error. The parent writes the same path to every
# worker back to back, so that they all open it at the same moment.
OPENER = textwrap.dedent("""
    import asyncio, sys
    from durable import Durable

    async def open_once(path):
        async with Durable(path):
            pass

    for line in sys.stdin:
        path = line.rstrip("\\n")
        try:
            asyncio.run(open_once(path))
            answer = "ok"
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}".replace(path, "<journal>")
        sys.stdout.write(answer + "\\n")
        sys.stdout.flush()
""")


def assert_is_a_journal(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        version = len(durable._SqliteJournal.MIGRATIONS)
        assert conn.execute("PRAGMA user_version").fetchone() == (version,)
        assert conn.execute("PRAGMA application_id").fetchone() == (durable._APPLICATION_ID,)
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"workflows", "steps", "owners", "messages"}
    conn.close()


@pytest.mark.parametrize("fresh", ["missing", "zero-length"])
def test_four_processes_opening_one_new_journal_at_once_all_open_it(
        tmp_path: Path, fresh: str) -> None:
    script = tmp_path / "opener.py"
    script.write_text(OPENER)
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=HERE, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(HERE)})
             for _ in range(PROCESSES)]
    refusals: list[tuple[int, str]] = []
    try:
        for n in range(ROUNDS):
            path = tmp_path / f"journal-{n}.db"
            if fresh == "zero-length":
                path.touch()
            for proc in procs:  # back to back: released together
                assert proc.stdin is not None
                proc.stdin.write(f"{path}\n")
                proc.stdin.flush()
            for proc in procs:
                assert proc.stdout is not None
                answer = proc.stdout.readline().rstrip("\n")
                if answer != "ok":
                    refusals.append((n, answer))
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
    # Every open of every round worked (a refused round lists what it was told).
    assert refusals == [], (f"{len({n for n, _ in refusals})} of {ROUNDS} rounds had a "
                            f"refusal", Counter(answer for _, answer in refusals))
    for n in range(ROUNDS):
        assert_is_a_journal(tmp_path / f"journal-{n}.db")


# The order service under `uvicorn --workers 4` on a journal that does not exist yet.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Uvicorn:
    """`uvicorn app:app --workers N` on a free loopback port, its files in one folder."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.folder = folder
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = folder / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        """Start, and wait until every worker has finished its startup."""
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers),
                 "--app-dir", str(HERE)],
                cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "DURABLE_DB": "orders.db", **env})
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            log = self.log()
            if "Application startup failed" in log:
                return  # the test says which worker, and why
            if log.count("Application startup complete") >= self.workers:
                return
            assert time.monotonic() < deadline, log
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]",
                                               self.log())}


def accepting_pids(journal: Path) -> set[int]:
    """The processes that accepted an order: a workflow's owner is 'host|pid|...'."""
    with sqlite3.connect(journal) as conn:
        owners = [owner for (owner,) in conn.execute("SELECT owner FROM workflows")]
    conn.close()
    return {int(owner.split("|")[1]) for owner in owners if owner}


# A round is a fresh uvicorn on a fresh journal (about 1.5 s). The workers start a little
# apart, so the unfixed open refused one of them in only about 1 round in 13 (6 of 80):
# these rounds catch it in about 3 runs out of 5. The test above is the reliable one.
UVICORN_ROUNDS = 12


def test_uvicorn_with_four_workers_on_a_new_journal_starts_them_all_and_each_takes_orders(
        tmp_path: Path) -> None:
    for n in range(UVICORN_ROUNDS):
        folder = tmp_path / f"round-{n}"
        folder.mkdir()
        # The providers' file is made beforehand: the race under test is the journal's.
        providers = folder / "providers.db"
        with sqlite3.connect(providers) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        service = Uvicorn(folder, workers=PROCESSES)
        try:
            service.start(PROVIDERS_DB=str(providers))
            log = service.log()
            assert "Application startup failed" not in log, (f"round {n}", log)
            assert log.count("Application startup complete") == PROCESSES, log
            workers = service.worker_pids()
            assert len(workers) == PROCESSES, log
            # Orders until every worker has accepted one (the kernel hands each new
            # connection to one of them; connection: close makes each order a new one).
            deadline = time.monotonic() + 15
            sent = 0
            with httpx.Client(timeout=10) as client:
                while (accepted := accepting_pids(folder / "orders.db")) != workers:
                    assert time.monotonic() < deadline, (accepted, workers, service.log())
                    body = {"id": f"ord_{sent}",
                            "customer": {"id": "cus_alice", "email": "alice@example.com"},
                            "items": [{"sku": "widget-pro", "qty": 1, "price": 2999}]}
                    sent += 1
                    response = client.post(f"{service.url}/orders", content=json.dumps(body),
                                           headers={"connection": "close"})
                    assert response.status_code == 202, (response.text, service.log())
            # No worker died and came back (uvicorn restarts a dead worker).
            assert service.worker_pids() == workers, service.log()
        finally:
            service.stop()
