"""An account's pace in Redis (shared/pace.py, the fair queue's take): its backoff across every sender,
its adaptive concurrency, its declared send limits. Real Redis; the limiter and the backoff take "now"
from the test where the boundaries are the point (Redis's TIME cannot be faked)."""

from __future__ import annotations

import time

import pytest

from shared import pace, queue
from shared.fairqueue import SendQueue
from shared.pace import GROWTH_QUIET, Pace
from shared.workers import Outcome

T = 7  # a tenant
SECOND = 1000


@pytest.fixture()
def p(ctx) -> Pace:
    return Pace(ctx.redis)


def limits(*windows) -> str:
    return pace.encode_limits([{"max": m, "per": per, "count": c} for m, per, c in windows])


# --- declared send limits: a sliding window, never more than max in any `per` ------------------------


def test_a_window_lets_max_through_then_holds_until_the_oldest_leaves(p):
    p.configure(T, 3, limits((10, "second", "messages")))
    start = 1_000_000_000_000  # a bucket boundary (1000 / 60 ms buckets: 16 ms)
    assert [p.acquire(T, 1, 1, now_ms=start + i) for i in range(10)] == [0] * 10
    free = p.acquire(T, 1, 1, now_ms=start + 10)
    # The 10 leave the window once their bucket's last moment is a second old, plus the allowance for a
    # MAIL FROM that lags its take (1/10 of the window): at most 16 ms later than that.
    lag = SECOND // pace.ALLOWANCE_SHARE
    assert start + SECOND + lag < free <= start + SECOND + lag + 16
    assert p.acquire(T, 1, 1, now_ms=free - 1) > 0  # not a moment early…
    assert p.acquire(T, 1, 1, now_ms=free) == 0  # …and then at once
    assert p.state(T)["held_until"] >= free - 1  # the take passes the tenant's turn meanwhile


