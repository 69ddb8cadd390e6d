"""The README's walkthrough, run against a real server: its outputs cannot drift.

Each ```console block holds `$ command` lines followed by the command's output;
each ```log block holds lines the server must have logged by then. `make run`
(with environment settings before it) restarts the server; other commands (curl,
`python durable.py`) run in a shell in the server's folder. Charge ids, clock
times, durations and retry delays are compared as placeholders, and runs of spaces
as one. `python test_walkthrough.py` prints what each command prints now (the test,
run by pytest with WALKTHROUGH_PRINT=1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
MAKE_RUN = re.compile(r"((?:[A-Z_]+=\S+ )*)make run")
PLACEHOLDERS = [
    (re.compile(r"ch_[0-9a-f]{16}"), "ch_<id>"),
    (re.compile(r"^\d\d:\d\d:\d\d ", re.MULTILINE), ""),
    (re.compile(r"retrying in \d+\.\d+s"), "retrying in <delay>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"), "<time>"),
    (re.compile(r"[+]?\d+\.\d{3}s"), "<duration>"),
    (re.compile(r" {2,}"), " "),
]


@dataclass
class Step:
    kind: str  # "run" (restart the server), "shell" or "log"
    text: str  # the command, or the log lines
    expected: str


def steps() -> list[Step]:
    readme = (HERE / "README.md").read_text()
    found: list[Step] = []
    for kind, body in re.findall(r"```(console|log)\n(.*?)```", readme, re.DOTALL):
        if kind == "log":
            found.append(Step("log", body, body))
            continue
        for chunk in re.split(r"^\$ ", body, flags=re.MULTILINE)[1:]:
            command, _, output = chunk.partition("\n")
            found.append(Step("run" if MAKE_RUN.fullmatch(command) else "shell", command,
                              output))
    return found


def normal(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r", "").splitlines()
             if not line.lower().startswith("date:")]
    text = "\n".join(lines).strip()
    for pattern, placeholder in PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    return text


class Walk:
    def __init__(self, service: Any) -> None:
        self.service = service  # not started yet
        self.crashing = False

    def restart(self, command: str) -> None:
        match = MAKE_RUN.fullmatch(command)
        assert match
        env = dict(pair.split("=", 1) for pair in match.group(1).split())
        if self.crashing:
            self.service.wait_for_exit()  # it exits by itself (CRASH_AT)
        self.service.stop()
        self.service.start(**env)
        self.crashing = "CRASH_AT" in env

    def shell(self, command: str) -> str:
        command = command.replace("localhost:8000", f"127.0.0.1:{self.service.port}")
        command = command.replace("python durable.py", f"{sys.executable} {HERE / 'durable.py'}")
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                cwd=self.service.folder, timeout=30)
        return result.stdout + result.stderr

    def current_log(self) -> str:
        return self.service.logs[-1].read_text(errors="replace")

    def check(self, step: Step, patience: float = 10) -> str:
        """Run `step` and return its output; a GET or a log check is retried until it
        matches, since the workflow finishes in the background."""
        deadline = time.monotonic() + patience
        while True:
            if step.kind == "log":
                logged = normal(self.current_log()).splitlines()
                wanted = normal(step.expected).splitlines()
                it = iter(logged)
                if all(line in it for line in wanted):  # in this order
                    return step.expected
                actual = self.current_log()
            else:
                actual = self.shell(step.text)
                if " -d " in step.text or " retry " in step.text \
                        or normal(actual) == normal(step.expected):
                    return actual
            if time.monotonic() > deadline:
                return actual
            time.sleep(0.1)


@pytest.mark.sqlite_only
def test_readme_walkthrough_outputs_match_a_real_server(service: Any) -> None:
    walk = Walk(service)
    if os.environ.get("WALKTHROUGH_PRINT"):
        show(walk)
        return
    all_steps = steps()
    assert sum(s.kind == "shell" for s in all_steps) >= 12
    try:
        for step in all_steps:
            if step.kind == "run":
                walk.restart(step.text)
                continue
            actual = walk.check(step)
            assert normal(actual) == normal(step.expected), (
                f"README step {step.text[:80]!r} printed:\n{actual}")
    finally:
        walk.service.stop()


def show(walk: Walk) -> None:
    """Print what each of the README's commands prints now, and what the server logs."""
    try:
        for step in steps():
            if step.kind == "run":
                walk.restart(step.text)
                print(f"$ {step.text}")
            elif step.kind == "shell":
                print(f"$ {step.text}\n{walk.check(step).rstrip()}")
            else:
                time.sleep(0.5)
                ours = re.findall(r"^\d\d:\d\d:\d\d .*$", walk.current_log(), re.MULTILINE)
                print("--- the server has logged:\n" + "\n".join(ours))
    finally:
        walk.service.stop()


if __name__ == "__main__":
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q",
                             "-s", "-p", "no:cacheprovider"], cwd=HERE,
                            env={**os.environ, "WALKTHROUGH_PRINT": "1"}).returncode)
