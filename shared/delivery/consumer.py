"""The consumer: from the task list to the senders' fair queue.

It moves envelopes into its own processing list (BLMOVE, then more in one script), asks
PostgreSQL which of their tasks are still queued, and hands those to their tenants' queues
(``shared.fairqueue``); the hand-off and the release from its processing list are one atomic step,
so a crash in between cannot lose an envelope. Unknown, terminal, not-due and duplicate envelopes
are dropped here: the sweep owns anything that still needs to go.
"""

from __future__ import annotations

import logging
import threading

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.db import on_the_row
from shared.errors import EnvelopeDecodeError
from shared.fairqueue import SendQueue
from shared.prepared import alone, run_alone
from shared.workers import BLOCK_SECONDS, Outcome, Worker, dependency_of

log = logging.getLogger("mailq.consumer")

# Envelopes taken per step: one round trip to Redis and one to PostgreSQL serve the whole batch.
BATCH = 20

# A read that is a whole unit of work: prepared once per connection, one exchange (shared.prepared).
_STILL_QUEUED = on_the_row("status = 'queued'")
_QUEUED_SQL = alone(
    sa.text(f"SELECT id, user_id FROM tasks WHERE id = ANY(CAST(:ids AS bigint[])) AND {_STILL_QUEUED}")  # noqa: S608 - a constant
)
# Up to ARGV[1] more envelopes moved into the processing list, stopping at the first miss: one command
# (a pipeline of LMOVEs costs a command, and a reply to parse, per slot even when the list is empty).
_MOVE_MORE = """
local moved = {}
for _ = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then break end
  moved[#moved + 1] = raw
end
return moved
"""


class Consumer(Worker):
    """Checks each task and hands the live ones to their tenant's queue."""

    role = "consumer"
    source = queue.TASK_LIST

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis, *, batch: int = BATCH, **kw):
        super().__init__(settings, engine, client, **kw)
        self.batch = batch
        self.sendq = SendQueue(client)
        # Moves an envelope back only if it is still ours: one already released is not pushed twice.
        self._give_back_script = client.register_script(
            "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then "
            "redis.call('RPUSH', KEYS[2], ARGV[1]) return 1 end return 0"
        )
        self._move_more = client.register_script(_MOVE_MORE)
        self._held = threading.local()  # the envelopes of the step a thread is in

    def take_many(self, timeout: float = BLOCK_SECONDS) -> list[bytes]:
        """Block for one envelope, then take up to ``batch`` in all without waiting (one round trip)."""
        first = self.redis.blmove(self.source, self.processing, timeout, "RIGHT", "LEFT")
        if first is None:
            return []
        if self.batch == 1:
            return [first]
        try:
            more = self._move_more(keys=[self.source, self.processing], args=[self.batch - 1])
        except redis.RedisError:
            return [first]  # work with what we hold; anything moved meanwhile goes back at shutdown
        return [first, *more]

    def step(self, timeout: float = BLOCK_SECONDS) -> list[Outcome]:
        """Take a batch of envelopes and hand the live ones on. [] when there was nothing."""
        raws = self.take_many(timeout)
        if not raws or self.stopping.is_set():
            return []  # taken during shutdown: return_all() hands them back
        self._held.raws = raws  # if this step fails, the loop gives back whatever is still ours
        envelopes: list[tuple[int, bytes]] = []
        dropped: list[bytes] = []
        for raw in raws:
            try:
                envelopes.append((queue.decode(raw), raw))
            except EnvelopeDecodeError as exc:
                log.warning("%s dropped a malformed envelope: %s", self.id, exc)
                dropped.append(raw)
        outcomes = [Outcome.DROPPED] * len(dropped)
        outcomes += self.handle(envelopes, also_release=dropped)
        self._held.raws = []
        self.metrics.count_envelopes(outcomes)
        return outcomes

    def handle(self, envelopes: list[tuple[int, bytes]], also_release: list[bytes] = ()) -> list[Outcome]:
        ids = list(dict.fromkeys(task_id for task_id, _ in envelopes))
        live: dict[int, int] = {}
        if ids:
            live = dict(run_alone(self.engine, _QUEUED_SQL, {"ids": ids}))
        outcomes, routed = [], []
        for task_id, raw in envelopes:
            user_id = live.pop(task_id, None)  # popped: a duplicate in this batch is dropped
            if user_id is None:
                outcomes.append(Outcome.DROPPED)
            else:
                routed.append((user_id, task_id, raw))
                outcomes.append(Outcome.HANDED_OFF)
        # The hand-off and the release from our processing list are one atomic step.
        self.sendq.route(
            routed, processing=self.processing, release=[r for _, r in envelopes] + list(also_release)
        )
        return outcomes

    def give_back(self, raws: list[bytes]) -> int:
        """Return to the task list those of ``raws`` still in our processing list (atomically each)."""
        return sum(self._give_back_script(keys=[self.processing, self.source], args=[raw]) for raw in raws)

    def loops(self):
        return [(f"consumer-{i}", self._loop) for i in range(self.settings.queue_consumer_count)]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.mark_progress()
            try:
                self.step()
            except Exception as exc:
                which = dependency_of(exc)
                if which:
                    log.warning("%s: %s unavailable (%s); retrying", self.id, which, type(exc).__name__)
                else:
                    log.exception("%s: unexpected error; continuing", self.id)
                self._recover()

    def _recover(self) -> None:
        """After a failed step: wait, then hand back the envelopes that step still holds.

        Without this they would sit in a live worker's processing list until the sweep's leak
        window; handing them back is safe because the senders' claim is conditional.
        """
        held = getattr(self._held, "raws", [])
        while not self.stopping.wait(1.0):
            self.mark_progress()
            try:
                self.give_back(held)
                break
            except redis.RedisError:
                continue  # Redis is down too; stopping or the next try will deal with them
        self._held.raws = []
