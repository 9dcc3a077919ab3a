"""An account's pace, across every sender: how many conversations it may have, when it may be taken
next, and how much it may send per window. All of it lives in Redis, where every sender's take sees it
(keys in ``shared.queue``); the fair queue's take script (``shared.fairqueue``) runs ``LUA`` for each
tenant it visits. docs/relays.md explains the rules; in short:

- **Holds.** ``mailq:send:hold`` scores each held tenant by the time before which no sender takes its
  mail: a backoff (the relay refused the account) or a full send-limit window. A held tenant keeps its
  place in the ring (so KEDA still sees its mail) and passes its turn, like a tenant at its cap.
- **Backoff** (``pushback``): one step per episode step, however many conversations met the refusal at
  once; the delay grows from ACCOUNT_BACKOFF_BASE, doubling, with up to +50 % jitter, to
  ACCOUNT_BACKOFF_MAX, or is the quota's window when the relay named one; a success ends the episode.
- **Concurrency** (Postfix's destination concurrency feedback, made AIMD): at most ``cap``
  conversations (the declared ``smtp_max_connections`` at most); a throttling reply or a refused
  connection halves it; a new account, one just resumed and one back from a backoff *probe* with one
  conversation until a success; after that, each run of ``cap`` successes adds one, except within
  GROWTH_QUIET seconds of the last pushback (a relay that throttles once per rate window would
  otherwise be ramped straight back into its limit).
- **Declared send limits** (``smtp_send_limits``): up to four sliding windows, each counting messages
  or recipients. Counts are kept in 60 buckets per window and a bucket's mails leave the window only
  when its *last* moment does: never more than ``max`` in any window of ``per`` (what the relay counts),
  at the price of up to 1/60 of the window. The take consumes one message (and one recipient) per mail,
  so a mail over the limit is not even taken; a mail with more recipients asks for the rest after its
  claim (``acquire``).

Times are Redis's clock (``TIME``) in milliseconds, so every sender agrees; tests may pass ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis

from shared import queue

GROWTH_QUIET = 30.0  # seconds after a pushback during which the concurrency does not grow
MAX_WINDOWS = 4
PER = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
COUNTS = {"messages": "m", "recipients": "r"}
BUCKETS = 60  # per window: the limit is exact, early by at most 1/60 of the window
# A mail is counted at its take over an open connection (a new one: once it is open), the relay counts
# its MAIL FROM: a claim and, on a busy machine, some scheduling come between. Each mail stays in
# mailq's window this share of the window longer (at most ALLOWANCE_MAX_MS), so a MAIL FROM that lagged
# its take does not meet the next window's first.
ALLOWANCE_SHARE = 10  # 1/10: 100 ms of a second, 2 s of a minute or longer
ALLOWANCE_MAX_MS = 2000

# Shared by the take script and the standalone scripts below.
LUA = """
local function pace_now(arg)
  if arg and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The declared windows ("max:per_ms:m|r,…"): take k_msg messages and k_rcpt recipients from each, all
