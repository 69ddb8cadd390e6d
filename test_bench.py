"""bench.py --quick runs every scenario and prints every row (timings are never judged)."""

from __future__ import annotations

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
]


def test_quick_benchmark_prints_a_row_for_every_scenario_and_exits_zero() -> None:
    run = subprocess.run([sys.executable, str(HERE / "bench.py"), "--quick"], cwd=HERE,
                         capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    scenarios = [line.split("|")[1].strip() for line in table[1:]]
    for row in ROWS:
        assert sum(row in scenario for scenario in scenarios) == 1, (row, run.stdout)
    assert len(scenarios) == len(ROWS), run.stdout
