"""An account's open connections across every sender stay within its number (the relay's limit).

A slot is an open connection: a sender keeps one idle in its pool between mails under an idle slot
(``~`` + its holder prefix + the connection's number), reuses it when its take hands it over, and opens
a new one only while the account has room. Driven on the fair queue itself, against the real Redis; the
end-to-end proof (two senders, a relay that refuses a fourth connection) is in tests/test_relays.py.
"""

from __future__ import annotations

from shared import queue
from shared.fairqueue import SendQueue

SLOT_MS = 60_000
IDLE_MS = 30_000


def queued(sendq: SendQueue, tenant: int, *task_ids: int) -> None:
    sendq.route([(tenant, task_id, queue.encode(task_id)) for task_id in task_ids])


def account_cap(ctx, tenant: int, cap: int) -> None:
    ctx.redis.hset(queue.account(tenant), mapping={"cap": cap})  # past its probe: `cap` conversations


def members(ctx, tenant: int) -> list[str]:
    return sorted(m.decode() for m in ctx.redis.zrange(queue.slots(tenant), 0, -1))


def test_idle_connections_count_so_another_sender_opens_none_beyond_the_account_and_wakes_their_owner(ctx):
    sendq = SendQueue(ctx.redis)
    account_cap(ctx, 1, 2)
    queued(sendq, 1, 11, 12, 13, 14, 15)
    a1, a2 = sendq.take("mailq:processing:a", "a:", 2, 16, SLOT_MS)
    assert (a1.reuse, a2.reuse) == ("", "")  # nothing pooled yet: two new connections
    sendq.done("mailq:processing:a", a1, parked="~a:1", parked_ms=IDLE_MS)
    sendq.done("mailq:processing:a", a2, parked="~a:2", parked_ms=IDLE_MS)
    assert members(ctx, 1) == ["~a:1", "~a:2"]  # both connections open, idle in a's pool

    ctx.redis.delete(f"{queue.SEND_BELL}:a")
    assert sendq.take("mailq:processing:b", "b:", 2, 16, SLOT_MS) == []  # a third connection: no
    assert ctx.redis.llen(f"{queue.SEND_BELL}:a") == 1  # a is woken: it can take the mail

    taken = sendq.take("mailq:processing:a", "a:", 2, 16, SLOT_MS)
    assert sorted(t.reuse for t in taken) == ["1", "2"]  # over its idle connections, no new one
    assert members(ctx, 1) == sorted(t.holder for t in taken)  # the idle slots became busy ones

    sendq.done("mailq:processing:a", taken[0], parked=f"~a:{taken[0].reuse}", parked_ms=IDLE_MS)
    assert sendq.park(1, f"~a:{taken[0].reuse}", 0, closed=True)  # a's pool closed it: a slot is free
    [b1] = sendq.take("mailq:processing:b", "b:", 2, 16, SLOT_MS)
    assert b1.reuse == "" and len(members(ctx, 1)) == 2


def test_reusing_an_idle_connection_still_keeps_to_the_accounts_conversations(ctx):
    sendq = SendQueue(ctx.redis)
    account_cap(ctx, 1, 3)
    queued(sendq, 1, *range(11, 20))
    for i, item in enumerate(sendq.take("mailq:processing:a", "a:", 3, 16, SLOT_MS), 1):
        sendq.done("mailq:processing:a", item, parked=f"~a:{i}", parked_ms=IDLE_MS)
    account_cap(ctx, 1, 1)  # the relay pushed back: one conversation at a time now
    [only] = sendq.take("mailq:processing:a", "a:", 3, 16, SLOT_MS)
    assert only.reuse in {"1", "2", "3"}


def test_an_idle_slot_expires_with_its_sender(ctx):
    sendq = SendQueue(ctx.redis)
    account_cap(ctx, 1, 1)
    queued(sendq, 1, 11, 12)
    [a1] = sendq.take("mailq:processing:a", "a:", 1, 16, SLOT_MS)
    sendq.done("mailq:processing:a", a1, parked="~a:1", parked_ms=50)
    assert sendq.take("mailq:processing:b", "b:", 1, 16, SLOT_MS) == []
    ctx.redis.execute_command("DEBUG", "SLEEP", "0.1")  # a dies: nobody closes its connection's slot
    [b1] = sendq.take("mailq:processing:b", "b:", 1, 16, SLOT_MS)
    assert b1.task_id == 12 and b1.reuse == ""
