"""The Redis protocol: every key mailq uses and the envelope format, in one place.

Redis only carries wake-up envelopes ``{"v": 1, "task_id": N}``; the task itself (and every
credential) stays in PostgreSQL. Tenant ids in key names are user ids, never an address or a host.
The KEDA ScaledObjects' ``listName`` must equal TASK_LIST and SEND_READY (a manifest test says so).

    enqueue ─LPUSH─► mailq:tasks ─(consumer)─► mailq:send:q:<tenant>  (a sorted set per tenant)
                                                mailq:send:ready       (the ring of tenants with mail)
                                                         │ (sender: one per tenant per turn,
                                                         ▼  at most the per-account cap at once)
                                                mailq:processing:<sender> ─► SMTP

Webhook deliveries travel the same kind of fair queue under their own keys, one queue per endpoint
(``WEBHOOK_KEYS``); their envelopes name the delivery and its endpoint, ``{"v": 1, "delivery_id": N,
"endpoint_id": M}``, so a rescued one can be put back in its endpoint's queue without PostgreSQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.errors import EnvelopeDecodeError

PREFIX = "mailq:"
TASK_LIST = "mailq:tasks"  # enqueue pushes here; consumers read it; dead senders' envelopes return here
SEND_READY = "mailq:send:ready"  # the ring: tenants with mail waiting to be taken, each at most once
SEND_QUEUE_PREFIX = "mailq:send:q:"  # + tenant: a sorted set of envelopes, score = task id (FIFO)
SLOTS_PREFIX = "mailq:slots:"  # + tenant: holders of an SMTP conversation slot, score = expiry (ms)
PAUSED = "mailq:paused"  # set of tenants whose SMTP login was refused; their mail waits
SEND_BELL = "mailq:send:bell"  # wake-up tokens for idle senders; trimmed to BELL_MAX
# An account's pace (shared.pace): tenants no sender may take before a time (a backoff, a send limit),
# the account's relay state (concurrency, backoff, declared limits), and its send-limit windows.
SEND_HOLD = "mailq:send:hold"  # a sorted set: tenant -> not before (ms, Redis's clock)
ACCOUNT_PREFIX = "mailq:account:"  # + tenant: a hash (cap, probe, run, calm, level, since, until, …)
LIMIT_PREFIX = "mailq:limit:"  # + tenant:<window ms>:<m|r>: a hash, time bucket -> mails or recipients
BELL_MAX = 64
WORKERS = "mailq:workers"  # hash: worker id -> the list its processing list drains back into

# The webhook worker's fair queue (a queue per endpoint, a ring of endpoints, slots per endpoint).
WEBHOOK_READY = "mailq:webhooks:ready"  # the ring: endpoints with deliveries waiting (KEDA listName)
WEBHOOK_QUEUE_PREFIX = "mailq:webhooks:q:"  # + endpoint: a sorted set of envelopes, score = delivery id
WEBHOOK_SLOTS_PREFIX = "mailq:webhooks:slots:"  # + endpoint: requests in flight, score = expiry (ms)
WEBHOOK_OWNERS = "mailq:webhooks:owner"  # hash: endpoint -> the user who owns it (the per-user cap)
WEBHOOK_USER_SLOTS_PREFIX = "mailq:webhooks:userslots:"  # + user: requests in flight, score = expiry (ms)
WEBHOOK_PAUSED = "mailq:webhooks:paused"  # never filled: the fair queue's scripts need the key
WEBHOOK_BELL = "mailq:webhooks:bell"  # wake-ups for idle webhook workers; trimmed to BELL_MAX
# Where a stopped or dead webhook worker's envelopes go; the sweep (and any webhook worker) puts them
# back in their endpoints' queues.
WEBHOOK_RETURNED = "mailq:webhooks:returned"


@dataclass(frozen=True)
class FairKeys:
    """The keys of one fair queue (shared.fairqueue): the senders' and the webhook worker's."""

    ready: str
    queue_prefix: str
    slots_prefix: str
    paused: str
    bell: str
    # The senders' queue paces each account (shared.pace); the webhook worker's has none ("").
    hold: str = ""
    account_prefix: str = ""
    limit_prefix: str = ""

    def queue(self, tenant: int | str) -> str:
        return f"{self.queue_prefix}{tenant}"

    def slots(self, tenant: int | str) -> str:
        return f"{self.slots_prefix}{tenant}"


SENDER_KEYS = FairKeys(
    SEND_READY, SEND_QUEUE_PREFIX, SLOTS_PREFIX, PAUSED, SEND_BELL, SEND_HOLD, ACCOUNT_PREFIX, LIMIT_PREFIX
)
WEBHOOK_KEYS = FairKeys(
    WEBHOOK_READY, WEBHOOK_QUEUE_PREFIX, WEBHOOK_SLOTS_PREFIX, WEBHOOK_PAUSED, WEBHOOK_BELL
)

ENVELOPE_VERSION = 1


def send_queue(tenant: int | str) -> str:
    """The tenant's queue of envelopes waiting for a sender."""
    return f"{SEND_QUEUE_PREFIX}{tenant}"