-- or nothing. 0: taken; otherwise when they will all have room (ms); -1: never (more than a window's max).
local function limits_take(lp, limits, now, k_msg, k_rcpt)
  local free_at, room = 0, {}
  for spec in string.gmatch(limits, '[^,]+') do
    local mx, per, kind = string.match(spec, '^(%d+):(%d+):(%a)$')
    mx, per = tonumber(mx), tonumber(per)
    local k = k_msg
    if kind == 'r' then k = k_rcpt end
    if mx and k > 0 then
      if k > mx then return -1 end
      local g = math.max(1, math.floor(per / """
LUA += str(BUCKETS)
LUA += """))
      local lag = math.min(math.floor(per / """
LUA += f"{ALLOWANCE_SHARE}), {ALLOWANCE_MAX_MS})"
LUA += """
      local key = lp .. per .. ':' .. kind
      local flat = redis.call('HGETALL', key)
      local sum, ends = 0, {}
      for j = 1, #flat, 2 do
        local leaves = (tonumber(flat[j]) + 1) * g + per + lag  -- its last moment leaves the window
        if leaves <= now then
          redis.call('HDEL', key, flat[j])
        else
          sum = sum + tonumber(flat[j + 1])
          ends[#ends + 1] = {leaves, tonumber(flat[j + 1])}
        end
      end
      if sum + k > mx then
        table.sort(ends, function(a, b) return a[1] < b[1] end)
        local need, at = sum + k - mx, 0
        for _, e in ipairs(ends) do
          need = need - e[2]
          at = e[1]
          if need <= 0 then break end
        end
        if at > free_at then free_at = at end
      end
      room[#room + 1] = {key, g, k, per}
    end
  end
  if free_at > 0 then return free_at end
  for _, r in ipairs(room) do
    redis.call('HINCRBY', r[1], math.floor(now / r[2]), r[3])
    redis.call('PEXPIRE', r[1], r[4] + r[2] + """
LUA += str(ALLOWANCE_MAX_MS)
LUA += """)
  end
  return 0
end
-- The windows a take checks: the declared ones, and while it holds the rate learned from a throttle
-- (one second, counted apart: kind 'l').
local function pace_limits(declared, learned, until_ms, now)
  if learned and tonumber(until_ms or '0') > now then
    local w = learned .. ':1000:l'
    if declared and declared ~= '' then return declared .. ',' .. w end
    return w
  end
  return declared
end
-- A conversation ended with something the relay accepted: probing ends, a backoff episode ends (1),
-- and a run of cap successes adds a conversation (up to maxc) once the last pushback is GROWTH_QUIET old.
local function pace_success(acct, maxc, now)
  local ok = acct .. ':ok'  -- the relay's answers per 100 ms: what a rate throttle learns from
  redis.call('HINCRBY', ok, math.floor(now / 100), 1)
  redis.call('PEXPIRE', ok, 2000)
  local f = redis.call('HMGET', acct, 'cap', 'probe', 'run', 'calm', 'level')
  local cap, ended = tonumber(f[1]), 0
  if f[5] then
    redis.call('HDEL', acct, 'level', 'since', 'until', 'reason')
    ended = 1
  end
  if not cap or cap > maxc then
    cap = maxc
    redis.call('HSET', acct, 'cap', cap)
  end
  if f[2] == '1' then
    redis.call('HSET', acct, 'probe', '0', 'run', '0')
  elseif cap < maxc and now >= (tonumber(f[4]) or 0) then
    local run = (tonumber(f[3]) or 0) + 1
    if run >= cap then
      redis.call('HSET', acct, 'cap', cap + 1, 'run', '0')
    else
      redis.call('HSET', acct, 'run', run)
    end
  end
  return ended
end
"""

# KEYS: account, hold.  ARGV: tenant, now ('' = Redis's), reason, shrink (0/1), base ms, max ms,
# jitter (0..1), wait ms (0: back off as usual), declared max, quiet ms, learn (0/1: a rate throttle),
# the tenant's limit prefix.
# Returns {new episode (0/1), a step taken (0/1), level, since ms, until ms}.
_PUSHBACK = (
    LUA
    + f"local BUCKETS = {BUCKETS}\n"
    + """
local acct, hold, tenant = KEYS[1], KEYS[2], ARGV[1]
local now = pace_now(ARGV[2])
local wait = tonumber(ARGV[8])
local f = redis.call('HMGET', acct, 'level', 'until', 'cap', 'since', 'learned_until', 'learned')
if ARGV[11] == '1' then
  -- A rate throttle: the relay took about what it answered in the last second and no more. Keep to
  -- that for a quiet spell, then try the full speed again (the relay may allow more by then); refused
  -- again meanwhile (the estimate was high: answers come a little after their MAIL FROM), one less.
  local learned = tonumber(f[6] or '0')
  if tonumber(f[5] or '0') > now and learned > 0 then
    learned = math.max(1, learned - 1)
  else
    -- The learned window starts with those answers in it, as the relay's does.
    local flat, from = redis.call('HGETALL', acct .. ':ok'), math.floor((now - 1000) / 100)
    local window, g = ARGV[12] .. '1000:l', math.max(1, math.floor(1000 / BUCKETS))
    redis.call('DEL', window)
    learned = 0
    for j = 1, #flat, 2 do
      local b, n = tonumber(flat[j]), tonumber(flat[j + 1])
      if b > from then
        learned = learned + n
        redis.call('HINCRBY', window, math.floor(b * 100 / g), n)
      end
    end
    redis.call('PEXPIRE', window, 3000)
  end
  if learned > 0 then
    redis.call('HSET', acct, 'learned', learned, 'learned_until', now + tonumber(ARGV[10]))
  end
end
local level, untl = tonumber(f[1]) or 0, tonumber(f[2]) or 0
if untl > now then
  -- Another conversation of this account met the same refusal: the same step of the same episode.
  if wait > 0 and now + wait > untl then
    untl = now + wait
    redis.call('HSET', acct, 'until', untl, 'reason', ARGV[3])
    redis.call('ZADD', hold, 'GT', untl, tenant)
  end
  return {0, 0, level, tonumber(f[4]) or now, untl}
end
level = level + 1
local delay = wait
if delay <= 0 then
  delay = math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ (level - 1))
  delay = math.min(tonumber(ARGV[6]), math.floor(delay * (1 + tonumber(ARGV[7]) / 2)))
end
untl = now + delay
local since = tonumber(f[4])
if level == 1 or not since then since = now end
local cap = tonumber(f[3]) or tonumber(ARGV[9])
if ARGV[4] == '1' then cap = math.max(1, math.floor(cap / 2)) end
redis.call('HSET', acct, 'level', level, 'since', since, 'until', untl, 'reason', ARGV[3], 'cap', cap,
  'probe', '1', 'run', '0', 'calm', now + tonumber(ARGV[10]), 'hold', 'backoff')
redis.call('ZADD', hold, 'GT', untl, tenant)  -- GT: a longer hold (a send limit's) is kept
local new = 0
if level == 1 then new = 1 end
return {new, 1, level, since, untl}
"""
)

# KEYS: account, hold.  ARGV: tenant, declared max, limits ('' = none), resume (0/1).
# The account's declared limits; a resume (new settings) also ends its backoff and probes again.
_CONFIGURE = """
local acct, hold = KEYS[1], KEYS[2]
local maxc = tonumber(ARGV[2])
redis.call('HSET', acct, 'max', maxc)
local cap = tonumber(redis.call('HGET', acct, 'cap'))
if cap and cap > maxc then redis.call('HSET', acct, 'cap', maxc) end
if ARGV[3] == '' then redis.call('HDEL', acct, 'limits') else redis.call('HSET', acct, 'limits', ARGV[3]) end
if ARGV[4] == '1' then
  redis.call('HDEL', acct, 'level', 'since', 'until', 'reason', 'run')
  redis.call('HSET', acct, 'probe', '1')
  redis.call('ZREM', hold, ARGV[1])
end
"""

# KEYS: hold, account.  ARGV: limit prefix (with the tenant), tenant, now, messages, recipients.
# The rest of a mail's recipients after its claim; a full window holds the tenant until it has room.
_ACQUIRE = (
    LUA
    + """
local now = pace_now(ARGV[3])
local a = redis.call('HMGET', KEYS[2], 'limits', 'learned', 'learned_until')
local limits = pace_limits(a[1], a[2], a[3], now)
if not limits or limits == '' then return 0 end
local free = limits_take(ARGV[1], limits, now, tonumber(ARGV[4]), tonumber(ARGV[5]))
if free > 0 then
  redis.call('ZADD', KEYS[1], 'GT', free, ARGV[2])
  redis.call('HSET', KEYS[2], 'hold', 'limit', 'limit_until', free)
end
return free
"""
)


@dataclass(frozen=True)
class Pushback:
    """What one refusal did to the account: ``new`` when it started a backoff episode, ``stepped``
    when it took the backoff a step further (not when another conversation got there first)."""

    new: bool
    stepped: bool
    level: int
    since_ms: int
    until_ms: int


class Pace:
    """The scripts on one Redis client."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._pushback = client.register_script(_PUSHBACK)
        self._configure = client.register_script(_CONFIGURE)
        self._acquire = client.register_script(_ACQUIRE)

    def pushback(
        self,
        tenant: int,
        *,
        reason: str,
        declared_max: int,
        base: float,
        cap: float,
        jitter: float,
        shrink: bool = False,
        wait: float | None = None,
        learn: bool = False,
        now_ms: int | None = None,
    ) -> Pushback:
        """The relay refused the account: hold it (back off, or wait ``wait`` seconds), probe again
        after, and halve its concurrency when ``shrink``. Concurrent refusals make one step.
        ``learn``: a rate throttle; the account keeps to what the relay answered in the last second
        for GROWTH_QUIET seconds."""
        args = [
            tenant,
            "" if now_ms is None else now_ms,
            reason,
            int(shrink),
            int(base * 1000),
            int(cap * 1000),
            jitter,
            int((wait or 0) * 1000),
            declared_max,
            int(GROWTH_QUIET * 1000),
            int(learn),
            f"{queue.LIMIT_PREFIX}{tenant}:",
        ]
        new, stepped, level, since, until = self._pushback(
            keys=[queue.account(tenant), queue.SEND_HOLD], args=args
        )
        return Pushback(bool(new), bool(stepped), int(level), int(since), int(until))

    def configure(self, tenant: int, declared_max: int, limits: str, *, resume: bool = False) -> None:
        """Declared maximum and send limits (encoded by ``encode_limits``); ``resume`` ends a backoff."""
        args = [tenant, declared_max, limits, int(resume)]
        self._configure(keys=[queue.account(tenant), queue.SEND_HOLD], args=args)

    def resume(self, tenant: int) -> None:
        """New settings: no backoff; probe with one conversation until a success."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(queue.account(tenant), "level", "since", "until", "reason", "run")
        pipe.hset(queue.account(tenant), "probe", "1")
        pipe.zrem(queue.SEND_HOLD, tenant)
        pipe.execute()

    def acquire(self, tenant: int, messages: int, recipients: int, now_ms: int | None = None) -> int:
        """Take from the declared windows: 0 when taken, the ms time they have room otherwise, -1 never."""
        args = [
            f"{queue.LIMIT_PREFIX}{tenant}:",
            tenant,
            "" if now_ms is None else now_ms,
            messages,
            recipients,
        ]
        return int(self._acquire(keys=[queue.SEND_HOLD, queue.account(tenant)], args=args))

    def state(self, tenant: int) -> dict[str, Any]:
        """The account's pace as Redis has it (for views and tests): cap, probe, level, until, …"""
        raw = self.redis.hgetall(queue.account(tenant))
        state: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        held = self.redis.zscore(queue.SEND_HOLD, tenant)
        state["held_until"] = int(held) if held is not None else None
        return state

    def conversations(self, tenant: int) -> int:
        """How many conversations the take allows the account right now (1 while it probes)."""
        cap, probe = self.redis.hmget(queue.account(tenant), "cap", "probe")
        return 1 if cap is None or probe == b"1" else int(cap)


# --- declared send limits ------------------------------------------------------------------------------


def parse_limits(value: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``smtp_send_limits`` as the API takes it: (windows in a canonical form, errors by field)."""
    errors: dict[str, str] = {}
    if value is None:
        return [], errors
    if not isinstance(value, list):
        return [], {"smtp_send_limits": "must be an array of {max, per, count} windows"}
    if len(value) > MAX_WINDOWS:
        return [], {"smtp_send_limits": f"must hold at most {MAX_WINDOWS} windows"}
    windows, seen = [], set()
    for i, item in enumerate(value):
        where = f"smtp_send_limits[{i}]"
        if not isinstance(item, dict) or set(item) - {"max", "per", "count"}:
            errors[where] = "must be an object with max, per and optionally count"
            continue
        limit, per, count = item.get("max"), item.get("per"), item.get("count", "messages")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000_000:
            errors[f"{where}.max"] = "must be an integer from 1 to 10000000"
        elif per not in PER:
            errors[f"{where}.per"] = "must be one of " + ", ".join(PER)
        elif count not in COUNTS:
            errors[f"{where}.count"] = "must be one of " + ", ".join(COUNTS)
        elif (per, count) in seen:
            errors[where] = f"repeats a window of one {per} counting {count}"
        else:
            seen.add((per, count))
            windows.append({"max": limit, "per": per, "count": count})
    return ([] if errors else windows), errors


def encode_limits(windows: list[dict[str, Any]]) -> str:
    """The windows as the take script reads them: ``max:per_ms:m|r`` joined by commas."""
    return ",".join(f"{w['max']}:{PER[w['per']]}:{COUNTS[w['count']]}" for w in windows)


def describe_limits(windows: list[dict[str, Any]]) -> str:
    """In words: "10 messages per second, 2,000 recipients per day"."""
    return ", ".join(f"{w['max']:,} {w['count']} per {w['per']}" for w in windows)


def seconds_until(ms: int, now_ms: int) -> float:
    return max(0.0, math.ceil(ms - now_ms) / 1000)
