"""Every tenant is bounded: mails not yet final (MAX_PENDING_PER_USER), their bytes
(MAX_PENDING_BYTES_PER_USER), and an enqueue rate with a burst (ENQUEUE_RATE_PER_USER,
ENQUEUE_BURST_PER_USER); past any of them an enqueue is refused whole with a 429 and Retry-After. An
operator raises them for one account (users.max_pending_tasks, … ; `mailq account limits`).

The hot path stays one statement to PostgreSQL: the bounds are checked and counted by one Lua script in
Redis (one round trip), in a hash per tenant (``queue.tenant_key``) that holds

- ``tasks``, ``bytes``: an upper estimate of the tenant's pending mails and their content bytes. Admission
  adds to it atomically, so two requests cannot both take the last place. Nothing subtracts when a mail
  is sent: when the estimate reaches a limit, the exact figures are counted again from PostgreSQL (at most
  once per PENDING_RECOUNT_SECONDS per tenant, so a tenant at its limit costs one bounded count per
  interval, not one per request);
- ``adm``, ``admb``: everything admitted so far, so a recount keeps what was admitted while it counted;
  and beside the hash, a sorted set of the admissions not yet stored (``queue.tenant_inflight_key``:
  added by the admission, removed in the round trip that pushes the stored mail's envelope), so a recount
  also keeps what was admitted before it began but committed after PostgreSQL's snapshot;
- ``tokens``, ``at``: the rate's bucket, refilled by Redis's own clock (one clock for every API pod);
- ``gen``: the user's token generation, so a revoked token is refused before it spends the bucket;
- ``o_tasks``, ``o_bytes``, ``o_rate``, ``o_burst``: the operator's overrides ("" where none).

PostgreSQL is the truth: a missing hash (Redis restarted, or the tenant idle for TENANT_TTL) is rebuilt
from it with exact counts. What the bound guarantees: no tenant is ever admitted past a limit while its
hash lives (admission is one atomic script; a recount only ever over-estimates). Only a rebuild after
Redis lost the hash can miss what was in flight at that moment (admitted, not yet committed): at most the
mails of the enqueue requests then in flight (each at most MAX_BATCH). When Redis cannot be reached the
bounds are not enforced (the enqueue goes on, as its push does; a warning is logged): a Redis outage must
not stop every tenant's mail.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.errors import RateLimited, Unauthorized, ValidationFailed
from shared.models import PENDING_SQL_LIST

log = logging.getLogger("mailq.bounds")

REVOKED = "The token was revoked (the password was changed, or every session was logged out); log in again."
TENANT_TTL_MS = 24 * 3600 * 1000  # an idle tenant's hash expires; the next enqueue rebuilds it exactly
# An admission not settled after this long (its request died between admission and push) stops counting
# as in flight: longer than any enqueue request may take (the functions' timeoutSeconds, 30).
IN_FLIGHT_MS = 120 * 1000

# The exact figures: the user's mails not yet final (the partial index tasks_user_pending_id) and the
# bytes of their content (text, HTML, attachments), with the user's generation and overrides.
_COUNT_SQL = sa.text(
    f"""
    SELECT u.token_generation, u.max_pending_tasks, u.max_pending_bytes, u.enqueue_rate, u.enqueue_burst,
           p.tasks, p.bytes
      FROM users AS u,
           LATERAL (SELECT count(*) AS tasks,
                           COALESCE(sum(COALESCE(octet_length(t.body), 0) + COALESCE(octet_length(c.html), 0)
                                        + COALESCE(octet_length(c.attachment_data), 0)), 0) AS bytes
                      FROM tasks AS t LEFT JOIN task_contents AS c ON c.task_id = t.id
                     WHERE t.user_id = u.id AND t.status IN ({PENDING_SQL_LIST})) AS p
     WHERE u.id = :user_id
    """  # noqa: S608 - PENDING_SQL_LIST is a constant
)

_NOW_MS = "local clock = redis.call('TIME'); local now = clock[1] * 1000 + math.floor(clock[2] / 1000)"

# KEYS[1] the tenant's hash, KEYS[2] its admissions in flight. ARGV: count, bytes, generation (-1: none to
# check), the deployment's max tasks, max bytes, rate (mails/s), burst, the hash's TTL (ms), the
# admission's name in KEYS[2] ("count:bytes:id"), how long it may stay in flight (ms).
_ADMIT = f"""
local h = redis.call('HMGET', KEYS[1], 'tasks', 'bytes', 'tokens', 'at', 'gen',
                     'o_tasks', 'o_bytes', 'o_rate', 'o_burst')
