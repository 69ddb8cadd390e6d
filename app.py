"""The order service: durable.py behind a Starlette endpoint.

POST /orders answers 202 at once and runs validate -> reserve -> charge -> confirm
as a durable workflow. Kill the process at any moment: the next start finishes the
order, and the customer is charged once, because every outside call carries a key
derived from the order id.

    python app.py                    # 127.0.0.1:8000 (HOST, PORT), journal orders.db (DURABLE_DB)
    DURABLE_DB=postgresql://... python app.py   # journal and fake providers in PostgreSQL
    MAX_RUNNING=32 python app.py     # orders processed at once (default 8; the rest wait)
    DURABLE_LEASE=10 python app.py   # seconds before another machine takes orders over (30)
    FLAKY=reserve python app.py      # reserve fails once per order, then succeeds on retry
    CRASH_AT=charge python app.py    # dies inside charge, after charging, before the checkpoint
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from durable import (
    Durable,
    IdempotencyConflict,
    InvalidInput,
    JournalError,
    NotFound,
    Permanent,
    ReceiveTimeout,
    Status,
    StepFailed,
    UnreadableRecord,
)

HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
DURABLE_DB = os.environ.get("DURABLE_DB", "orders.db")
ON_POSTGRES = DURABLE_DB.startswith(("postgresql://", "postgres://"))
# The fake providers keep their own file, as real ones keep their own systems; on
# PostgreSQL, their tables in the journal's database: services on several machines
# then share one ledger, as they would share one payment provider.
PROVIDERS_DB = os.environ.get("PROVIDERS_DB", DURABLE_DB if ON_POSTGRES
                              else os.path.splitext(DURABLE_DB)[0] + "-providers.db")
FLAKY = os.environ.get("FLAKY", "")
CRASH_AT = os.environ.get("CRASH_AT", "")
# Orders processed at once; the others wait their turn in the journal, already
# accepted. Kept low so that a burst of orders does not crowd out the endpoint itself.
MAX_RUNNING = int(os.environ.get("MAX_RUNNING", "8"))
# Seconds a service holds its orders without renewing; another machine takes them over
# when it runs out (on this machine, a dead service's orders are taken at once).
LEASE = float(os.environ.get("DURABLE_LEASE", "30"))
# Seconds a refund waits for a person's decision before it ends declined (a day).
REFUND_DECISION_TIMEOUT = float(os.environ.get("REFUND_DECISION_TIMEOUT", "86400"))
# Test-only: the payment provider ignores idempotency keys, to show what they prevent.
PAYMENT_KEYS = os.environ.get("PAYMENT_KEYS", "on") != "off"

MAX_BODY = 64 * 1024
DECLINED_CUSTOMER = "cus_declined"  # the fake card network declines this customer
STOCK = {"widget-pro": 1_000_000, "widget-cable": 1_000_000, "widget-limited": 3}

log = logging.getLogger("orders")


# FAKE PROVIDERS: inventory, payments and email, each honouring idempotency keys.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT PRIMARY KEY, order_id TEXT NOT NULL, items TEXT NOT NULL,
    released INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    key TEXT PRIMARY KEY, charge_id TEXT NOT NULL, order_id TEXT NOT NULL,
    amount INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (
    key TEXT PRIMARY KEY, charge_id TEXT NOT NULL, order_id TEXT NOT NULL,
    amount INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY, order_id TEXT NOT NULL, recipient TEXT NOT NULL,
    subject TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL);
"""
_LEDGER_LOCK = 0x4C656467  # PostgreSQL: writers to the providers' tables take turns


class UnknownSku(Permanent):
    pass


class OutOfStock(Permanent):
    pass


class CardDeclined(Permanent):
    pass


class KeyReused(Permanent):
    """A provider refuses a key it saw with another request (as real payment providers
    do): an order id used again after `prune` does not take over the old order's
    reservation or charge."""


