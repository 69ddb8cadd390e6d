"""Child workflows: ctx.child (CONTRACT.md §7), in both workflow forms, on both
stores, across restarts and SIGKILL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from durable import Durable, InvalidInput, RetryPolicy, StepFailed, WorkflowCancelled

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("form", ["generator", "async"])
def test_a_child_returns_its_result_or_fails_in_the_parent_and_show_names_both(
        db: Any, form: str, tmp_path: Path, register_in: Any) -> None:
    dur = Durable(db, retry=RetryPolicy(max_attempts=1))

    def audit(ctx, order_id):
        return (yield ctx.run(str.upper, order_id))

    def refuse(ctx, why):
        yield ctx.run(str, why)
        raise PermissionError(why)

    def parent(ctx, order_id):
        audited = yield ctx.child("audit", order_id)
        named = yield ctx.options(id=f"audit-of-{order_id}").child("audit", "again")
        try:
            yield ctx.child("refuse", "not today")
        except StepFailed as exc:
            return [audited, named, exc.step, exc.error_type, exc.message]

    register_in(dur, form, audit, "audit")
    register_in(dur, form, refuse, "refuse")
    register_in(dur, form, parent, "parent")

    async def main() -> Any:
        async with dur:
            handle = await dur.run("p", "parent", "o1")
            result = await handle.result(timeout=20)
            child = await (await dur.get("p/1")).status()
            return result, await handle.status(), child

    result, status, child = asyncio.run(main())
    assert result == ["O1", "AGAIN", "ctx.child:refuse", "PermissionError", "not today"]
    assert status.children == ("p/1", "audit-of-o1", "p/3")
    assert child.parent == "p" and child.name == "audit" and child.result == "O1"
    shown = subprocess.run([sys.executable, str(HERE / "durable.py"), str(db), "show", "p/1"],
                           capture_output=True, text=True, timeout=60)
    assert "  parent    p\n" in shown.stdout
    shown = subprocess.run([sys.executable, str(HERE / "durable.py"), str(db), "show", "p"],
                           capture_output=True, text=True, timeout=60)
    assert "  children  p/1, audit-of-o1, p/3\n" in shown.stdout


def test_a_replayed_parent_starts_no_second_child(db: Any, rows: Any) -> None:
    ran: Counter[str] = Counter()

    def build() -> Durable:
        dur = Durable(db)

        @dur.register(name="child")
        def child(ctx):
            return (yield ctx.run(ran.update, ["child step"]))

        @dur.register(name="parent")
        def parent(ctx):
            yield ctx.child("child")
            return (yield ctx.receive("go"))

        return dur

    async def main() -> Any:
        async with build() as dur:
            await dur.run("p", "parent")
            deadline = time.monotonic() + 10
            while len((await (await dur.get("p")).status()).steps) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        async with build() as dur:  # replays ctx.child from the journal
            await dur.send("p", "go", "went")
            return await (await dur.get("p")).result(timeout=10)

    assert asyncio.run(main()) == "went"
    assert ran == {"child step": 1}
    assert rows(db, "SELECT id, parent FROM workflows ORDER BY id") == [("p", None),
                                                                         ("p/1", "p")]


KILLED = textwrap.dedent("""
    import asyncio, os, sys, time
    from durable import Durable

    db, marks = sys.argv[1], sys.argv[2]
    dur = Durable(db)

    def mark(what, pause=0.0):
        with open(marks, "a") as f:
            f.write(what + "\\n")
        time.sleep(pause)
        return what

    @dur.register(name="child")
    def child(ctx):
        yield ctx.run(mark, "child one")
        return (yield ctx.run(mark, "child two", 0 if os.environ.get("AGAIN") else 60))

    @dur.register(name="parent")
    def parent(ctx):
        yield ctx.run(mark, "parent before")
        got = yield ctx.child("child")
        yield ctx.run(mark, "parent after")
        return got

    async def main():
        async with dur:
            print(await (await dur.run("p", parent)).result(timeout=60), flush=True)

    asyncio.run(main())
