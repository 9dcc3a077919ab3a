"""The fair queue's Lua scripts (``shared.fairqueue`` runs them): each operation is one script, so it
runs atomically in Redis and keeps the queue's invariant (a tenant is in the ring exactly when its
queue is not empty and it is not paused). The take consults each account's pace (``shared.pace``).
"""

from __future__ import annotations

from shared import pace, queue

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
ROUTE = (
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

# take(): up to count envelopes, fairly, each with a slot; a flat list: the number of tenants a full
# send-limit window held back, in how many ms the first held tenant may be taken (-1: none was held),
# then (tenant, envelope, holder, reused connection) for each envelope taken.
# args: ring, paused, processing, bell keys, then queue prefix, slots prefix, count, cap, slot ttl (ms),
# holder prefix, max scan, then the pace's keys (shared.pace; '' for a queue without: the webhooks').
# ``cap`` is the conversations each tenant may have; with a pace it is the ceiling of the account's own.
_TAKE_FN = (
    pace.LUA
    + """
local function group_slots(group, tenant, now)
  local owner = redis.call('HGET', group[1], tenant)
  if not owner then return nil end
  local g = group[2] .. owner
  redis.call('ZREMRANGEBYSCORE', g, '-inf', now)
  return g
end
-- Whether a tenant's slots are full for this taker, and the taker's idle connection to reuse if any.
-- A slot is an open connection: a busy one (member: holder) carries a conversation, an idle one
-- (member: '~' .. holder prefix .. connection id, parked by done()) waits in a sender's pool for the
-- next. At most ``allowed`` conversations at once, and no new connection while the account's open
-- ones (idle included, across every sender) are at ``allowed``: a taker with an idle connection of its
-- own reuses it. A tenant full only of other senders' idle connections wakes those senders (their
-- own bells), the ones that can take it.
local function slots_full(s, allowed, sockets, holder_prefix, bell, bell_max)
  local n = redis.call('ZCARD', s)
  if not sockets or n == 0 then return n >= allowed, nil end
  local busy, own, others = 0, nil, {}
  local mine = '~' .. holder_prefix
  for _, m in ipairs(redis.call('ZRANGE', s, 0, -1)) do
    if string.sub(m, 1, 1) ~= '~' then
      busy = busy + 1
    elseif string.sub(m, 1, #mine) == mine then
      own = own or m
    else
      local sid = string.match(m, '^~(.+):[^:]*$')
      if sid then others[sid] = true end
    end
  end
  if busy >= allowed then return true, nil end
  if own then return false, own end
  if n < allowed then return false, nil end
  for sid in pairs(others) do
    local b = bell .. ':' .. sid
    redis.call('RPUSH', b, '1')
    redis.call('LTRIM', b, -bell_max, -1)
    redis.call('PEXPIRE', b, 60000)
  end
  return true, nil
end
local function take(ring, paused, processing, bell, qp, sp, count, cap, ttl, holder_prefix, max_scan,
                    hold, ap, lp, group)
local bell_max = BELL_MAX_LUA
local now = pace_now('')
local out = {0, -1}  -- then: in how many ms the first held tenant seen may be taken (-1: none held)
local function soon(at)
  local ms = math.max(1, at - now)
  if out[2] < 0 or ms < out[2] then out[2] = ms end
end
local taken, scanned, misses = 0, 0, 0
local size = redis.call('LLEN', ring)
while taken < count and scanned < max_scan and size > 0 and misses < size do
  local tenant = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  scanned = scanned + 1
  local q = qp .. tenant
  local held, limits, allowed = 0, nil, cap
  if redis.call('SISMEMBER', paused, tenant) == 1 or redis.call('ZCARD', q) == 0 then
    redis.call('LREM', ring, -1, tenant)  -- does not belong in the ring (it was just moved to the tail)
    size = size - 1
  else
    if ap ~= '' then
      held = tonumber(redis.call('ZSCORE', hold, tenant) or '0')
      if held > 0 and held <= now then
        redis.call('ZREM', hold, tenant)  -- a hold that has passed
        held = 0
      end
      local a = redis.call('HMGET', ap .. tenant, 'cap', 'probe', 'limits', 'learned', 'learned_until')
      if a[2] == '1' or not a[1] then
        allowed = 1  -- new, resumed or back from a backoff: one conversation until a success
      else
        allowed = math.min(tonumber(a[1]), cap)
      end
      limits = pace_limits(a[3], a[4], a[5], now)
      if limits == '' then limits = nil end
    end
    local s = sp .. tenant
    redis.call('ZREMRANGEBYSCORE', s, '-inf', now)  -- slots of killed senders expire here
    local g = group and group_slots(group, tenant, now)
    local full, own = true, nil
    if held > now then
      soon(held)  -- and nobody is woken for it: it cannot be taken before then
    else
      full, own = slots_full(s, allowed, ap ~= '', holder_prefix, bell, bell_max)
    end
    if full or (g and redis.call('ZCARD', g) >= group[3]) then
      -- held, or every conversation (or connection) this account (or its owner: group) may have is
      -- busy: its turn passes
      misses = misses + 1
    else
      -- A declared send limit counts the mail now when it goes over an open connection; one that needs
      -- a new connection is counted once that is open (shared.delivery.relay): the relay counts its
      -- MAIL FROM, and the connection's opening would come between.
      local free = 0
      if limits and own then free = limits_take(lp .. tenant .. ':', limits, now, 1, 1) end
      if free ~= 0 then
        if free > 0 then
          soon(free)
          redis.call('ZADD', hold, 'GT', free, tenant)
          redis.call('HSET', ap .. tenant, 'hold', 'limit', 'limit_until', free)
        end
        out[1] = out[1] + 1
        misses = misses + 1  -- its send limit is reached: held until its window has room
      else
        local raw = redis.call('ZPOPMIN', q)[1]
        local holder = holder_prefix .. raw
        local reuse = ''
        if own then  -- the conversation goes over this sender's idle connection: the slot changes hands
          redis.call('ZREM', s, own)
          reuse = string.sub(own, #holder_prefix + 2)
        end
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
        out[#out + 1] = reuse
        misses = 0
        if redis.call('ZCARD', q) == 0 then
          redis.call('LREM', ring, -1, tenant)
          size = size - 1
        end
      end
    end
  end
end
if size == 0 or (taken < count and misses >= size) then
  -- Nothing is takeable by anyone now (every tenant with mail is at its cap or held, or none has mail),
  -- so the tokens rung before this moment wake nobody usefully: each would cost a sender a wake-up and
  -- an empty take (with one tenant at its cap that was more Redis calls than mails). A slot coming
  -- free or new mail rings again; a hold that passes is seen by the next take (a sender waits at most
  -- a bell's timeout for one).
  redis.call('DEL', bell)
end
return out
end
"""
).replace("BELL_MAX_LUA", str(queue.BELL_MAX))
_TAKE_ARGS = (
    "ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]),"
    " ARGV[8], ARGV[9], ARGV[10]"
)
# KEYS: ring, paused, processing, bell.  ARGV: as take()'s after the keys, then (optional) a group cap:
# owners hash, group slots prefix, cap (the webhook worker's per-user cap: a tenant there is an endpoint,
# its group the user who owns it).
TAKE = (
    _TAKE_FN
    + "local group = ARGV[13] and {ARGV[11], ARGV[12], tonumber(ARGV[13])}\n"
    + f"return take(KEYS[1], KEYS[2], KEYS[3], KEYS[4], {_TAKE_ARGS}, group)"
)

# KEYS: owners hash, bell.  ARGV: group slots prefix, tenant, holder, owner ('' when unknown), bell max.
# Lets go of a taken envelope's group slot (before done() or give_back()), records the tenant's owner
# when the caller knows it, and wakes a taker when a slot came free (the group's other tenants may wait).
RELEASE_GROUP = """
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

# Parks a connection that went back to a sender's pool: its slot stays taken, as an idle one (see
# slots_full), until the sender reuses or closes it, or the sender dies and it expires.
_PARK = """
local function park(slots, member, ttl)
  if member == '' then return end
  local t = redis.call('TIME')
  redis.call('ZADD', slots, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl, member)
  if redis.call('PTTL', slots) < ttl then redis.call('PEXPIRE', slots, ttl) end
end
"""

# KEYS: processing, slots, queue, bell.  ARGV: envelope, holder, bell max, then for a success the
# account's key and its declared maximum ('' when the conversation's end says nothing of the relay),
# then the idle connection to park ('' for none) and its ttl (ms): the busy slot becomes an idle one.
# Returns 1 when the success ended the account's backoff episode.
DONE = (
    pace.LUA
    + _PARK
    + """
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
park(KEYS[2], ARGV[6], tonumber(ARGV[7]))
if redis.call('ZCARD', KEYS[3]) > 0 then  -- a slot came free for a tenant with mail: wake a sender
  redis.call('RPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[3]), -1)
end
if ARGV[4] ~= '' then return pace_success(ARGV[4], tonumber(ARGV[5]), pace_now('')) end
return 0
"""
)

# done() and take() in one step, for a conversation thread that wants its next envelope: the slot it
# frees is taken again without a wake-up token and a dispatcher's round trip. The bell still rings when
# the finished envelope's tenant has mail and a free slot after the take (it took another tenant's).
# KEYS: ring, paused, processing, bell, slots, queue.  ARGV: as take()'s, then envelope, holder, bell max,
# the success's account key and declared maximum, and the connection to park and its ttl (as done()'s).
# The take's list comes back with whether the success ended a backoff episode put in front.
DONE_TAKE = (
    _TAKE_FN
    + _PARK
    + f"""
local processing, bell, slots, q = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
redis.call('LREM', processing, 1, ARGV[11])
redis.call('ZREM', slots, ARGV[12])
park(slots, ARGV[16], tonumber(ARGV[17]))
local ended = 0
if ARGV[14] ~= '' then ended = pace_success(ARGV[14], tonumber(ARGV[15]), pace_now('')) end
local out = take(KEYS[1], KEYS[2], processing, bell, {_TAKE_ARGS})
if redis.call('ZCARD', q) > 0 and redis.call('ZCARD', slots) < tonumber(ARGV[4]) then
  redis.call('RPUSH', bell, '1')
  redis.call('LTRIM', bell, -tonumber(ARGV[13]), -1)
end
table.insert(out, 1, ended)
return out
"""
)

# KEYS: processing, slots, queue, ring, paused, bell.  ARGV: envelope, holder, score, tenant,
# bell max, pause (1 or 0).  Puts an envelope we hold back in its tenant's queue (only if it is still
# ours: one the sweep already returned is not put back twice).
GIVE_BACK = (
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
RESUME = """
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('LREM', KEYS[1], 0, ARGV[1])
if redis.call('ZCARD', KEYS[3]) > 0 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[2]), -1)
end
"""

# KEYS: slots, queue, bell.  ARGV: member, ttl (ms), bell max, closed (1 or 0).  Parks an idle connection
# (its slot taken as an idle one), or, closed, lets go of it: a slot came free, so a tenant with mail
# wakes a sender.
PARK = (
    _PARK
    + """
if ARGV[4] == '0' then
  park(KEYS[1], ARGV[1], tonumber(ARGV[2]))
  return 1
end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and redis.call('ZCARD', KEYS[2]) > 0 then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
  return 1
end
return 0
"""
)
