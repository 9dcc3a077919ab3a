"""The senders' fair queue in Redis: a queue per tenant, a ring of tenants, slots per account, pauses.

One FIFO for everybody let a tenant's 20,000-mail burst delay another tenant's single mail and let
one slow server occupy every sender. Instead (keys in ``shared.queue``):

- each tenant (user) has its own queue, a sorted set of envelopes scored by task id: FIFO per
  tenant, and adding an envelope that is already waiting changes nothing (a sweep that re-pushes a
  long backlog does not grow it);
- the ring lists the tenants with mail waiting, each once; a sender takes one envelope from the
  tenant at the head and moves that tenant to the tail, so every tenant with waiting mail gets its
  turn;
- a tenant's slots (a sorted set of holders scored by expiry) allow at most
  ``SMTP_MAX_CONNECTIONS_PER_ACCOUNT`` conversations at once across all senders; a slot whose
  sender was killed expires by itself, so a dead sender never keeps one;
- a paused tenant (its SMTP login was refused) keeps its queue but leaves the ring until resumed.

Every operation is one Lua script, so it runs atomically, and each keeps this invariant: **a tenant
is in the ring exactly when its queue is not empty and it is not paused.** A taken envelope moves
into the sender's processing list in the same script, so a crash never loses it (the sweep returns
a dead sender's list to ``mailq:tasks``, and the consumer routes it again).

The webhook worker uses the same queue under its own keys (``queue.WEBHOOK_KEYS``): a tenant there is
an endpoint, and its slots cap the requests in flight to one receiver.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from shared import queue

MAX_SCAN = 256  # tenants one take looks at, at most: bounds the script's run time with many tenants

# Shared by the scripts: ring the bell once per newly waiting envelope (at most BELL_MAX tokens).
_BELL = """
local function ring_bell(bell, tokens, bell_max)
  if tokens > 0 then
    local args = {}
    for k = 1, math.min(tokens, bell_max) do args[k] = '1' end
    redis.call('RPUSH', bell, unpack(args))
    redis.call('LTRIM', bell, -bell_max, -1)
  end
end
local function enqueue(ring, paused, q, tenant, score, raw)
  if redis.call('ZADD', q, 'NX', score, raw) == 1 then
    if redis.call('ZCARD', q) == 1 and redis.call('SISMEMBER', paused, tenant) == 0 then
      redis.call('RPUSH', ring, tenant)
    end
    return 1
  end
  return 0
end
"""

# KEYS: ring, paused, bell, processing.  ARGV: queue prefix, bell max, n, n x (tenant, score, raw),
# then envelopes to remove from the processing list (the consumer's hand-off and release, at once).
_ROUTE = (
    _BELL
    + """