def test_in_any_window_of_per_no_more_than_max_go_through(p):
    """Against a relay's own sliding window: ask every 7 ms for 10 s; count what went in each second."""
    p.configure(T, 3, limits((10, "second", "messages")))
    start, passed = 2_000_000_000_000, []
    for t in range(start, start + 10 * SECOND, 7):
        if p.acquire(T, 1, 1, now_ms=t) == 0:
            passed.append(t)
    worst = max(sum(1 for q in passed if t - SECOND < q <= t) for t in passed)
    assert worst == 10 and len(passed) >= 85  # the limit, and most of what it allows (1.1 s a window)
    # Even a MAIL FROM that lags its take by up to the allowance (100 ms) keeps to the relay's window.
    lagged = [q + (95 if i // 10 % 2 == 0 else 0) for i, q in enumerate(passed)]  # every other ten late
    assert max(sum(1 for q in lagged if t - SECOND < q <= t) for t in lagged) <= 10


def test_a_recipients_window_counts_each_recipient_and_refuses_what_can_never_fit(p):
    p.configure(T, 3, limits((5, "minute", "recipients"), (100, "day", "messages")))
    now = 3_000_000_000_000
    assert p.acquire(T, 1, 4, now_ms=now) == 0
    assert p.acquire(T, 1, 2, now_ms=now + 1) > 0  # 6 recipients > 5: held, nothing taken
    assert p.acquire(T, 1, 1, now_ms=now + 2) == 0
    assert p.acquire(T, 1, 6, now_ms=now + 3) == -1  # more than any minute allows: never


def test_the_windows_are_checked_together_and_nothing_is_taken_from_one_when_another_is_full(p):
    p.configure(T, 3, limits((2, "second", "messages"), (3, "minute", "messages")))
    now = 4_000_000_000_000
    assert p.acquire(T, 1, 1, now_ms=now) == 0 and p.acquire(T, 1, 1, now_ms=now + 1) == 0
    assert p.acquire(T, 1, 1, now_ms=now + 2) > 0  # the second window is full
    assert p.acquire(T, 1, 1, now_ms=now + 2 * SECOND) == 0  # the minute's third
    assert p.acquire(T, 1, 1, now_ms=now + 3 * SECOND) > now + 60 * SECOND  # the minute is full now


def test_a_send_limit_is_parsed_checked_and_described():
    windows, errors = pace.parse_limits(
        [{"max": 10, "per": "second"}, {"max": 2000, "per": "day", "count": "recipients"}]
    )
    assert errors == {} and windows[0]["count"] == "messages"
    assert pace.describe_limits(windows) == "10 messages per second, 2,000 recipients per day"
    for bad, field in (
        ({"max": 0, "per": "second"}, "smtp_send_limits[0].max"),
        ({"max": 5, "per": "week"}, "smtp_send_limits[0].per"),
        ({"max": 5, "per": "day", "count": "bytes"}, "smtp_send_limits[0].count"),
        ({"max": 5, "per": "day", "extra": 1}, "smtp_send_limits[0]"),
    ):
        assert field in pace.parse_limits([bad])[1]
    assert "smtp_send_limits" in pace.parse_limits([{"max": 1, "per": "day"}] * 5)[1]
    assert "smtp_send_limits[1]" in pace.parse_limits([{"max": 1, "per": "day"}, {"max": 2, "per": "day"}])[1]


def test_every_sender_draws_from_the_same_window(ctx, p):
    """The limit is the account's, not a sender's: two senders taking in turn get max between them."""
    p.configure(T, 3, limits((3, "minute", "messages")))
    ctx.redis.hset(queue.account(T), mapping={"cap": 3, "probe": 0})
    queued(ctx, T, 10)
    senders = [SendQueue(ctx.redis), SendQueue(ctx.redis)]
    took = []
    for turn in range(8):
        k = turn % 2
        for taken in senders[k].take(f"p{k}", f"s{k}:", 1, 16, 60_000):
            # Over a sender's open connection the take counted the mail; one that needs a new
            # connection is counted once that is open (shared.delivery.relay: Pace.acquire).
            if taken.reuse or p.acquire(T, 1, 1) == 0:
                took.append(taken)
                senders[k].done(f"p{k}", taken, parked=f"~s{k}:1", parked_ms=60_000)
            else:
                senders[k].give_back(f"p{k}", taken, taken.task_id)
    assert len(took) == 3 and any(t.reuse for t in took)


# --- the take: held, over its limit, probing ---------------------------------------------------------------


def queued(ctx, tenant: int, n: int) -> None:
    SendQueue(ctx.redis).route((tenant, i, queue.encode(i)) for i in range(tenant * 100, tenant * 100 + n))


def test_a_new_account_has_one_conversation_until_its_first_success(ctx, p):
    queued(ctx, T, 5)
    sendq = SendQueue(ctx.redis)
    first = sendq.take("p", "h:", 10, 16, 60_000)
    assert len(first) == 1  # however many it declares
    assert sendq.take("p", "h:", 10, 16, 60_000) == []
    assert sendq.done("p", first[0], success=3) is False
    assert len(sendq.take("p", "h:", 10, 16, 60_000)) == 3  # its declared maximum now


def test_a_held_account_passes_its_turn_and_the_others_go_on(ctx, p):
    queued(ctx, T, 3)
    queued(ctx, 8, 3)
    p.pushback(T, reason="unreachable", declared_max=3, base=60, cap=300, jitter=0)
    took = SendQueue(ctx.redis).take("p", "h:", 10, 16, 60_000)
    assert {t.tenant for t in took} == {8}
    assert ctx.redis.lrange(queue.SEND_READY, 0, -1).count(str(T).encode()) == 1  # still in the ring


def test_an_account_over_its_send_limit_is_not_even_taken(ctx, p):
    """Over its open connections: a mail that needs a new one is counted once that is open (the
    sender's side: tests/test_relays.py)."""
    p.configure(T, 3, limits((2, "minute", "messages")))
    ctx.redis.hset(queue.account(T), mapping={"cap": 3, "probe": 0})
    for i in (1, 2, 3):  # three connections open, idle in this sender's pool
        ctx.redis.zadd(queue.slots(T), {f"~h:{i}": time.time() * 1000 + 60_000})
    queued(ctx, T, 5)
    sendq = SendQueue(ctx.redis)
    took = sendq.take("p", "h:", 10, 16, 60_000)
    assert len(took) == 2 and took.limit_waits == 1  # two in the minute; the third held, not taken
    assert all(t.reuse for t in took)
    assert p.state(T)["hold"] == "limit" and p.state(T)["held_until"] > time.time() * 1000 + 50_000
    assert sendq.waiting(T) == 3


# --- backoff ---------------------------------------------------------------------------------------------


def test_the_backoff_grows_from_the_base_to_the_cap_and_a_success_ends_it(ctx, p):
    now, delays = 5_000_000_000_000, []
    for step in range(12):
        b = p.pushback(T, reason="unreachable", declared_max=3, base=1, cap=300, jitter=0, now_ms=now)
        assert b.stepped and b.new == (step == 0) and b.level == step + 1
        delays.append(b.until_ms - now)
        now = b.until_ms  # the next attempt fails as well
    assert delays[:4] == [1000, 2000, 4000, 8000] and delays[-1] == 300_000
    sendq = SendQueue(ctx.redis)
    queued(ctx, T, 1)
    ctx.redis.zrem(queue.SEND_HOLD, T)
    [item] = sendq.take("p", "h:", 1, 16, 60_000)
    assert sendq.done("p", item, success=3) is True  # the episode ended
    assert p.pushback(T, reason="unreachable", declared_max=3, base=1, cap=300, jitter=0).new


def test_the_jitter_adds_up_to_half_and_never_passes_the_cap(p):
    now = 6_000_000_000_000
    b = p.pushback(T, reason="throttled", declared_max=3, base=10, cap=300, jitter=1.0, now_ms=now)
    assert b.until_ms - now == 15_000
    p2 = p.pushback(8, reason="throttled", declared_max=3, base=400, cap=300, jitter=1.0, now_ms=now)
    assert p2.until_ms - now == 300_000


def test_conversations_that_meet_the_same_refusal_make_one_step(p):
    now = 7_000_000_000_000
    first = p.pushback(T, reason="unreachable", declared_max=3, base=1, cap=300, jitter=0, now_ms=now)
    again = [
        p.pushback(T, reason="unreachable", declared_max=3, base=1, cap=300, jitter=0, now_ms=now + 5)
        for _ in range(2)
    ]
    assert first.stepped and not any(b.stepped or b.new for b in again)
    assert {b.until_ms for b in again} == {first.until_ms} and again[0].level == 1


def test_a_quota_waits_for_its_window(p):
    now = 8_000_000_000_000
    b = p.pushback(T, reason="quota", declared_max=3, base=1, cap=300, jitter=0, wait=86400, now_ms=now)
    assert b.until_ms - now == 86_400_000  # a day, not five minutes
    state = p.state(T)
    assert state["reason"] == "quota" and state["held_until"] == b.until_ms


# --- adaptive concurrency ------------------------------------------------------------------------------


def test_a_throttle_halves_the_conversations_and_growth_waits_a_quiet_spell(ctx, p):
    sendq = SendQueue(ctx.redis)
    queued(ctx, T, 30)
    ctx.redis.hset(queue.account(T), mapping={"cap": 8, "probe": 0})
    p.pushback(T, reason="throttled", declared_max=8, base=0.001, cap=0.001, jitter=0, shrink=True)
    assert p.state(T)["cap"] == "4" and p.conversations(T) == 1  # probes first
    time.sleep(0.01)
    [item] = sendq.take("p", "h:", 10, 16, 60_000)
    sendq.done("p", item, success=8)
    assert p.conversations(T) == 4  # the halved number, after its first success
    for _ in range(8):  # a run of successes within GROWTH_QUIET of the throttle: no growth
        [item] = sendq.take("p", "h:", 1, 16, 60_000)
        sendq.done("p", item, success=8)
    assert p.conversations(T) == 4
    ctx.redis.hset(queue.account(T), "calm", 0)  # GROWTH_QUIET seconds later
    for _ in range(4):  # a run of `cap` successes adds one
        [item] = sendq.take("p", "h:", 1, 16, 60_000)
        sendq.done("p", item, success=8)
    assert p.conversations(T) == 5
    assert GROWTH_QUIET >= 10


def test_the_conversations_never_grow_past_what_the_account_declares(ctx, p):
    sendq = SendQueue(ctx.redis)
    queued(ctx, T, 20)
    [item] = sendq.take("p", "h:", 1, 16, 60_000)
    sendq.done("p", item, success=2)
    for _ in range(10):
        for taken in sendq.take("p", "h:", 5, 16, 60_000):
            sendq.done("p", taken, success=2)
    assert p.conversations(T) == 2
    p.configure(T, 1, "")  # lowered by the user: applies at once
    assert p.conversations(T) == 1


# --- a hold's end: no bell rings, so the take says when ----------------------------------------------------


def test_a_take_that_finds_an_account_held_says_when_it_may_be_taken(ctx, p):
    p.configure(T, 3, limits((2, "minute", "messages")))
    ctx.redis.hset(queue.account(T), mapping={"cap": 3, "probe": 0})
    for i in (1, 2, 3):  # connections open, idle in this sender's pool: the take counts the mails
        ctx.redis.zadd(queue.slots(T), {f"~h:{i}": time.time() * 1000 + 60_000})
    queued(ctx, T, 5)
    sendq = SendQueue(ctx.redis)
    assert sendq.take("p", "h:", 2, 16, 60_000).wake is None  # the two of the minute: nothing held
    took = sendq.take("p", "h:", 2, 16, 60_000)
    assert took == [] and 60.0 < took.wake <= 63.01  # the minute, its allowance (2 s), one bucket (1 s)
    assert 60.0 < sendq.take("p", "h:", 2, 16, 60_000).wake <= 63.01  # held: says so again


def test_a_sender_takes_the_mail_of_an_account_whose_hold_ends_while_it_waits(pipe, smtp, p):
    """Before: a hold's end rang no bell, so a sender slept its whole wait (a second) after every
    window of a send limit or step of a backoff, and a mail due now went out up to a second late."""
    user = pipe.user(smtp)
    pipe.enqueue(user)
    pipe.hand_off()
    p.pushback(user.id, reason="throttled", declared_max=3, base=1, cap=300, jitter=0, wait=0.3)
    assert pipe.sender.step(timeout=0.05) == []  # held
    waits, real = [], pipe.sender.sendq.wait
    pipe.sender.sendq.wait = lambda timeout, holder="": waits.append(timeout) or real(timeout, holder)
    assert pipe.sender.step(timeout=5.0) == [Outcome.SENT]
    assert waits and waits[0] <= 0.3  # until the hold's end: not the whole 5 s, nor a bell's second


# --- a rate throttle teaches the account the relay's rate ------------------------------------------------


def test_a_rate_throttle_keeps_the_account_to_what_the_relay_answered_in_the_last_second(ctx, p):
    """Before: after every rate throttle the account sent at full speed again, so a relay that allows 10
    mails a second refused one mail in every second (about one in ten)."""
    ctx.redis.hset(queue.account(T), mapping={"cap": 3, "probe": 0})
    queued(ctx, T, 20)
    sendq = SendQueue(ctx.redis)
    for _ in range(7):  # seven mails the relay answered, within the last second
        [item] = sendq.take("p", "h:", 1, 16, 60_000)
        sendq.done("p", item, success=3)
    b = p.pushback(T, reason="throttled", declared_max=3, base=1, cap=300, jitter=0, learn=True)
    assert p.state(T)["learned"] == "7"
    ctx.redis.zrem(queue.SEND_HOLD, T)  # the backoff step is over; the learned rate holds on
    now = b.until_ms + 1000
    assert [p.acquire(T, 1, 1, now_ms=now + i) for i in range(7)] == [0] * 7
    assert p.acquire(T, 1, 1, now_ms=now + 7) > now  # the eighth waits for the window
    later = now + int(GROWTH_QUIET * 1000) + 2000
    assert p.acquire(T, 1, 1, now_ms=later) == 0 and p.acquire(T, 1, 1, now_ms=later + 1) == 0  # it lapsed


def test_a_throttle_that_is_not_about_the_rate_learns_nothing(ctx, p):
    ctx.redis.hset(queue.account(T), mapping={"cap": 3, "probe": 0})
    queued(ctx, T, 3)
    sendq = SendQueue(ctx.redis)
    [item] = sendq.take("p", "h:", 1, 16, 60_000)
    sendq.done("p", item, success=3)
    p.pushback(T, reason="throttled", declared_max=3, base=1, cap=300, jitter=0)  # a 421 at connect
    assert "learned" not in p.state(T)
