"""bench.py --quick runs every scenario and prints every row (timings are never judged)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What each row's first cell says, whatever the sizes.
ROWS = [
    "1 floor: sequential 4-step, FULL",
    "2 sequential 4-step, FULL",
    "2 sequential 4-step, NORMAL",
    "concurrent 4-step, FULL",
    "concurrent 4-step, NORMAL",
    "4 HTTP POST /orders",
    ": open() -> all resumed",
    ": open() -> all done",
    "6 journal bytes per step",
    "6 RSS after",
    # The PostgreSQL rows: measured when a server answers, else saying it was skipped.
    "7 PostgreSQL sequential 4-step vs psycopg",
    "concurrent 4-step vs psycopg",
    "8 PostgreSQL sequential 4-step vs DBOS",  # DBOS itself never runs in --quick
    "concurrent 4-step vs DBOS",
    # ctx.receive and ctx.all, on SQLite and on PostgreSQL (or saying it was skipped).
    "in ctx.receive, SQLite: threads, RSS",
    "waiting, SQLite: send -> all done",
    "in ctx.receive, PostgreSQL: threads, RSS",
    "waiting, PostgreSQL: send -> all done",
    "sync steps, SQLite",
    "sync steps, PostgreSQL",
]


def test_quick_benchmark_prints_a_row_for_every_scenario_and_exits_zero() -> None:
    # A session of its own, so that a hang takes its servers and children down with it.
    proc = subprocess.Popen([sys.executable, str(HERE / "bench.py"), "--quick"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"bench.py --quick took over 90 s:\n{err}") from None
    assert proc.returncode == 0, err[-3000:]
    table = [line for line in out.splitlines() if line.startswith("| ")]
    scenarios = [line.split("|")[1].strip() for line in table[1:]]
    for row in ROWS:
        assert sum(row in scenario for scenario in scenarios) == 1, (row, out)
    assert len(scenarios) == len(ROWS), out
