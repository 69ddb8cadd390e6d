"""End-to-end tests of the order service: a real uvicorn in a subprocess, real HTTP."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

HERE = Path(__file__).resolve().parent

def changed(order: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `order` with some of its fields replaced or added."""
    body = copy.deepcopy(order)
    body.update(changes)
    return body


def step_lines(log: str, step: str, order_id: str) -> list[str]:
    return [line for line in log.splitlines() if f"[{step}] order {order_id} " in line]


# The contract's table, row by row.


def test_new_order_is_accepted_with_202_and_finishes_done(service: Any, order: Any) -> None:
    service.start()
    response = service.post(order)
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "orderId": "ord_1001",
                               "statusUrl": "/orders/ord_1001/status"}
    assert "idempotent-replayed" not in response.headers
    done = service.finished("ord_1001")
    charge_id = done["result"]["chargeId"]
    assert done == {"status": "done", "result": {
        "orderId": "ord_1001", "inventoryReserved": True, "paymentCharged": True,
        "confirmationSent": True, "total": 6997, "chargeId": charge_id}}
    assert service.charges() == [{"orderId": "ord_1001", "chargeId": charge_id,
                                  "amount": 6997, "idempotencyKey": "ord_1001/charge",
                                  "refunded": False}]
    assert "[validate] order ord_1001 - 2 item(s), total $69.97" in service.log()


def test_same_body_again_is_replayed_and_runs_nothing_again(service: Any, order: Any) -> None:
    service.start()
    first = service.post(order)
    service.finished("ord_1001")
    again = service.post(order)
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    time.sleep(0.2)
    log = service.log()
    for step in ("validate", "reserve", "charge", "confirm"):
        assert len(step_lines(log, step, "ord_1001")) == 1, log


def test_same_id_with_a_different_body_is_422_and_leaves_the_first_order(
        service: Any, order: Any) -> None:
    service.start()
    service.post(order)
    first = service.finished("ord_1001")
    response = service.post(changed(order, items=[{"sku": "widget-pro", "qty": 9, "price": 2999}]))
    assert response.status_code == 422
    assert "ord_1001" in response.json()["error"]
    assert service.finished("ord_1001") == first
    assert len(service.charges()) == 1


def test_running_order_reports_processing_with_its_step(service: Any, order: Any) -> None:
    service.start(FLAKY="reserve")  # the retry wait keeps the order running a moment
    service.post(order)
    body = service.status("ord_1001").json()
    assert body["status"] == "processing"
    assert set(body) <= {"status", "step", "attempt"}
    assert service.finished("ord_1001")["status"] == "done"


def test_unknown_id_is_404_not_found(service: Any) -> None:
    service.start()
    response = service.status("ord_nope")
    assert (response.status_code, response.json()) == (404, {"status": "not_found"})


def test_body_over_64_kib_is_413(service: Any, order: Any) -> None:
    service.start()
    big = changed(order, customer={"id": "cus_alice", "email": "alice@example.com",
                                   "x": "y" * 70_000})
    response = service.post(big)
    assert response.status_code == 413
    assert "64 KiB" in response.json()["error"]
    # Without a Content-Length header, the body is cut off at the limit as it streams in.
    chunks = (b"x" * 16_384 for _ in range(8))
    response = httpx.post(f"{service.url}/orders", content=chunks, timeout=10)
    assert response.status_code == 413
    assert service.status("ord_1001").status_code == 404