if not h[1] then return {{'seed'}} end
local gen = tonumber(ARGV[3])
if gen >= 0 and tonumber(h[5]) ~= gen then return {{'revoked'}} end
local n, b = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_tasks = tonumber(h[6]) or tonumber(ARGV[4])
local max_bytes = tonumber(h[7]) or tonumber(ARGV[5])
local rate = tonumber(h[8]) or tonumber(ARGV[6])
local burst = tonumber(h[9]) or tonumber(ARGV[7])
{_NOW_MS}
local tokens = math.min(burst, tonumber(h[3]) + math.max(0, now - tonumber(h[4])) * rate / 1000)
if n > burst then return {{'burst', tostring(burst)}} end
if tokens < n then
  return {{'rate', tostring(math.ceil((n - tokens) * 1000 / rate)), tostring(rate), tostring(burst)}}
end
local tasks, bytes = tonumber(h[1]), tonumber(h[2])
if tasks + n > max_tasks then return {{'tasks', tostring(tasks), tostring(max_tasks)}} end
if bytes + b > max_bytes then return {{'bytes', tostring(bytes), tostring(max_bytes)}} end
redis.call('HSET', KEYS[1], 'tasks', tasks + n, 'bytes', bytes + b, 'tokens', tostring(tokens - n), 'at', now)
redis.call('HINCRBY', KEYS[1], 'adm', n)
redis.call('HINCRBY', KEYS[1], 'admb', b)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[10]), ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[10])
return {{'ok'}}
"""

# Rebuilds a missing hash from PostgreSQL's figures (only if still missing). ARGV: tasks, bytes,
# generation, the four overrides ("" for none), the bucket's tokens (a full burst), the TTL (ms).
_SEED = f"""
if redis.call('HEXISTS', KEYS[1], 'tasks') == 1 then return 0 end
{_NOW_MS}
redis.call('HSET', KEYS[1], 'tasks', ARGV[1], 'bytes', ARGV[2], 'gen', ARGV[3], 'o_tasks', ARGV[4],
           'o_bytes', ARGV[5], 'o_rate', ARGV[6], 'o_burst', ARGV[7], 'tokens', ARGV[8], 'at', now,
           'adm', 0, 'admb', 0, 'recount_at', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[9])
return 1
"""

# A recount may begin when the last one is PENDING_RECOUNT_SECONDS (ARGV[1], ms) old: it is marked as
# begun, and it returns what was admitted so far and what is in flight now (admitted, maybe not yet
# committed: PostgreSQL's snapshot may not show it); else how long to wait (ms).
_RECOUNT_BEGIN = f"""
local h = redis.call('HMGET', KEYS[1], 'recount_at', 'adm', 'admb', 'tasks')
if not h[4] then return {{'seed'}} end
{_NOW_MS}
if now < tonumber(h[1]) then return {{'wait', tostring(tonumber(h[1]) - now)}} end
redis.call('HSET', KEYS[1], 'recount_at', now + tonumber(ARGV[1]))
local n, b = 0, 0
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  local count, size = string.match(name, '^(%d+):(%d+):')
  n, b = n + tonumber(count), b + tonumber(size)
end
return {{'go', h[2], h[3], tostring(n), tostring(b)}}
"""

# PostgreSQL's figures (ARGV[3], ARGV[4]), plus what was in flight when the recount began (ARGV[5],
# ARGV[6]: counted twice if it committed before the snapshot, an over-estimate, never under), plus what
# was admitted since it began (the hash's adm and admb against ARGV[1], ARGV[2]).
_RECOUNT_END = """
local h = redis.call('HMGET', KEYS[1], 'adm', 'admb', 'tasks')
if not h[3] then return 0 end
redis.call('HSET', KEYS[1],
           'tasks', tonumber(ARGV[3]) + tonumber(ARGV[5]) + tonumber(h[1]) - tonumber(ARGV[1]),
           'bytes', tonumber(ARGV[4]) + tonumber(ARGV[6]) + tonumber(h[2]) - tonumber(ARGV[2]))