local ring, paused, bell, processing = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, bell_max, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local added, i = 0, 4
for _ = 1, n do
  added = added + enqueue(ring, paused, prefix .. ARGV[i], ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
for j = i, #ARGV do
  redis.call('LREM', processing, 1, ARGV[j])
end
ring_bell(bell, added, bell_max)
return added
"""
)

# take(): up to count envelopes, fairly, each with a slot; a flat list of (tenant, envelope, holder).
# args: ring, paused, processing, bell keys, then queue prefix, slots prefix, count, cap, slot ttl (ms),
# holder prefix, max scan, and a group cap or nil: {owners hash, group slots prefix, cap} (the webhook
# worker's per-user cap: a tenant there is an endpoint, its group the user who owns it).
_TAKE_FN = """
local function group_slots(group, tenant, now)
  local owner = redis.call('HGET', group[1], tenant)
  if not owner then return nil end
  local g = group[2] .. owner
  redis.call('ZREMRANGEBYSCORE', g, '-inf', now)
  return g
end
local function take(ring, paused, processing, bell, qp, sp, count, cap, ttl, holder_prefix, max_scan, group)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local taken, scanned, misses = 0, 0, 0
local size = redis.call('LLEN', ring)
while taken < count and scanned < max_scan and size > 0 and misses < size do
  local tenant = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  scanned = scanned + 1
  local q = qp .. tenant
  if redis.call('SISMEMBER', paused, tenant) == 1 or redis.call('ZCARD', q) == 0 then
    redis.call('LREM', ring, -1, tenant)  -- does not belong in the ring (it was just moved to the tail)
    size = size - 1
  else
    local s = sp .. tenant
    redis.call('ZREMRANGEBYSCORE', s, '-inf', now)  -- slots of killed senders expire here
    local g = group and group_slots(group, tenant, now)
    if redis.call('ZCARD', s) >= cap or (g and redis.call('ZCARD', g) >= group[3]) then
      misses = misses + 1  -- every conversation this account (or its owner) may have is busy: its turn passes
    else
      local raw = redis.call('ZPOPMIN', q)[1]
      local holder = holder_prefix .. raw
      redis.call('ZADD', s, now + ttl, holder)
      redis.call('PEXPIRE', s, ttl)  -- no slot outlives the lease, nor does the set
      if g then
        redis.call('ZADD', g, now + ttl, holder)
        redis.call('PEXPIRE', g, ttl)
      end
      redis.call('LPUSH', processing, raw)
      taken = taken + 1
      out[#out + 1] = tenant
      out[#out + 1] = raw
      out[#out + 1] = holder
      misses = 0
      if redis.call('ZCARD', q) == 0 then
        redis.call('LREM', ring, -1, tenant)
        size = size - 1
      end
    end
  end
end
if size == 0 or (taken < count and misses >= size) then
  -- Nothing is takeable by anyone now (every tenant with mail is at its cap, or none has mail), so
  -- the tokens rung before this moment wake nobody usefully: each would cost a sender a wake-up and
  -- an empty take (with one tenant at its cap that was more Redis calls than mails). A slot coming
  -- free or new mail rings again.
  redis.call('DEL', bell)
end
return out
end
"""
_TAKE_ARGS = (
    "ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])"
)
# KEYS: ring, paused, processing, bell.  ARGV: as take()'s after the keys, then (optional) owners hash,
# group slots prefix, group cap.
_TAKE = (
    _TAKE_FN
    + "local group = ARGV[10] and {ARGV[8], ARGV[9], tonumber(ARGV[10])}\n"
    + f"return take(KEYS[1], KEYS[2], KEYS[3], KEYS[4], {_TAKE_ARGS}, group)"
)

# KEYS: owners hash, bell.  ARGV: group slots prefix, tenant, holder, owner ('' when unknown), bell max.
# Lets go of a taken envelope's group slot (before done() or give_back()), records the tenant's owner
# when the caller knows it, and wakes a taker when a slot came free (the group's other tenants may wait).
_RELEASE_GROUP = """
local owner = ARGV[4]
if owner ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2], owner)
else
  owner = redis.call('HGET', KEYS[1], ARGV[2])
  if not owner then return 0 end
end
if redis.call('ZREM', ARGV[1] .. owner, ARGV[3]) == 1 then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
  return 1
end
return 0
"""

# KEYS: processing, slots, queue, bell.  ARGV: envelope, holder, bell max.
_DONE = """
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('ZCARD', KEYS[3]) > 0 then  -- a slot came free for a tenant with mail: wake a sender
  redis.call('RPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[3]), -1)
end
"""

# done() and take() in one step, for a conversation thread that wants its next envelope: the slot it
# frees is taken again without a wake-up token and a dispatcher's round trip. The bell still rings when
# the finished envelope's tenant has mail and a free slot after the take (it took another tenant's).
# KEYS: ring, paused, processing, bell, slots, queue.  ARGV: as take()'s, then envelope, holder, bell max.
_DONE_TAKE = (
    _TAKE_FN
    + f"""
local processing, bell, slots, q = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
redis.call('LREM', processing, 1, ARGV[8])
redis.call('ZREM', slots, ARGV[9])
local out = take(KEYS[1], KEYS[2], processing, bell, {_TAKE_ARGS})
if redis.call('ZCARD', q) > 0 and redis.call('ZCARD', slots) < tonumber(ARGV[4]) then
  redis.call('RPUSH', bell, '1')
  redis.call('LTRIM', bell, -tonumber(ARGV[10]), -1)
end
return out
"""
)

# KEYS: processing, slots, queue, ring, paused, bell.  ARGV: envelope, holder, score, tenant,
# bell max, pause (1 or 0).  Puts an envelope we hold back in its tenant's queue (only if it is still
# ours: one the sweep already returned is not put back twice).
_GIVE_BACK = (
    _BELL
    + """
local processing, slots, q, ring, paused, bell = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local raw, holder, score, tenant = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[6] == '1' then
  redis.call('SADD', paused, tenant)
  redis.call('LREM', ring, 0, tenant)
end
redis.call('ZREM', slots, holder)
if redis.call('LREM', processing, 1, raw) == 0 then
  return 0
end
ring_bell(bell, enqueue(ring, paused, q, tenant, score, raw), tonumber(ARGV[5]))
return 1
"""
)

# KEYS: ring, paused, queue, bell.  ARGV: tenant, bell max.
_RESUME = """
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[1], 0, ARGV[1])
if redis.call('ZCARD', KEYS[3]) > 0 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[2]), -1)
end
"""


@dataclass(frozen=True)
class GroupCap:
    """A second cap over tenants that share an owner: at most ``cap`` envelopes taken at once across
    all of an owner's tenants (``owners`` maps tenant -> owner; an unmapped tenant has no group cap)."""

    owners: str
    slots_prefix: str
    cap: int


@dataclass(frozen=True)
class Taken:
    """One envelope a sender took, with the slot it holds for the conversation."""

    tenant: int
    raw: bytes
    holder: str

    @property
    def task_id(self) -> int:
        return queue.decode(self.raw)


