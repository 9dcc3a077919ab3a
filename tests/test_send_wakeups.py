"""The senders' wake-ups (issue 13): a token on the bell means a sender can take something.

Every useless token cost a sender a wake-up and an empty take; with one tenant at its cap that was
more Redis calls than mails. Driven on the fair queue itself, against the real Redis.
"""

from __future__ import annotations

from shared import queue
from shared.fairqueue import SendQueue

PROCESSING = "mailq:processing:test-sender"
SLOT_MS = 60_000


def queued(sendq: SendQueue, tenant: int, *task_ids: int) -> None:
    sendq.route([(tenant, task_id, queue.encode(task_id)) for task_id in task_ids])


def tokens(ctx) -> int:
    return ctx.redis.llen(queue.SEND_BELL)


def test_a_take_that_finds_every_tenant_at_its_cap_clears_the_bell(ctx):
    sendq = SendQueue(ctx.redis)
    queued(sendq, 1, 11, 12, 13)
    assert tokens(ctx) == 3
    [taken] = sendq.take(PROCESSING, "s:", 3, 1, SLOT_MS)
    assert taken.task_id == 11 and tokens(ctx) == 0  # 12 and 13 wait for the slot: nothing to wake for


def test_a_finished_conversation_takes_the_next_mail_itself_without_ringing(ctx):
    sendq = SendQueue(ctx.redis)
    queued(sendq, 1, 11, 12)
    [first] = sendq.take(PROCESSING, "s:", 1, 1, SLOT_MS)
    [second] = sendq.done_and_take(PROCESSING, first, "s:", 1, 1, SLOT_MS)
    assert second.task_id == 12 and tokens(ctx) == 0
    assert ctx.redis.lrange(PROCESSING, 0, -1) == [second.raw]  # the first let go, the second held
    assert ctx.redis.zrange(queue.slots(1), 0, -1) == [second.holder.encode()]  # still one slot: the cap


def test_the_slot_freed_for_a_tenant_with_mail_still_rings_when_another_tenant_got_the_turn(ctx):
    sendq = SendQueue(ctx.redis)
    queued(sendq, 1, 11, 12)
    queued(sendq, 2, 21)
    [a1] = sendq.take(PROCESSING, "s:", 1, 1, SLOT_MS)
    ctx.redis.delete(queue.SEND_BELL)
    [b1] = sendq.done_and_take(PROCESSING, a1, "s:", 1, 1, SLOT_MS)
    assert b1.task_id == 21  # the ring's turn was tenant 2's
    assert tokens(ctx) == 1  # tenant 1's freed slot and mail 12: another thread can take it