return 1
"""

# The stored mails' envelopes pushed (ARGV[2..], to KEYS[1]) and the admission settled (ARGV[1], out of
# KEYS[2]) in one round trip: enqueue's push costs what it cost before the bounds.
_PUSH_AND_SETTLE = """
if #ARGV > 1 then redis.call('LPUSH', KEYS[1], unpack(ARGV, 2)) end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Fields changed in place when the hash exists (a new token generation, an operator's new overrides);
# deleting it instead would refill the bucket, and a tenant could do that at will (logout-all).
_UPDATE = """
if redis.call('HEXISTS', KEYS[1], 'tasks') == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """The bounds of one account: its overrides where set, the deployment's elsewhere."""

    max_tasks: int
    max_bytes: int
    rate: float
    burst: int


def limits_of(settings: Settings, row: Any) -> Limits:
    """The effective limits for a users row (with max_pending_tasks, … ; None: the deployment's)."""
    return Limits(
        row.max_pending_tasks if row.max_pending_tasks is not None else settings.max_pending_per_user,
        row.max_pending_bytes if row.max_pending_bytes is not None else settings.max_pending_bytes_per_user,
        row.enqueue_rate if row.enqueue_rate is not None else settings.enqueue_rate_per_user,
        row.enqueue_burst if row.enqueue_burst is not None else settings.enqueue_burst_per_user,
    )


def count_pending(engine: Engine, user_id: int) -> Any:
    """The user's exact pending mails and bytes, generation and overrides; None when there is no user."""
    with engine.connect() as conn:
        return conn.execute(_COUNT_SQL, {"user_id": user_id}).one_or_none()


@dataclass(frozen=True)
class Ticket:
    """An admission, in flight until ``settle`` (after its mails are stored, or not)."""

    user_id: int
    name: str


def admit(
    settings: Settings, engine: Engine, client: redis.Redis, user_id: int, generation: int | None,
    count: int, size: int,
) -> Ticket | None:  # fmt: skip
    """Count ``count`` mails of ``size`` content bytes in all together against the tenant's bounds, or
    refuse them all: RateLimited (429, Retry-After) past a bound, Unauthorized for a revoked token. The
    ticket is to be settled once the insert committed (or failed); None when nothing needs settling."""
    ticket = Ticket(user_id, f"{count}:{size}:{uuid.uuid4().hex}")
    try:
        verdict = _run_admit(settings, client, ticket, generation, count, size)
        if verdict[0] == "seed" and _seed(settings, engine, client, user_id):
            verdict = _run_admit(settings, client, ticket, generation, count, size)
        if verdict[0] in ("tasks", "bytes"):
            waited = _recount(settings, engine, client, user_id)
            if waited is None:
                verdict = _run_admit(settings, client, ticket, generation, count, size)
            else:
                verdict = [*verdict, waited]
    except redis.RedisError as exc:
        _warn_unenforced(exc)
        return None
    _judge(settings, verdict, count)
    return ticket if verdict[0] == "ok" else None


def push_and_settle(client: redis.Redis, list_key: str, envelopes: list[bytes], ticket: Ticket) -> None:
    """Push the stored mails' envelopes and end the admission's flight in one round trip: its mails are in
    PostgreSQL now (or nothing was stored), where a recount sees them."""
    keys = [list_key, queue.tenant_inflight_key(ticket.user_id)]
    _script(client, _PUSH_AND_SETTLE)(keys=keys, args=[ticket.name, *envelopes])


def _run_admit(settings, client, ticket: Ticket, generation, count, size) -> list[str]:
    s = settings
    args = [count, size, -1 if generation is None else generation, s.max_pending_per_user,
            s.max_pending_bytes_per_user, repr(float(s.enqueue_rate_per_user)), s.enqueue_burst_per_user,
            TENANT_TTL_MS, ticket.name, IN_FLIGHT_MS]  # fmt: skip
    keys = [queue.tenant_key(ticket.user_id), queue.tenant_inflight_key(ticket.user_id)]
    raw = _script(client, _ADMIT)(keys=keys, args=args)
    return [v.decode() if isinstance(v, bytes) else str(v) for v in raw]