class SendQueue:
    """The fair queue's operations on one Redis client (scripts are loaded on first use)."""

    def __init__(self, client: redis.Redis, keys: queue.FairKeys = queue.SENDER_KEYS):
        self.redis = client
        self.keys = keys  # the senders' keys, or the webhook worker's (one queue per endpoint)
        self._route = client.register_script(_ROUTE)
        self._take = client.register_script(_TAKE)
        self._done_take = client.register_script(_DONE_TAKE)
        self._done = client.register_script(_DONE)
        self._give_back = client.register_script(_GIVE_BACK)
        self._resume = client.register_script(_RESUME)
        self._release_group = client.register_script(_RELEASE_GROUP)

    def route(
        self,
        items: Iterable[tuple[int, int, bytes]],
        *,
        processing: str | None = None,
        release: Sequence[bytes] = (),
    ) -> int:
        """Queue (tenant, task id, envelope) triples; an envelope already waiting is not added twice.

        With ``processing``, ``release`` are removed from that list in the same step (the consumer's
        hand-off: never released before it is handed on). Returns how many were newly queued.
        """
        args: list = [self.keys.queue_prefix, queue.BELL_MAX, 0]
        for tenant, task_id, raw in items:
            args += [tenant, task_id, raw]
            args[2] += 1
        if not args[2] and not release:
            return 0
        keys = [self.keys.ready, self.keys.paused, self.keys.bell, processing or self.keys.ready]
        return self._route(keys=keys, args=[*args, *(release if processing else ())])

    def take(
        self, processing: str, holder: str, count: int, cap: int, slot_ms: int, group: GroupCap | None = None
    ) -> list[Taken]:
        """Up to ``count`` envelopes, one per tenant per turn of the ring, each with one of its
        tenant's ``cap`` slots held for ``slot_ms`` (and one of its owner's, with ``group``); moved into
        ``processing`` in the same step."""
        args = [self.keys.queue_prefix, self.keys.slots_prefix, count, cap, slot_ms, holder, MAX_SCAN]
        if group is not None:
            args += [group.owners, group.slots_prefix, group.cap]
        flat = self._take(keys=[self.keys.ready, self.keys.paused, processing, self.keys.bell], args=args)
        return _taken(flat)

    def release_group(self, group: GroupCap, taken: Taken, owner: int | None) -> bool:
        """Let go of ``taken``'s group slot (call it before ``done``/``give_back``); ``owner``, when
        known, is recorded as its tenant's owner for the next take."""
        keys = [group.owners, self.keys.bell]
        args = [group.slots_prefix, taken.tenant, taken.holder, owner or "", queue.BELL_MAX]
        return bool(self._release_group(keys=keys, args=args))

    def done_and_take(
        self, processing: str, taken: Taken, holder: str, count: int, cap: int, slot_ms: int
    ) -> list[Taken]:
        """``done(taken)``, then ``take()``, in one step."""
        keys = [
            self.keys.ready,
            self.keys.paused,
            processing,
            self.keys.bell,
            self.keys.slots(taken.tenant),
            self.keys.queue(taken.tenant),
        ]
        take_args = [self.keys.queue_prefix, self.keys.slots_prefix, count, cap, slot_ms, holder, MAX_SCAN]
        return _taken(self._done_take(keys=keys, args=[*take_args, taken.raw, taken.holder, queue.BELL_MAX]))

    def done(self, processing: str, taken: Taken) -> None:
        """The envelope's work is recorded: let go of it and of its slot."""
        keys = [processing, self.keys.slots(taken.tenant), self.keys.queue(taken.tenant), self.keys.bell]
        self._done(keys=keys, args=[taken.raw, taken.holder, queue.BELL_MAX])

    def give_back(self, processing: str, taken: Taken, task_id: int, *, pause: bool = False) -> bool:
        """Return a taken envelope to its tenant's queue (pausing the tenant first if asked)."""
        keys = [
            processing,
            self.keys.slots(taken.tenant),
            self.keys.queue(taken.tenant),
            self.keys.ready,
            self.keys.paused,
            self.keys.bell,
        ]
        args = [taken.raw, taken.holder, task_id, taken.tenant, queue.BELL_MAX, int(pause)]
        return bool(self._give_back(keys=keys, args=args))

    def pause(self, tenant: int) -> None:
        """Pause a tenant: its queue stays, but it leaves the ring until resumed."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.keys.paused, tenant)
        pipe.lrem(self.keys.ready, 0, tenant)
        pipe.execute()

    def resume(self, tenant: int) -> None:
        """Let a paused tenant's mail be taken again."""
        keys = [self.keys.ready, self.keys.paused, self.keys.queue(tenant), self.keys.bell]
        self._resume(keys=keys, args=[tenant, queue.BELL_MAX])

    def paused(self) -> set[int]:
        return {int(t) for t in self.redis.smembers(self.keys.paused)}

    def wait(self, timeout: float) -> bool:
        """Block until a bell rings (new mail, or a slot came free) or ``timeout`` passes."""
        return self.redis.blpop([self.keys.bell], timeout=timeout) is not None

    def waiting(self, tenant: int) -> int:
        """How many envelopes wait in the tenant's queue."""
        return self.redis.zcard(self.keys.queue(tenant))


def _taken(flat: list) -> list[Taken]:
    return [Taken(int(flat[i]), flat[i + 1], flat[i + 2].decode()) for i in range(0, len(flat), 3)]
