"""Fixtures shared by the test files, so that no test file imports another.

- `db`, `rows`, `count`: a journal path in the test's folder, and reading any SQLite
  file from outside, as another process would.
- `fast`: a retry policy that tries three times without waiting.
- `lambda_free_workflow`: a one-step generator workflow around a function.
- `order`, `service`, `service_class`: the order service's example order, and
  `python app.py` on a free loopback port (`service` is stopped after the test).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from durable import RetryPolicy

HERE = Path(__file__).resolve().parent


# The journal, seen from outside.


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def _rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _count(db: Path, table: str) -> int:
    return int(_rows(db, f"SELECT count(*) FROM {table}")[0][0])


@pytest.fixture
def rows() -> Callable[..., list[Any]]:
    """rows(db, sql, params=()): the rows of one query, from a connection of its own."""
    return _rows


@pytest.fixture
def count() -> Callable[[Path, str], int]:
    """count(db, table): how many rows the table holds."""
    return _count


@pytest.fixture
def fast() -> RetryPolicy:
    """A retry policy trying three times, without waiting in between."""
    return RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


def _lambda_free_workflow(step: Any) -> Any:
    def wf(ctx):
        return (yield ctx.run(step))
    return wf


@pytest.fixture
def lambda_free_workflow() -> Callable[[Any], Any]:
    """lambda_free_workflow(step): a generator workflow running `step` as its one step."""
    return _lambda_free_workflow


# The order service.


_ORDER: dict[str, Any] = {
    "id": "ord_1001",
    "customer": {"id": "cus_alice", "email": "alice@example.com"},
    "items": [{"sku": "widget-pro", "qty": 2, "price": 2999},
              {"sku": "widget-cable", "qty": 1, "price": 999}],
}


@pytest.fixture
def order() -> dict[str, Any]:
    """The contract's example order (a fresh copy for each test)."""
    return copy.deepcopy(_ORDER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python app.py` on a free loopback port, with its files in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "app.py")]

    def start(self, *, may_die: bool = False, **env: str) -> Service:
        """Start, and wait until it answers; with may_die, its dying first (CRASH_AT
        on a resumed workflow) ends the wait too."""
        log = self.folder / f"server-{self.port}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.folder, stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                     "DURABLE_DB": "orders.db", **env},
            )
        deadline = time.monotonic() + 20
        while True:
            if may_die and self.proc.poll() is not None:
                return self
            assert self.proc.poll() is None, self.log()
            try:
                httpx.get(f"{self.url}/charges", timeout=1)
                return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_for_exit(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        kwargs.setdefault("timeout", 10)
        return httpx.post(f"{self.url}/orders", content=body, **kwargs)

    def status(self, order_id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/orders/{order_id}/status", timeout=10)

    def finished(self, order_id: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = dict(self.status(order_id).json())
            if body["status"] not in ("processing", "not_found"):
                return body
            assert time.monotonic() < deadline, (body, self.log())
            time.sleep(0.05)

    def charges(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/charges", timeout=10).json()["charges"])

    def stock(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.url}/inventory", timeout=10).json()["stock"])


@pytest.fixture(scope="session")
def service_class() -> type[Service]:
    """The Service class, for a test that starts several, subclasses it, or keeps one
    for a whole module; `service_class(folder)`, then `.start(**env)`, `.stop()`."""
    return Service


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A Service in the test's folder, not started yet; stopped after the test."""
    svc = Service(tmp_path)
    try:
        yield svc
    finally:
        svc.stop()