def malformed(order: dict[str, Any]) -> list[tuple[Any, str]]:
    """Bodies the door must refuse, each with what its 400 must name."""
    def like(**changes: Any) -> dict[str, Any]:
        return changed(order, **changes)

    return [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ([order], "JSON object"),
        (b"\"ord_1001\"", "JSON object"),
        (b"42", "JSON object"),
        ({k: v for k, v in order.items() if k != "id"}, "'id'"),
        ({k: v for k, v in order.items() if k != "customer"}, "'customer'"),
        ({k: v for k, v in order.items() if k != "items"}, "'items'"),
        (like(id=""), "'id'"),
        (like(id=1001), "'id'"),
        (like(id="ord 1001"), "'id'"),
        (like(id="x" * 65), "'id'"),
        (like(id="ord/1001"), "'id'"),
        (like(id="."), "'id'"),  # clients resolve "/orders/./status" to "/orders/status"
        (like(id=".."), "'id'"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"id": "ord_1", "customer": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
         "nested too deeply"),
        (like(extra=1), "'extra'"),
        (b'{"id": "ord_1", "customer": {"id": "\\ud800", "email": "a@b.co"}, "items": []}',
         "not valid Unicode"),
        (like(customer="cus_alice"), "'customer'"),
        (like(customer={"id": "cus_alice"}), "'customer.email'"),
        (like(customer={"id": "cus_alice", "email": "not-an-email"}), "'customer.email'"),
        (like(customer={"id": 7, "email": "a@b.co"}), "'customer.id'"),
        (like(items=[]), "'items'"),
        (like(items={"sku": "widget-pro"}), "'items'"),
        (like(items=["widget-pro"]), "'items[0]'"),
        (like(items=[{"sku": "widget-pro", "price": 1}]), "'items[0].qty'"),
        (like(items=[{"sku": "widget-pro", "qty": True, "price": 1}]), "'items[0].qty'"),
        (like(items=[{"sku": "widget-pro", "qty": 2.0, "price": 1}]), "'items[0].qty'"),
        (like(items=[{"sku": "widget-pro", "qty": 0, "price": 1}]), "'items[0].qty'"),
        (like(items=[{"sku": "widget-pro", "qty": "2", "price": 1}]), "'items[0].qty'"),
        (like(items=[{"sku": "widget-pro", "qty": 1, "price": 9.99}]), "'items[0].price'"),
        (like(items=[{"sku": "widget-pro", "qty": 1, "price": -1}]), "'items[0].price'"),
        (like(items=[{"sku": "widget-pro", "qty": 1, "price": False}]), "'items[0].price'"),
        (like(items=[{"sku": "", "qty": 1, "price": 1}]), "'items[0].sku'"),
        (like(items=[order["items"][0], {"sku": "w", "qty": 1, "price": 1, "note": 1}]),
         "'items[1].note'"),
    ]


def test_malformed_bodies_are_400_naming_the_problem_and_write_nothing(
        service: Any, order: Any, rows: Any) -> None:
    service.start()
    for body, expected in malformed(order):
        response = service.post(body)
        assert response.status_code == 400, (body, response.text)
        assert expected in response.json()["error"], (body, response.json())
    # Nothing was written: the only id used above is still unknown, and nothing ran.
    assert service.status("ord_1001").status_code == 404
    assert service.charges() == []
    assert rows(service.where, "SELECT count(*) FROM workflows") == [(0,)]


