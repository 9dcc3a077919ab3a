"""The order of the data path's hand-offs, checked at the moment each happens rather than by waiting:
enqueue commits the row before it pushes the envelope, and the consumer lets go of an envelope only
after handing it on. Both orders can only be seen broken under load or at a crash, so each test
stops the world at the hand-off instead."""

from __future__ import annotations

import pytest
import redis
import sqlalchemy as sa

from shared import queue


def test_the_envelope_is_pushed_only_after_its_row_is_committed(pipe, smtp, monkeypatch):
    from shared import bounds

    user = pipe.user(smtp)
    visible_at_push: list[bool] = []
    real_lpush, real_push_and_settle = pipe.ctx.redis.lpush, bounds.push_and_settle

    def visible(envelopes) -> None:
        # Another connection sees only committed rows: what a consumer would see at this moment.
        ids = [queue.decode(e) for e in envelopes]
        with pipe.ctx.engine.connect() as other:
            found = other.execute(
                sa.text("SELECT count(*) FROM tasks WHERE id = ANY(CAST(:ids AS bigint[]))"), {"ids": ids}
            ).scalar_one()
        visible_at_push.append(found == len(ids))

    def lpush(key, *envelopes):
        visible(envelopes)
        return real_lpush(key, *envelopes)

    def push_and_settle(client, key, envelopes, ticket):  # the push that also ends the tenant's admission
        visible(envelopes)
        return real_push_and_settle(client, key, envelopes, ticket)

    monkeypatch.setattr(pipe.ctx.redis, "lpush", lpush)
    monkeypatch.setattr(bounds, "push_and_settle", push_and_settle)
    pipe.enqueue(user)
    assert visible_at_push == [True]


@pytest.fixture()
def consumer_that_cannot_hand_off(pipe, redis_url):
    """A consumer whose Redis user may touch its own input and processing lists but not the senders'
    keys: the hand-off is refused by Redis itself (NOPERM), as a failure between taking an envelope
    and handing it on would be."""
    from shared.delivery.consumer import Consumer

    admin = pipe.ctx.redis
    name = "mailq-test-consumer-no-handoff"
    admin.acl_setuser(
        name,
        enabled=True,
        nopass=True,
        keys=[f"~{queue.TASK_LIST}", "~mailq:processing:*", f"~{queue.WORKERS}", "~mailq:heartbeat:*"],
        commands=["+@all"],
        reset=True,
    )
    client = redis.Redis.from_url(redis_url, username=name, password="unused", socket_timeout=5)
    try:
        yield Consumer(pipe.ctx.settings, pipe.ctx.engine, client)
    finally:
        client.close()
        admin.acl_deluser(name)


def test_an_envelope_whose_hand_off_fails_stays_in_the_consumers_processing_list(
    pipe, smtp, consumer_that_cannot_hand_off
):
    consumer = consumer_that_cannot_hand_off
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    with pytest.raises(redis.RedisError):
        consumer.step(0.1)
    # Still held, so a restart of this worker (or the sweep, once its heartbeat is gone) returns it.
    assert pipe.ctx.redis.lrange(consumer.processing, 0, -1) == [queue.encode(task_id)]
    assert pipe.ctx.redis.llen(queue.TASK_LIST) == 0