def slots(tenant: int | str) -> str:
    """The tenant's SMTP conversation slots (a lease-based semaphore)."""
    return f"{SLOTS_PREFIX}{tenant}"


def account(tenant: int | str) -> str:
    """The account's pace in Redis (shared.pace)."""
    return f"{ACCOUNT_PREFIX}{tenant}"


def processing_list(worker_id: str) -> str:
    """The list a worker's in-hand envelopes sit in until their work is recorded."""
    return f"mailq:processing:{worker_id}"


def heartbeat_key(worker_id: str) -> str:
    """A key with a TTL; when it is gone the worker is dead and the sweep returns its envelopes."""
    return f"mailq:heartbeat:{worker_id}"


def tenant_key(user_id: int) -> str:
    """A hash of one tenant's enqueue bounds (shared.tasks.bounds): estimated pending tasks and bytes, the
    rate bucket, the token generation and the operator's overrides, all numbers; PostgreSQL is the truth
    it is rebuilt from whenever it is missing."""
    return f"mailq:tenant:{user_id}"


def tenant_inflight_key(user_id: int) -> str:
    """A sorted set of one tenant's admitted enqueues not yet stored ("count:bytes:id", score = expiry ms):
    what a recount of the tenant's pending mails must add to what PostgreSQL already shows."""
    return f"mailq:tenant:{user_id}:inflight"


def rate_limit_key(scope: str, subject: str, window: int) -> str:
    """Fixed-window counter for login/register attempts."""
    return f"mailq:ratelimit:{scope}:{subject}:{window}"


def encode(task_id: int) -> bytes:
    """The envelope for one task, as stored in Redis."""
    return b'{"v":1,"task_id":%d}' % task_id


def decode(raw: bytes | str) -> int:
    """The task id inside an envelope; EnvelopeDecodeError for anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise EnvelopeDecodeError(f"not JSON: {raw!r:.80}") from exc
    if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
        raise EnvelopeDecodeError(f"unknown envelope version: {raw!r:.80}")
    task_id = data.get("task_id")
    if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id <= 0:
        raise EnvelopeDecodeError(f"bad task_id: {raw!r:.80}")
    return task_id


def encode_delivery(delivery_id: int, endpoint_id: int) -> bytes:
    """The envelope of one webhook delivery."""
    return b'{"v":1,"delivery_id":%d,"endpoint_id":%d}' % (delivery_id, endpoint_id)


def decode_delivery(raw: bytes | str) -> tuple[int, int]:
    """(delivery id, endpoint id) of a delivery envelope; EnvelopeDecodeError for anything else."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise EnvelopeDecodeError(f"not JSON: {raw!r:.80}") from exc
    if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
        raise EnvelopeDecodeError(f"unknown envelope version: {raw!r:.80}")
    ids = (data.get("delivery_id"), data.get("endpoint_id"))
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise EnvelopeDecodeError(f"bad delivery envelope: {raw!r:.80}")
    return ids[0], ids[1]