class FlakyNetwork(ConnectionError):
    """The transient failure FLAKY injects: retried, unlike the Permanent errors."""


_local = threading.local()  # one connection per step thread, kept
_write_lock = threading.Lock()  # writers queue here, not in SQLite's sleeping busy handler


class PostgresLedger:
    """The providers' connection on PostgreSQL, taking the statements as written for
    SQLite (? parameters; both accept ON CONFLICT DO NOTHING)."""

    def __init__(self, url: str) -> None:
        import psycopg
        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, params: Any = None) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Any) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), list(rows))

    def begin(self, write: bool) -> None:
        self.conn.execute("BEGIN")
        if write:  # one writer at a time, on every machine, as BEGIN IMMEDIATE is on SQLite
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LEDGER_LOCK,))


@contextlib.contextmanager
def providers(*, write: bool = True) -> Iterator[Any]:
    """One transaction on the providers' file; a write takes the lock up front.

    The fake providers stand in for outside systems, which keep their data on their
    own machines: NORMAL survives a crash of this process (what the demos and tests
    kill), without an fsync of this machine's disk per charge or email."""
    conn = getattr(_local, "conn", None)
    if conn is None and ON_POSTGRES:
        conn = _local.conn = PostgresLedger(PROVIDERS_DB)
    elif conn is None:
        conn = _local.conn = sqlite3.connect(PROVIDERS_DB, timeout=30, isolation_level=None)
        conn.execute("PRAGMA synchronous = NORMAL")
    with _write_lock if write else contextlib.nullcontext():
        if ON_POSTGRES:
            conn.begin(write)
        else:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def setup_providers() -> None:
    if ON_POSTGRES:
        with providers() as conn:  # under the ledger's lock: workers starting at once
            # The URL's search_path may name a schema durable.py has not made yet.
            conn.execute("""DO $$ BEGIN
                IF current_schema() IS NULL THEN
                    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', (parse_ident(
                        btrim(split_part(current_setting('search_path'), ',', 1))))[1]);
                END IF; END $$""")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.executemany("INSERT INTO stock (sku, available) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING", STOCK.items())
        return
    with contextlib.closing(sqlite3.connect(PROVIDERS_DB, timeout=30)) as conn:
        # Workers of `uvicorn --workers N` start together: switching a new file to WAL
        # is refused at once (not after the busy timeout) while another one holds it.
        for pause in (0.01 * 2 ** n for n in range(10)):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                time.sleep(pause)
        conn.executescript(_SCHEMA)
    with providers() as conn:
        conn.executemany("INSERT INTO stock (sku, available) VALUES (?, ?) "
                         "ON CONFLICT DO NOTHING", STOCK.items())


# STEPS: plain functions; durable.py runs them in worker threads.

_flaked: set[tuple[str, str]] = set()
_flaked_lock = threading.Lock()


def demo_switches(step: str, order_id: str) -> None:
    """FLAKY: fail the step's first attempt in this process (before its effect)."""
    if step == FLAKY:
        with _flaked_lock:
            first = (step, order_id) not in _flaked
            _flaked.add((step, order_id))
        if first:
            log.info("[%s] order %s - FLAKY: failing this attempt", step, order_id)
            raise FlakyNetwork(f"{step} provider timed out (FLAKY={step})")


def crash_point(step: str, order_id: str) -> None:
    """CRASH_AT: exit hard after the step's outside effect, before its checkpoint."""
    if step == CRASH_AT:
        log.info("[%s] order %s - CRASH_AT: exiting hard before the checkpoint", step, order_id)
        logging.shutdown()
        os._exit(3)