""")


def test_a_process_killed_between_a_childs_start_and_its_end_finishes_both_once(
        tmp_path: Path, db: Any) -> None:
    script, marks = tmp_path / "family.py", tmp_path / "marks.txt"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    first = subprocess.Popen([sys.executable, str(script), str(db), str(marks)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "child two" not in (marks.read_text() if marks.exists() else ""):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.kill()  # SIGKILL, inside the child's second step
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    again = subprocess.run([sys.executable, str(script), str(db), str(marks)],
                           env={**env, "AGAIN": "1"}, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "child two"
    assert Counter(marks.read_text().split("\n")[:-1]) == {
        "parent before": 1, "child one": 1, "child two": 2, "parent after": 1}


def test_cancelling_a_parent_cancels_its_unfinished_children(db: Any, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def done_child(ctx):
        return (yield ctx.run(str, "quick"))

    @dur.register
    def waiting_child(ctx):
        return (yield ctx.receive("never"))

    @dur.register
    def parent(ctx):
        yield ctx.child(done_child)
        return (yield ctx.all(ctx.child(waiting_child), ctx.child(waiting_child)))

    async def main() -> None:
        async with dur:
            handle = await dur.run("p", parent)
            deadline = time.monotonic() + 10
            while len((await handle.status()).children) < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert await dur.cancel("p")
            for wf_id in ("p", "p/2", "p/3"):
                with pytest.raises(WorkflowCancelled):
                    await (await dur.get(wf_id)).result(timeout=10)

    asyncio.run(main())
    assert rows(db, "SELECT id, state FROM workflows ORDER BY id") == [
        ("p", "cancelled"), ("p/1", "done"), ("p/2", "cancelled"), ("p/3", "cancelled")]


def test_children_in_one_all_run_at_once(db: Any) -> None:
    barrier = threading.Barrier(2, timeout=10)
    dur = Durable(db)

    @dur.register
    def child(ctx, n):
        return (yield ctx.run(lambda: barrier.wait() >= 0 and n))

    @dur.register
    def parent(ctx):
        return (yield ctx.all(ctx.child(child, 1), ctx.child(child, 2)))

    async def main() -> Any:
        async with dur:
            return await (await dur.run("p", parent)).result(timeout=20)

    assert asyncio.run(main()) == [1, 2]


def test_a_bad_child_is_refused_before_anything_is_written(db: Any, rows: Any) -> None:
    dur = Durable(db)
    refused: list[str] = []

    def stranger(ctx):
        yield ctx.run(str)

    @dur.register
    def child(ctx, n):
        return (yield ctx.run(str, n))

    @dur.register
    def parent(ctx):
        for make in (lambda: ctx.child(stranger), lambda: ctx.child(child),
                     lambda: ctx.child(child, object()), lambda: ctx.options(id="").child(child, 1),
                     lambda: ctx.options(id="x" * 300)):
            try:
                make()
            except InvalidInput as exc:
                refused.append(str(exc)[:20])
        return len(refused)
        yield  # a generator workflow

    async def main() -> Any:
        async with dur:
            return await (await dur.run("p", parent)).result(timeout=10)

    assert asyncio.run(main()) == 5
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]
    assert rows(db, "SELECT id FROM workflows") == [("p",)]


def test_a_long_chain_of_children_is_cancelled_whole_and_options_id_adopts_no_stranger(
        db: Any, rows: Any) -> None:
    dur = Durable(db)

    @dur.register
    def link(ctx, depth):
        if depth == 0:
            return (yield ctx.receive("never"))
        return (yield ctx.options(id=f"chain-{depth - 1}").child(link, depth - 1))

    @dur.register
    def lone(ctx):
        return (yield ctx.receive("never"))

    @dur.register
    def claims(ctx):
        return (yield ctx.options(id="stranger").child(lone))

    async def main() -> None:
        async with dur:
            await dur.run("chain-1100", link, 1100)
            deadline = time.monotonic() + 60
            while rows(db, "SELECT count(*) FROM steps WHERE name = 'ctx.receive:never'") \
                    != [(1,)]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert await dur.cancel("chain-1100")
            await dur.run("stranger", lone)  # started on its own
            await dur.run("claimer", claims)
            deadline = time.monotonic() + 10
            while len((await (await dur.get("claimer")).status()).steps) < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert await dur.cancel("claimer")
            assert not await (await dur.get("stranger")).done()

    asyncio.run(main())
    assert rows(db, "SELECT state, count(*) FROM workflows WHERE id LIKE 'chain-%' "
                    "GROUP BY state") == [("cancelled", 1101)]
    assert rows(db, "SELECT parent, state FROM workflows WHERE id = 'stranger'") == [
        (None, "running")]
