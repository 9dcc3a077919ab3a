"""A sender's memory for mails in flight is bounded: large mails wait for room, small ones never do."""

from __future__ import annotations

import base64
import hashlib
import threading
import time

import sqlalchemy as sa

from shared.delivery import inflight
from shared.delivery.inflight import INLINE_BYTES, WEIGHT, ByteBudget
from shared.tasks import views
from shared.workers import Outcome
from tests.smtp_servers import ScriptedSmtpServer

LARGE = bytes(range(256)) * (INLINE_BYTES // 256 + 64)  # just over the inline limit


def large_mail(pipe, user, n: int) -> int:
    fields = {"attachments": [{"filename": f"{n}.bin", "content": base64.b64encode(LARGE).decode()}]}
    return pipe.enqueue(user, subject=f"large {n}", **fields)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the budget itself --------------------------------------------------------------------------------------


def test_the_budget_serves_waiters_in_order_and_a_timeout_takes_nothing():
    budget = ByteBudget(100)
    assert budget.acquire(70, 0) == 70
    assert budget.acquire(50, 0.05) is None and budget.in_use == 70
    order = []
    big = threading.Thread(target=lambda: order.append(("big", budget.acquire(60, 5))))
    big.start()
    wait_for(lambda: len(budget._waiting) == 1)  # noqa: SLF001
    # 20 would fit now, but the 60 asked first: the small one waits behind it (no starvation).
    small = threading.Thread(target=lambda: order.append(("small", budget.acquire(20, 5))))
    small.start()
    wait_for(lambda: len(budget._waiting) == 2)  # noqa: SLF001
    time.sleep(0.05)
    assert order == []
    budget.release(70)
    big.join(5)
    small.join(5)
    assert order == [("big", 60), ("small", 20)] and budget.in_use == 80


def test_a_request_larger_than_the_budget_takes_all_of_it_once_it_is_free():
    budget = ByteBudget(100)
    assert budget.acquire(500, 0) == 100
    assert budget.acquire(1, 0.01) is None
    budget.release(100)
    assert budget.in_use == 0


# --- a sender under load ------------------------------------------------------------------------------------


def test_large_mails_wait_for_room_while_small_ones_pass_and_all_arrive_intact(pipe, monkeypatch):
    """Room for one large mail at a time: the second and third of a tenant wait (their account's
    cap would let three talk at once) while another tenant's small mails all reach DATA together."""
    monkeypatch.setattr(inflight, "SLICE_BYTES", 7000)  # their bytes come in a dozen uneven slices
    room = WEIGHT * (len(LARGE) + len("Hi Bob,\nit works.\n")) + 1000
    pipe.sender.settings = pipe.ctx.settings.replace(sender_content_memory=room)
    pipe.sender.inflight = inflight.Inflight(pipe.ctx.engine, room)
    with ScriptedSmtpServer() as big_server, ScriptedSmtpServer() as small_server:
        big = pipe.user(big_server, email="big@example.com")
        small = pipe.user(small_server, email="small@example.com")
        pipe.established(big)
        pipe.established(small)
        large_ids = [large_mail(pipe, big, n) for n in range(3)]
        small_ids = [pipe.enqueue(small, subject=f"small {n}") for n in range(3)]
        big_server.gate.clear()  # DATA hangs until the test opens it
        small_server.gate.clear()
        pipe.hand_off()
        taken = pipe.sender.take(10)
        assert len(taken) == 6
        threads = [threading.Thread(target=pipe.sender.handle, args=(item,)) for item in taken]
        for t in threads:
            t.start()
        wait_for(lambda: small_server.in_data == 3 and big_server.in_data == 1)
        time.sleep(0.3)
        assert big_server.in_data == 1 and big_server.max_in_data == 1
        waiting = [views.get_task(pipe.ctx, big.id, i) for i in large_ids]
        assert sorted(t["status"] for t in waiting) == ["processing"] * 3  # claimed, waiting for room
        big_server.gate.set()
        small_server.gate.set()
        for t in threads:
            t.join(30)
        assert big_server.max_in_data == 1 and small_server.max_in_data == 3
        delivered = [m.iter_attachments() for m in big_server.messages[1:]]
    assert [pipe.task(i).status for i in large_ids + small_ids] == ["sent"] * 6
    digest = hashlib.sha256(LARGE).hexdigest()
    assert [hashlib.sha256(next(a).get_payload(decode=True)).hexdigest() for a in delivered] == [digest] * 3
    assert pipe.sender.inflight.budget.in_use == 0


def test_a_large_mail_without_room_in_time_goes_back_without_spending_a_try(pipe):
    pipe.ctx.settings = pipe.ctx.settings.replace(lease_seconds=1)  # waits at most 0.4 s for room
    pipe.sender.settings = pipe.ctx.settings
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        task_id = large_mail(pipe, user, 0)
        budget = pipe.sender.inflight.budget
        budget.acquire(budget.capacity, 0)  # other large mails hold all of it
        pipe.hand_off()
        assert pipe.sender.step(0.05) == [Outcome.RELEASED]
        row = pipe.task(task_id)
        assert row.status == "queued" and row.try_count - row.budget_base == 0 and server.data_attempts == 0
        budget.release(budget.capacity)
        assert pipe.sender.step(0.05) == [Outcome.SENT]  # given back to its queue, taken again


def test_a_plain_or_small_mail_costs_the_sender_two_statements_and_a_large_one_reads_its_bytes_after(pipe):
    """The claim brings small content along: no extra round trip for a plain mail or a small rich one."""
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        pipe.established(user)  # the account read and its connection open, as in a steady stream
        plain = pipe.enqueue(user)
        rich = pipe.enqueue(
            user, html="<p>x</p>", cc=["c@example.org"], attachments=[{"filename": "a", "content": "eA=="}]
        )
        large = large_mail(pipe, user, 0)
        pipe.hand_off()
        per_task = {}
        sa.event.listen(pipe.ctx.engine, "before_cursor_execute", record)
        try:
            for item in pipe.sender.take(10):
                statements.clear()
                assert pipe.sender.handle(item) == Outcome.SENT
                per_task[item.task_id] = len(statements)
        finally:
            sa.event.remove(pipe.ctx.engine, "before_cursor_execute", record)
    assert per_task[plain] == per_task[rich] == 2  # the claim and the outcome
    assert per_task[large] == 2 + 1 + 1  # and the texts, then one slice of bytes