def dollars(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def validate(order: dict[str, Any]) -> int:
    demo_switches("validate", order["id"])
    with providers(write=False) as conn:
        known = {sku for sku, in conn.execute("SELECT sku FROM stock")}
    for item in order["items"]:
        if item["sku"] not in known:
            raise UnknownSku(f"unknown SKU {item['sku']!r}")
    total = sum(item["qty"] * item["price"] for item in order["items"])
    log.info("[validate] order %s - %d item(s), total %s", order["id"], len(order["items"]),
             dollars(total))
    crash_point("validate", order["id"])
    return total


def reserve(order: dict[str, Any], key: str) -> str:
    demo_switches("reserve", order["id"])
    with providers() as conn:
        again = conn.execute("SELECT items FROM reservations WHERE key = ?", (key,)).fetchone()
        if again and json.loads(again[0]) != order["items"]:
            raise KeyReused(f"key {key} was used for a reservation of other items; use a new "
                            "order id")
        if not again:
            for item in order["items"]:
                left = conn.execute("UPDATE stock SET available = available - ? "
                                    "WHERE sku = ? AND available >= ?",
                                    (item["qty"], item["sku"], item["qty"])).rowcount
                if not left:
                    raise OutOfStock(f"not enough stock of {item['sku']!r} for {item['qty']}")
            conn.execute("INSERT INTO reservations (key, order_id, items, created_at) "
                         "VALUES (?, ?, ?, ?)",
                         (key, order["id"], json.dumps(order["items"]), time.time()))
    units = sum(item["qty"] for item in order["items"])
    log.info("[reserve] order %s - %d unit(s) %s", order["id"], units,
             "already reserved" if again else "reserved")
    crash_point("reserve", order["id"])
    return key


def release(order_id: str, key: str) -> bool:
    with providers() as conn:
        row = conn.execute("SELECT items FROM reservations WHERE key = ? AND released = 0",
                           (key,)).fetchone()
        if row:
            for item in json.loads(row[0]):
                conn.execute("UPDATE stock SET available = available + ? WHERE sku = ?",
                             (item["qty"], item["sku"]))
            conn.execute("UPDATE reservations SET released = 1 WHERE key = ?", (key,))
    log.info("[release] order %s - %s", order_id,
             "reserved stock released" if row else "nothing left to release")
    return True


def charge(order: dict[str, Any], amount: int, key: str) -> str:
    demo_switches("charge", order["id"])
    if order["customer"]["id"] == DECLINED_CUSTOMER:
        raise CardDeclined(f"card of customer {DECLINED_CUSTOMER} was declined")
    if not PAYMENT_KEYS:
        key = f"{key}/{secrets.token_hex(4)}"  # what a provider without keys amounts to
    with providers() as conn:
        row = conn.execute("SELECT charge_id, amount FROM charges WHERE key = ?",
                           (key,)).fetchone()
        if row and row[1] != amount:
            raise KeyReused(f"key {key} was used for a charge of {dollars(row[1])}, not "
                            f"{dollars(amount)}; use a new order id")
        if row:
            charge_id, what = row[0], "already charged"
        else:
            charge_id, what = f"ch_{secrets.token_hex(8)}", "charged"
            conn.execute("INSERT INTO charges (key, charge_id, order_id, amount, created_at) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (key, charge_id, order["id"], amount, time.time()))
    log.info("[charge] order %s - %s %s (%s, key %s)", order["id"], what, dollars(amount),
             charge_id, key)
    crash_point("charge", order["id"])
    return charge_id


def refund(order_id: str, key: str, amount: int) -> bool:
    """Refund the charge of `amount` made under `key`, if there is one and it is not
    refunded yet."""
    with providers() as conn:
        row = conn.execute("SELECT charge_id, amount FROM charges WHERE key = ?",
                           (key,)).fetchone()
        if row is None or row[1] != amount:
            what = f"nothing was charged under key {key}"
        elif conn.execute("SELECT 1 FROM refunds WHERE key = ?", (key,)).fetchone():
            what = f"already refunded {dollars(row[1])} ({row[0]})"
        else:
            conn.execute("INSERT INTO refunds (key, charge_id, order_id, amount, created_at) "
                         "VALUES (?, ?, ?, ?, ?)", (key, row[0], order_id, row[1], time.time()))
            what = f"refunded {dollars(row[1])} ({row[0]})"
    log.info("[refund] order %s - %s", order_id, what)
    return row is not None and row[1] == amount


def email_sent(order_id: str, key: str) -> bool:
    """Whether the confirmation under `key` went out (asked of the email provider)."""
    with providers(write=False) as conn:
        sent = conn.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone()
    log.info("[email_sent] order %s - the confirmation %s", order_id,
             "went out" if sent else "did not go out")
    return sent is not None


def notify_refund(order_id: str, amount: int, key: str) -> bool:
    """Email the customer of `order_id` that `amount` was refunded (once per key)."""
    with providers() as conn:
        row = conn.execute("SELECT recipient FROM outbox WHERE order_id = ? AND key = ?",
                           (order_id, f"{order_id}/confirm")).fetchone()
        sent = row is not None and conn.execute(
            "INSERT INTO outbox (key, order_id, recipient, subject, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key, order_id, row[0], f"Order {order_id}: {dollars(amount)} refunded",
             time.time())).rowcount
    log.info("[notify_refund] order %s - %s", order_id,
             f"refund notice sent to {row[0]}" if sent else
             "refund notice already sent" if row else "no address on file")
    return row is not None


def confirm(order: dict[str, Any], amount: int, charge_id: str, key: str) -> bool:
    demo_switches("confirm", order["id"])
    email = order["customer"]["email"]
    with providers() as conn:
        sent = conn.execute("INSERT INTO outbox (key, order_id, recipient, subject, "
                            "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            (key, order["id"], email,
                             f"Order {order['id']}: {dollars(amount)} charged ({charge_id})",
                             time.time())).rowcount
    log.info("[confirm] order %s - confirmation %s to %s", order["id"],
             "sent" if sent else "already sent", email)
    crash_point("confirm", order["id"])
    return True


