"""The senders' fair queue in Redis: a queue per tenant, a ring of tenants, slots per account, pauses.

One FIFO for everybody let a tenant's 20,000-mail burst delay another tenant's single mail and let
one slow server occupy every sender. Instead (keys in ``shared.queue``):

- each tenant (user) has its own queue, a sorted set of envelopes scored by task id: FIFO per
  tenant, and adding an envelope that is already waiting changes nothing (a sweep that re-pushes a
  long backlog does not grow it);
- the ring lists the tenants with mail waiting, each once; a sender takes one envelope from the
  tenant at the head and moves that tenant to the tail, so every tenant with waiting mail gets its
  turn;
- a tenant's slots (a sorted set of holders scored by expiry) allow at most its account's number of
  conversations at once across all senders (``shared.pace``: declared, adapted to what the relay
  says, one while it probes); a slot whose sender was killed expires by itself, so a dead sender never
  keeps one. A slot is an open connection: one a sender keeps idle in its pool between mails holds
  an idle slot, so the account's connections across every sender stay within its number too (a sender
  reuses its own idle connection, or opens one only while the account has room);
- a held tenant (backing off, or over its declared send limit: ``shared.pace``) stays in the ring and
  passes its turn until its time, as one at its cap does;
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
from shared.fairscripts import DONE, DONE_TAKE, GIVE_BACK, PARK, RELEASE_GROUP, RESUME, ROUTE, TAKE

MAX_SCAN = 256  # tenants one take looks at, at most: bounds the script's run time with many tenants


@dataclass(frozen=True)
class GroupCap:
    """A second cap over tenants that share an owner: at most ``cap`` envelopes taken at once across
    all of an owner's tenants (``owners`` maps tenant -> owner; an unmapped tenant has no group cap)."""

    owners: str
    slots_prefix: str
    cap: int


@dataclass(frozen=True)
class Taken:
    """One envelope a sender took, with the slot it holds for the conversation: ``reuse`` names the
    taker's idle connection whose slot it took over (its id in the sender's pool), '' for a new one."""

    tenant: int
    raw: bytes
    holder: str
    reuse: str = ""

    @property
    def task_id(self) -> int:
        return queue.decode(self.raw)


class SendQueue:
    """The fair queue's operations on one Redis client (scripts are loaded on first use)."""

    def __init__(self, client: redis.Redis, keys: queue.FairKeys = queue.SENDER_KEYS):
        self.redis = client
        self.keys = keys  # the senders' keys, or the webhook worker's (one queue per endpoint)
        self._route = client.register_script(ROUTE)
        self._take = client.register_script(TAKE)
        self._done_take = client.register_script(DONE_TAKE)
        self._done = client.register_script(DONE)
        self._give_back = client.register_script(GIVE_BACK)
        self._resume = client.register_script(RESUME)
        self._release_group = client.register_script(RELEASE_GROUP)
        self._park = client.register_script(PARK)

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
    ) -> Took:
        """Up to ``count`` envelopes, one per tenant per turn of the ring, each with one of its
        tenant's ``cap`` slots held for ``slot_ms`` (for the senders: the account's own number of
        conversations, at most ``cap``; held and over-limit accounts pass their turn), and one of its
        owner's with ``group`` (the webhook worker's per-user cap); moved into ``processing`` in the
        same step."""
        args = self._take_args(count, cap, slot_ms, holder)
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

    def _take_args(self, count: int, cap: int, slot_ms: int, holder: str) -> list:
        k = self.keys
        return [
            k.queue_prefix,
            k.slots_prefix,
            count,
            cap,
            slot_ms,
            holder,
            MAX_SCAN,
            k.hold,
            k.account_prefix,
            k.limit_prefix,
        ]

    def done_and_take(
        self,
        processing: str,
        taken: Taken,
        holder: str,
        count: int,
        cap: int,
        slot_ms: int,
        *,
        success: int | None = None,
        parked: str = "",
        parked_ms: int = 0,
    ) -> Took:
        """``done(taken)``, then ``take()``, in one step (``success``, ``parked`` as for ``done``)."""
        keys = [
            self.keys.ready,
            self.keys.paused,
            processing,
            self.keys.bell,
            self.keys.slots(taken.tenant),
            self.keys.queue(taken.tenant),
        ]
        args = [
            *self._take_args(count, cap, slot_ms, holder),
            taken.raw,
            taken.holder,
            queue.BELL_MAX,
            *self._success_args(taken, success),
            parked,
            parked_ms,
        ]
        ended, *flat = self._done_take(keys=keys, args=args)
        took = _taken(flat)
        took.ended = bool(ended)
        return took

    def done(
        self,
        processing: str,
        taken: Taken,
        *,
        success: int | None = None,
        parked: str = "",
        parked_ms: int = 0,
    ) -> bool:
        """The envelope's work is recorded: let go of it and of its slot. ``success``: the relay
        accepted the conversation (the account's declared maximum, for its pace); returns whether that
        ended the account's backoff episode. ``parked``: the conversation's connection went back to the
        sender's pool, so its slot stays taken as this idle one, for ``parked_ms`` at most."""
        keys = [processing, self.keys.slots(taken.tenant), self.keys.queue(taken.tenant), self.keys.bell]
        args = [taken.raw, taken.holder, queue.BELL_MAX, *self._success_args(taken, success)]
        args += [parked, parked_ms]
        return bool(self._done(keys=keys, args=args))

    def park(self, tenant: int, member: str, ttl_ms: int, *, closed: bool = False) -> bool:
        """Hold an idle slot for a connection parked in a sender's pool (``member``), or, ``closed``,
        let go of it."""
        keys = [self.keys.slots(tenant), self.keys.queue(tenant), self.keys.bell]
        return bool(self._park(keys=keys, args=[member, ttl_ms, queue.BELL_MAX, int(closed)]))

    def _success_args(self, taken: Taken, success: int | None) -> list:
        if success is None or not self.keys.account_prefix:
            return ["", 0]
        return [f"{self.keys.account_prefix}{taken.tenant}", success]

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

    def wait(self, timeout: float, holder: str = "") -> bool:
        """Block until a bell rings (new mail, or a slot came free; or, with the taker's ``holder``
        prefix, its own: a tenant waits for its idle connection) or ``timeout`` passes."""
        bells = [self.keys.bell, f"{self.keys.bell}:{holder[:-1]}"] if holder else [self.keys.bell]
        return self.redis.blpop(bells, timeout=timeout) is not None

    def waiting(self, tenant: int) -> int:
        """How many envelopes wait in the tenant's queue."""
        return self.redis.zcard(self.keys.queue(tenant))


class Took(list):
    """The envelopes one take got (a list of Taken), with what else the step saw."""

    limit_waits: int = 0  # accounts a full send-limit window held back in this take
    # Seconds until the first account this take found held (backing off, over its send limit) may be
    # taken; None when none was. No bell rings when a hold passes: a sender waits no longer than this.
    wake: float | None = None
    ended: bool = False  # done_and_take: the success ended the account's backoff episode


def _taken(flat: list) -> Took:
    waits, wake_ms, *flat = flat
    took = Took(
        Taken(int(flat[i]), flat[i + 1], flat[i + 2].decode(), flat[i + 3].decode())
        for i in range(0, len(flat), 4)
    )
    took.limit_waits = int(waits)
    took.wake = int(wake_ms) / 1000 if int(wake_ms) >= 0 else None
    return took