def test_a_client_gone_before_its_body_arrived_leaves_no_order_and_no_traceback(
        service: Any, order: Any, rows: Any) -> None:
    service.start()
    head = (b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as conn:
        conn.sendall(head + b'{"id": ')
    deadline = time.monotonic() + 5  # the server notices the hang-up on its own time
    while "disconnected before" not in service.log() and time.monotonic() < deadline:
        assert service.status("ord_1001").status_code == 404
        time.sleep(0.05)
    assert service.post(order).status_code == 202  # still serving
    log = service.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert rows(service.where, "SELECT count(*) FROM workflows") == [(1,)]


def test_declined_card_releases_the_reserved_stock_and_fails_the_order(
        service: Any, order: Any) -> None:
    service.start()
    before = service.stock()["widget-limited"]
    declined = changed(order, id="ord_declined", customer={"id": "cus_declined", "email": "d@e.co"},
                     items=[{"sku": "widget-limited", "qty": before, "price": 500}])
    service.post(declined)
    failed = service.finished("ord_declined")
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "CardDeclined"
    assert "declined" in failed["error"]["message"]
    assert service.stock()["widget-limited"] == before  # released by the compensating step
    assert service.charges() == []
    log = service.log()
    assert len(step_lines(log, "charge", "ord_declined")) == 0  # never retried, never charged
    assert len(step_lines(log, "release", "ord_declined")) == 1
    # The released stock can be sold again.
    service.post(changed(order, id="ord_after", items=[{"sku": "widget-limited", "qty": before,
                                               "price": 500}]))
    assert service.finished("ord_after")["status"] == "done"


@pytest.mark.parametrize("items, error_type", [
    ([{"sku": "widget-nope", "qty": 1, "price": 100}], "UnknownSku"),
    ([{"sku": "widget-limited", "qty": 4, "price": 100}], "OutOfStock"),
])
def test_business_failures_are_permanent_and_not_retried(
        service: Any, items: list[dict[str, Any]], error_type: str, order: Any) -> None:
    service.start()
    service.post(changed(order, id="ord_bad", items=items))
    failed = service.finished("ord_bad")
    assert (failed["status"], failed["error"]["type"]) == ("failed", error_type)
    assert "retrying" not in service.log()
    assert service.charges() == []


def test_flaky_step_is_retried_in_process_and_the_order_finishes(service: Any, order: Any) -> None:
    service.start(FLAKY="reserve")
    service.post(order)
    assert service.finished("ord_1001")["status"] == "done"
    log = service.log()
    assert "FLAKY: failing this attempt" in log
    assert "step 'reserve' attempt 1/5 failed (FlakyNetwork" in log
    assert len(step_lines(log, "reserve", "ord_1001")) == 2  # the failure, then the success
    assert len(service.charges()) == 1


# Crashes.


def crash_at_charge_then_restart(service: Any, order: dict[str, Any], **env: str) -> dict[str, Any]:
    service.start(CRASH_AT="charge", **env)
    assert service.post(order).status_code == 202
    assert service.wait_for_exit() == 3  # died inside charge, after charging
    service.start(**env)  # a plain restart
    return service.finished("ord_1001")


def test_crash_at_charge_then_restart_finishes_with_exactly_one_charge(
        service: Any, order: Any) -> None:
    done = crash_at_charge_then_restart(service, order)
    assert done["status"] == "done"
    charges = service.charges()
    assert len(charges) == 1 and charges[0]["chargeId"] == done["result"]["chargeId"]
    log = service.log()
    # validate and reserve were journaled before the crash: they never ran again.
    assert len(step_lines(log, "validate", "ord_1001")) == 1
    assert len(step_lines(log, "reserve", "ord_1001")) == 1
    assert "[charge] order ord_1001 - already charged $69.97" in log


def test_without_payment_keys_the_same_crash_charges_twice(service: Any, order: Any) -> None:
    # The counterfactual: the journal alone cannot stop the second charge; the key does.
    done = crash_at_charge_then_restart(service, order, PAYMENT_KEYS="off")
    assert done["status"] == "done"
    assert len(service.charges()) == 2


def test_a_charge_out_of_attempts_after_charging_is_refunded_and_its_stock_released(
        service: Any, order: Any) -> None:
    service.start(CRASH_AT="charge")
    before = service.stock()
    assert service.post(order).status_code == 202
    for _ in range(5):  # every attempt charges, then its process dies: 5 attempts
        assert service.wait_for_exit() == 3
        service.start(may_die=True, CRASH_AT="charge")
    failed = service.finished("ord_1001")
    assert failed["status"] == "failed"
    assert (failed["error"]["type"], failed["error"]["step"]) == ("Interrupted", "charge")
    charges = service.charges()
    assert [(c["idempotencyKey"], c["refunded"]) for c in charges] == [("ord_1001/charge", True)]
    assert service.stock() == before
    log = service.log()
    charged = [line for line in step_lines(log, "charge", "ord_1001") if "charged $" in line]
    assert len(charged) == 5 and "already charged" in charged[-1]  # one charge, five tries
    refunds = step_lines(log, "refund", "ord_1001")
    assert len(refunds) == 1 and "refunded $69.97" in refunds[0], refunds


@pytest.mark.parametrize("step", ["reserve", "confirm"])
def test_a_step_out_of_attempts_after_its_effect_leaves_no_stock_held_and_no_charge_lost(
        service: Any, step: str, order: Any) -> None:
    service.start(CRASH_AT=step)
    before = service.stock()
    assert service.post(order).status_code == 202
    for _ in range(5):  # every attempt has its effect, then its process dies
        assert service.wait_for_exit() == 3
        service.start(may_die=True, CRASH_AT=step)
    outcome = service.finished("ord_1001")
    log = service.log()
    if step == "reserve":  # nothing charged yet: the reservation is released
        assert (outcome["status"], outcome["error"]["type"]) == ("failed", "Interrupted")
        assert service.stock() == before and service.charges() == []
        assert len([line for line in step_lines(log, "release", "ord_1001")
                    if "reserved stock released" in line]) == 1
    else:  # paid and reserved: it stays so, and the email did go out
        assert outcome["status"] == "done" and outcome["result"]["confirmationSent"] is True
        assert [c["refunded"] for c in service.charges()] == [False]
        assert "the confirmation went out" in step_lines(log, "email_sent", "ord_1001")[0]


def test_an_id_used_again_after_prune_does_not_take_over_the_old_orders_charge(
        service: Any, order: Any) -> None:
    service.start()
    service.post(order)
    old = service.finished("ord_1001")["result"]["chargeId"]
    pruned = subprocess.run([sys.executable, str(HERE / "durable.py"), str(service.where),
                             "prune", "0s"], cwd=service.folder, capture_output=True,
                            text=True, timeout=60)
    assert pruned.returncode == 0 and "pruned 1" in pruned.stdout, pruned
    # The same id for another order: the providers still know its keys.
    other = changed(order, items=[{"sku": "widget-pro", "qty": 1, "price": 100}])
    assert service.post(other).status_code == 202
    failed = service.finished("ord_1001")
    assert (failed["status"], failed["error"]["type"]) == ("failed", "KeyReused")
    assert [(c["chargeId"], c["refunded"]) for c in service.charges()] == [(old, False)]


def test_64_concurrent_identical_posts_make_one_workflow_and_one_charge(
        service: Any, order: Any) -> None:
    service.start()

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            return await asyncio.gather(*(
                client.post("/orders", content=json.dumps(order)) for _ in range(64)))

    responses = asyncio.run(storm())
    assert [r.status_code for r in responses] == [202] * 64
    fresh = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    assert service.finished("ord_1001")["status"] == "done"
    assert len(service.charges()) == 1
    assert len(step_lines(service.log(), "validate", "ord_1001")) == 1


# Refunds: a workflow waiting for a person's decision (ctx.receive), then ctx.all.


def _refund(service: Any, order_id: str, body: Any = None) -> httpx.Response:
    url = f"{service.url}/orders/{order_id}/refund"
    if body is None:
        return httpx.post(url, timeout=10)
    return httpx.post(f"{url}/decision", timeout=10,
                      content=body if isinstance(body, bytes) else json.dumps(body))


def _refund_finished(service: Any, order_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        body = dict(httpx.get(f"{service.url}/orders/{order_id}/refund/status",
                              timeout=10).json())
        if body["status"] not in ("processing", "not_found"):
            return body
        assert time.monotonic() < deadline, (body, service.log())
        time.sleep(0.05)


def test_a_refund_waits_for_a_decision_across_a_restart_then_refunds_and_tells_at_once(
        service: Any, order: Any, rows: Any) -> None:
    service.start()
    assert service.post(order).status_code == 202
    assert service.finished("ord_1001")["status"] == "done"
    started = _refund(service, "ord_1001")
    assert started.status_code == 202 and started.json() == {
        "status": "accepted", "refundId": "refund/ord_1001",
        "statusUrl": "/orders/ord_1001/refund/status",
        "decisionUrl": "/orders/ord_1001/refund/decision"}
    again = _refund(service, "ord_1001")
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    waiting = httpx.get(f"{service.url}/orders/ord_1001/refund/status", timeout=10).json()
    assert waiting == {"status": "processing", "step": "ctx.receive:decision", "attempt": 1}
    service.stop()  # a restart while it waits
    service.start()
    decided = _refund(service, "ord_1001", {"approved": True})
    assert decided.status_code == 202 and "idempotent-replayed" not in decided.headers
    assert _refund_finished(service, "ord_1001") == {"status": "done", "result": {
        "orderId": "ord_1001", "refunded": True, "customerNotified": True, "amount": 6997}}
    assert [c["refunded"] for c in service.charges()] == [True]
    same = _refund(service, "ord_1001", {"approved": True})
    assert same.status_code == 202 and same.headers["idempotent-replayed"] == "true"
    other = _refund(service, "ord_1001", {"approved": False, "reason": "changed my mind"})
    assert other.status_code == 409 and other.json()["decision"] == {"approved": True}
    notices = rows(service.where if service.journal.startswith("postgresql://")
                   else service.folder / "orders-providers.db",
                   "SELECT subject FROM outbox WHERE key = 'refund/ord_1001/notify'")
    assert notices == [("Order ord_1001: $69.97 refunded",)]


def test_a_declined_or_undecided_refund_refunds_nothing(service: Any, order: Any) -> None:
    service.start(REFUND_DECISION_TIMEOUT="1")
    for order_id in ("ord_1001", "ord_1002"):
        assert service.post({**order, "id": order_id}).status_code == 202
        assert service.finished(order_id)["status"] == "done"
        assert _refund(service, order_id).status_code == 202
    declined = _refund(service, "ord_1001", {"approved": False, "reason": "used item"})
    assert declined.status_code == 202
    assert _refund_finished(service, "ord_1001")["result"] == {
        "orderId": "ord_1001", "refunded": False, "reason": "used item"}
    assert _refund_finished(service, "ord_1002")["result"] == {
        "orderId": "ord_1002", "refunded": False, "reason": "no decision within 1s"}
    late = _refund(service, "ord_1002", {"approved": True})
    assert late.status_code == 409 and "ended without a decision" in late.json()["error"]
    assert [c["refunded"] for c in service.charges()] == [False, False]


def test_refund_requests_that_cannot_be_met_get_clear_answers_and_write_nothing(
        service: Any, order: Any, rows: Any) -> None:
    service.start()
    assert _refund(service, "ord_9999").status_code == 404
    assert _refund(service, "ord_9999", {"approved": True}).status_code == 404
    assert service.post(order).status_code == 202
    assert service.finished("ord_1001")["status"] == "done"
    assert _refund(service, "ord_1001", {"approved": True}).status_code == 404  # none asked
    assert _refund(service, "ord_1001").status_code == 202
    for body in (b"not json", b"[]", b'{"approved": "yes"}', b'{"approved": true, "x": 1}',
                 b'{"approved": false, "reason": 7}', b"{" * 10_000):
        answer = _refund(service, "ord_1001", body)
        assert answer.status_code == 400 and answer.json()["error"], body[:20]
    assert rows(service.where, "SELECT count(*) FROM messages") == [(0,)]
    declined = dict(order, id="ord_declined", customer={"id": "cus_declined", "email": "d@e.co"})
    assert service.post(declined).status_code == 202
    assert service.finished("ord_declined")["status"] == "failed"
    refused = _refund(service, "ord_declined")
    assert refused.status_code == 409 and "only a paid order" in refused.json()["error"]
    assert "Traceback" not in service.log()