# THE WORKFLOW.

dur = Durable(DURABLE_DB, max_running=MAX_RUNNING, lease=LEASE)


# A step that fails for good for any other reason (out of attempts because its process
# died in it every time, say) may have had its effect first: the compensation undoes
# whatever its key did, and does nothing if it did nothing.
_NOTHING_RESERVED = {OutOfStock.__name__, KeyReused.__name__}
_NOTHING_CHARGED = {CardDeclined.__name__, KeyReused.__name__}


@dur.register
def process_order(ctx, order):
    total = yield ctx.run(validate, order)
    try:
        reservation = yield ctx.run(reserve, order, f"{ctx.id}/reserve")
    except StepFailed as failed:
        if failed.error_type not in _NOTHING_RESERVED:
            yield ctx.run(release, order["id"], f"{ctx.id}/reserve")
        raise
    try:
        charge_id = yield ctx.run(charge, order, total, f"{ctx.id}/charge")
    except StepFailed as failed:
        yield ctx.run(release, order["id"], reservation)  # compensate, then fail the order
        if failed.error_type not in _NOTHING_CHARGED:
            yield ctx.run(refund, order["id"], f"{ctx.id}/charge", total)
        raise
    try:
        yield ctx.run(confirm, order, total, charge_id, f"{ctx.id}/confirm")
        sent = True
    except StepFailed:  # a paid order stays paid: did the email go out before it failed?
        sent = yield ctx.run(email_sent, order["id"], f"{ctx.id}/confirm")
    return {"orderId": order["id"], "inventoryReserved": True, "paymentCharged": True,
            "confirmationSent": sent, "total": total, "chargeId": charge_id}