def _seed(settings: Settings, engine: Engine, client: redis.Redis, user_id: int) -> bool:
    """Rebuild the tenant's hash from PostgreSQL; False when the user does not exist."""
    row = count_pending(engine, user_id)
    if row is None:
        return False
    limits = limits_of(settings, row)
    overrides = [row.max_pending_tasks, row.max_pending_bytes, row.enqueue_rate, row.enqueue_burst]
    args = [row.tasks, row.bytes, row.token_generation, *("" if v is None else v for v in overrides)]
    _script(client, _SEED)(keys=[queue.tenant_key(user_id)], args=[*args, limits.burst, TENANT_TTL_MS])
    return True


def _recount(settings: Settings, engine: Engine, client: redis.Redis, user_id: int) -> float | None:
    """Count the tenant's pending mails again if its last count is old enough: None when it did, else
    the seconds until it may."""
    keys = [queue.tenant_key(user_id), queue.tenant_inflight_key(user_id)]
    interval_ms = int(settings.pending_recount_seconds * 1000)
    begun = [v.decode() for v in _script(client, _RECOUNT_BEGIN)(keys=keys, args=[interval_ms])]
    if begun[0] != "go":
        return int(begun[1]) / 1000 if begun[0] == "wait" else settings.pending_recount_seconds
    row = count_pending(engine, user_id)
    if row is None:
        return settings.pending_recount_seconds
    args = [begun[1], begun[2], row.tasks, row.bytes, begun[3], begun[4]]
    _script(client, _RECOUNT_END)(keys=keys[:1], args=args)
    return None


def _judge(settings: Settings, verdict: list, count: int) -> None:
    kind = verdict[0]
    if kind == "ok" or kind == "seed":  # "seed": no such user; the insert itself answers that
        return
    if kind == "revoked":
        raise Unauthorized(
            "The token was revoked (the password was changed, or every session was logged out)."
        )
    if kind == "burst":
        raise ValidationFailed(
            {"tasks": f"holds {count} mails, more than this account may enqueue at once ({verdict[1]})"}
        )
    if kind == "rate":
        wait, rate, burst = int(verdict[1]) / 1000, float(verdict[2]), int(verdict[3])
        raise RateLimited(
            _seconds(wait),
            f"This account may enqueue {rate:g} mails per second (bursts of {burst}); nothing was stored.",
            limit="enqueue_rate",
        )
    current, limit = int(float(verdict[1])), int(float(verdict[2]))
    wait = verdict[3] if len(verdict) > 3 and verdict[3] is not None else settings.pending_recount_seconds
    what = "mails not yet sent or cancelled" if kind == "tasks" else "bytes of mail not yet sent or cancelled"
    raise RateLimited(
        _seconds(wait),
        f"This account holds about {current} {what}; its limit is {limit} and this request would add more. "
        "Nothing was stored; try again when some have been sent.",
        limit="pending_tasks" if kind == "tasks" else "pending_bytes",
    )


_scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _script(client: redis.Redis, source: str) -> Any:
    """The script registered once per client (its SHA-1 is computed once, then EVALSHA)."""
    registered = _scripts.get(client)
    if registered is None:
        registered = _scripts[client] = {}
    script = registered.get(source)
    if script is None:
        script = registered[source] = client.register_script(source)
    return script


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


_last_warning = 0.0


def _warn_unenforced(exc: Exception) -> None:
    """At most one warning a minute per process while Redis is out of reach."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning > 60:
        _last_warning = now
        log.warning("tenant bounds not enforced: Redis cannot be reached (%s)", type(exc).__name__)


def update(client: redis.Redis, user_id: int, **fields: Any) -> None:
    """Change fields of the tenant's hash in place, if it exists (``gen``, ``o_tasks``, …; None: "")."""
    args = [v for name, value in fields.items() for v in (name, "" if value is None else value)]
    _script(client, _UPDATE)(keys=[queue.tenant_key(user_id)], args=args)