# A refund waits for a person's decision (POST /orders/{id}/refund/decision), then
# refunds the card and tells the customer at once, each by its own key.
@dur.register
def refund_order(ctx, order_id, amount):
    try:
        decision = yield ctx.receive("decision", timeout=REFUND_DECISION_TIMEOUT)
    except ReceiveTimeout:
        return {"orderId": order_id, "refunded": False,
                "reason": f"no decision within {REFUND_DECISION_TIMEOUT:g}s"}
    if not decision["approved"]:
        return {"orderId": order_id, "refunded": False, "reason": decision.get("reason", "")}
    refunded, notified = yield ctx.all(
        ctx.run(refund, order_id, f"{order_id}/charge", amount),
        ctx.run(notify_refund, order_id, amount, f"{ctx.id}/notify"))
    return {"orderId": order_id, "refunded": refunded, "customerNotified": notified,
            "amount": amount}


# VALIDATION AT THE DOOR.

# Not "." or "..": clients would resolve them out of the status URL.
_ORDER_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _text(value: Any, field: str, pattern: re.Pattern[str] | None = None,
          limit: int = 64) -> str | None:
    if not isinstance(value, str):
        return f"field '{field}' must be a string"
    if not value or len(value) > limit:
        return f"field '{field}' must be 1-{limit} characters"
    if pattern is not None and not pattern.fullmatch(value):
        return f"field '{field}' is not valid"
    return None


def _count(value: Any, field: str, low: int) -> str | None:
    # JSON true/false are not numbers here, nor are 2.0 or 1e3.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"field '{field}' must be an integer"
    if not low <= value <= 1_000_000_000:
        return f"field '{field}' must be between {low} and 1000000000"
    return None


def validate_order(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The order, or the message of a 400 naming what is wrong."""
    try:
        order = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, "body is not valid JSON"
    except RecursionError:  # [[[[...]]]] past the interpreter's depth
        return None, "body is nested too deeply"
    if not isinstance(order, dict):
        return None, "body must be a JSON object"
    try:
        json.dumps(order, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
        return None, "body holds text that is not valid Unicode"
    except RecursionError:
        return None, "body is nested too deeply"
    for field in ("id", "customer", "items"):
        if field not in order:
            return None, f"field '{field}' is missing"
    if extra := sorted(set(order) - {"id", "customer", "items"}):
        return None, f"field '{extra[0]}' is not allowed"
    if error := _text(order["id"], "id", _ORDER_ID):
        return None, error + " (1-64 letters, digits, '_', '-', '.'; not '.' or '..')"
    customer = order["customer"]
    if not isinstance(customer, dict):
        return None, "field 'customer' must be an object"
    for field in ("id", "email"):
        if field not in customer:
            return None, f"field 'customer.{field}' is missing"
    if extra := sorted(set(customer) - {"id", "email"}):
        return None, f"field 'customer.{extra[0]}' is not allowed"
    if error := (_text(customer["id"], "customer.id")
                 or _text(customer["email"], "customer.email", _EMAIL, 254)):
        return None, error
    items = order["items"]
    if not isinstance(items, list) or not 1 <= len(items) <= 100:
        return None, "field 'items' must be a list of 1-100 items"
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            return None, f"field '{where}' must be an object"
        for field in ("sku", "qty", "price"):
            if field not in item:
                return None, f"field '{where}.{field}' is missing"
        if extra := sorted(set(item) - {"sku", "qty", "price"}):
            return None, f"field '{where}.{extra[0]}' is not allowed"
        if error := (_text(item["sku"], f"{where}.sku") or _count(item["qty"], f"{where}.qty", 1)
                     or _count(item["price"], f"{where}.price", 0)):
            return None, error
    return order, None


# ENDPOINTS.


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY (without reading past the limit)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


async def create_order(request: Request) -> JSONResponse:
    try:
        body = await read_body(request)
    except ClientDisconnect:  # nobody is left to answer, and nothing was written
        log.info("a client disconnected before its order's body arrived")
        return error(400, "the client disconnected before the body arrived")
    if body is None:
        return error(413, f"body is over {MAX_BODY // 1024} KiB")
    order, problem = validate_order(body)
    if order is None:
        return error(400, problem or "invalid order")
    try:
        handle = await dur.run(order["id"], process_order, order)
    except IdempotencyConflict:
        return error(422, f"order {order['id']!r} already exists with a different body; "
                          "use a new id")
    headers = {} if handle.created else {"Idempotent-Replayed": "true"}
    return JSONResponse({"status": "accepted", "orderId": order["id"],
                         "statusUrl": f"/orders/{order['id']}/status"},
                        status_code=202, headers=headers)


async def order_status(request: Request) -> JSONResponse:
    order_id = request.path_params["order_id"]
    try:
        status = await (await dur.get(order_id)).status()
        return status_answer(status)  # rendering the body recurses into the result too
    except (NotFound, InvalidInput):  # no such id, or one that no order can have
        return JSONResponse({"status": "not_found"}, status_code=404)
    except (UnreadableRecord, RecursionError) as exc:
        # The journal holds a value that cannot be read (or rendered) for this order:
        # 500, since the request is fine and the fault is in our own record of it; not
        # the 503 (with Retry-After) of an unavailable journal, since retrying cannot
        # help: the next read fails the same way. Other orders are unaffected.
        why = str(exc) if isinstance(exc, UnreadableRecord) else \
            "the journal holds a value nested too deeply to read for it"
        log.error("order %r cannot be shown: %s", order_id, why)
        return error(500, f"order {order_id!r} cannot be shown: {why}")


async def start_refund(request: Request) -> JSONResponse:
    order_id = request.path_params["order_id"]
    try:
        order = await (await dur.get(order_id)).status()
    except (NotFound, InvalidInput):
        return error(404, f"no order has id {order_id!r}")
    if order.state != "done" or not isinstance(order.result, dict):
        return error(409, f"order {order_id!r} is {order.state}; only a paid order can be "
                          "refunded")
    handle = await dur.run(f"refund/{order_id}", refund_order, order_id,
                           order.result["total"])
    headers = {} if handle.created else {"Idempotent-Replayed": "true"}
    return JSONResponse({"status": "accepted", "refundId": handle.id,
                         "statusUrl": f"/orders/{order_id}/refund/status",
                         "decisionUrl": f"/orders/{order_id}/refund/decision"},
                        status_code=202, headers=headers)


def validate_decision(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        decision = json.loads(body)
    except (ValueError, RecursionError):
        return None, "body is not JSON"
    if not isinstance(decision, dict) or not isinstance(decision.get("approved"), bool):
        return None, 'a decision is {"approved": true} or {"approved": false, "reason": "..."}'
    if set(decision) - {"approved", "reason"}:
        extra = ", ".join(sorted(set(decision) - {"approved", "reason"}))
        return None, f"unknown field(s): {extra}"
    reason = decision.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        return None, "field 'reason' must be a string of at most 500 characters"
    try:
        reason.encode()
    except UnicodeEncodeError:
        return None, "field 'reason' must be valid Unicode"
    return decision, None


async def refund_decision(request: Request) -> JSONResponse:
    order_id = request.path_params["order_id"]
    if not _ORDER_ID.fullmatch(order_id):
        return error(404, f"no refund is pending for order {order_id!r}")
    try:
        body = await read_body(request)
    except ClientDisconnect:
        return error(400, "the client disconnected before the body arrived")
    if body is None:
        return error(413, f"body is over {MAX_BODY // 1024} KiB")
    decision, problem = validate_decision(body)
    if decision is None:
        return error(400, problem or "invalid decision")
    refund_id = f"refund/{order_id}"
    try:
        sent = await dur.send(refund_id, "decision", decision)
    except NotFound:
        return error(404, f"no refund is pending for order {order_id!r}")
    except InvalidInput:  # the refund has ended: its decision sent again, or too late
        recorded = await recorded_decision(refund_id)
        if recorded == decision:
            sent = False
        elif recorded is None:
            return error(409, f"the refund of order {order_id!r} has ended without a decision")
        else:
            return JSONResponse({"error": "another decision is recorded for this refund",
                                 "decision": recorded}, status_code=409)
    except IdempotencyConflict:
        return JSONResponse({"error": "another decision is recorded for this refund",
                             "decision": await recorded_decision(refund_id)}, status_code=409)
    headers = {} if sent else {"Idempotent-Replayed": "true"}
    return JSONResponse({"status": "recorded",
                         "statusUrl": f"/orders/{order_id}/refund/status"},
                        status_code=202, headers=headers)


async def recorded_decision(refund_id: str) -> Any:
    """The decision the refund received, as journaled (None: none yet, or it timed out)."""
    try:
        status = await (await dur.get(refund_id)).status()
    except NotFound:
        return None
    return next((step.result for step in status.steps
                 if step.name == "ctx.receive:decision" and step.state == "done"), None)


async def refund_status(request: Request) -> JSONResponse:
    try:
        status = await (await dur.get(f"refund/{request.path_params['order_id']}")).status()
    except (NotFound, InvalidInput):
        return JSONResponse({"status": "not_found"}, status_code=404)
    return status_answer(status)


def status_answer(status: Status) -> JSONResponse:
    if status.state == "done":
        return JSONResponse({"status": "done", "result": status.result})
    if status.state == "failed":
        err = status.error or {}
        return JSONResponse({"status": "failed", "error": {
            "type": err.get("type"), "message": err.get("message"), "step": err.get("step")}})
    if status.state == "cancelled":
        return JSONResponse({"status": "cancelled"})
    body: dict[str, Any] = {"status": "processing"}
    if status.steps:
        body["step"], body["attempt"] = status.steps[-1].name, status.steps[-1].attempts
    return JSONResponse(body)


def list_charges(request: Request) -> JSONResponse:  # sync: Starlette runs it in a thread
    with providers(write=False) as conn:
        rows = conn.execute("SELECT c.order_id, c.charge_id, c.amount, c.key, r.key IS NOT NULL "
                            "FROM charges c LEFT JOIN refunds r ON r.key = c.key "
                            "ORDER BY c.created_at, c.key").fetchall()
    return JSONResponse({"charges": [
        {"orderId": o, "chargeId": c, "amount": a, "idempotencyKey": k, "refunded": bool(r)}
        for o, c, a, k, r in rows]})


def list_stock(request: Request) -> JSONResponse:
    with providers(write=False) as conn:
        rows = conn.execute("SELECT sku, available FROM stock ORDER BY sku").fetchall()
    return JSONResponse({"stock": dict(rows)})


async def journal_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The journal refused a read or write (full disk, locked, read-only): nothing was
    # accepted, so the client may try again later.
    log.error("journal unavailable: %s", exc)
    return JSONResponse({"error": "the order journal is unavailable; try again later"},
                        status_code=503, headers={"Retry-After": "5"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    setup_providers()
    if not PAYMENT_KEYS:
        log.warning("PAYMENT_KEYS=off: the payment provider ignores idempotency keys "
                    "(a test setting: a crash at charge now charges twice)")
    async with dur:  # opens the journal and resumes unfinished orders
        yield


routes = [
    Route("/orders", create_order, methods=["POST"]),
    Route("/orders/{order_id}/status", order_status, methods=["GET"]),
    Route("/orders/{order_id}/refund", start_refund, methods=["POST"]),
    Route("/orders/{order_id}/refund/decision", refund_decision, methods=["POST"]),
    Route("/orders/{order_id}/refund/status", refund_status, methods=["GET"]),
    Route("/charges", list_charges, methods=["GET"]),
    Route("/inventory", list_stock, methods=["GET"]),
]

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s",
                    datefmt="%H:%M:%S")
app = Starlette(routes=routes, lifespan=lifespan,
                exception_handlers={JournalError: journal_unavailable})


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host=HOST, port=PORT)
