"""Use cases for webhook endpoints: create, list, change (enable, disable, move), delete, rotate the
secret, the delivery log, replay.

A user sees and touches only their own endpoints and deliveries (anyone else's are simply not
found). An endpoint's signing secret is shown once, in the answer that created it (or rotated it),
and is stored encrypted like SMTP passwords: it must stay usable for signing. The receiver URL gets
the SMTP host's rules (shared.hosts): https only outside development, and a host resolving to a
private, loopback, link-local or metadata address is refused unless the deployment allows it.
"""

from __future__ import annotations

import base64
from typing import Any

import redis
import sqlalchemy as sa

from shared import hosts, queue, ratelimit
from shared.context import Context
from shared.errors import (
    Conflict,
    DependencyUnavailable,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from shared.models import webhook_endpoints
from shared.tasks import events
from shared.webhooks.receiver import MAX_URL_LENGTH, parse_url

MAX_ENDPOINTS = 10  # per user
DEFAULT_PAGE, MAX_PAGE = 50, 200
MAX_ID = 2**63 - 1
PENDING_STATES = ("scheduled", "queued", "sending")  # shown as "pending"

_ENDPOINT_COLUMNS = "id, url, events, enabled, disabled_reason, created_at, updated_at"


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def endpoint_view(row: Any, secret: str | None = None) -> dict[str, Any]:
    """The public form of an endpoint; ``secret`` only in the answers that create or rotate it."""
    view = {
        "id": row.id,
        "url": row.url,
        "events": list(row.events),
        "enabled": row.enabled,
        "disabled_reason": row.disabled_reason,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }
    if secret is not None:
        view["secret"] = secret
    return view


def _events_field(body: dict[str, Any], errors: dict[str, str]) -> list[str]:
    value = body.get("events")
    if value is None:
        return list(events.EVENT_TYPES)  # absent: every event
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        errors["events"] = "must be a non-empty list of event types: " + ", ".join(events.EVENT_TYPES)
        return []
    unknown = [v for v in value if v not in events.EVENT_TYPES]
    if unknown:
        errors["events"] = f"unknown event type {unknown[0][:40]!r}; known: " + ", ".join(events.EVENT_TYPES)
        return []
    return [t for t in events.EVENT_TYPES if t in value]  # each once, in a fixed order


def _url_field(ctx: Context, body: dict[str, Any], errors: dict[str, str]) -> str | None:
    value = body.get("url")
    if not isinstance(value, str) or not value:
        errors["url"] = "is required (a string)" if value is None else "must be a non-empty string"
        return None
    s = ctx.settings
    try:
        target = parse_url(value[: MAX_URL_LENGTH + 1], allow_http=s.webhook_allow_http)
    except ValueError as exc:
        errors["url"] = str(exc)
        return None
    reason = hosts.refusal_for_caller(
        target.host, target.port, allow_private=s.webhook_allow_private_hosts, what="webhook host"
    )
    if reason:
        errors["url"] = f"the host {reason}" if reason == hosts.PRIVATE_HOST_REFUSED else reason
        return None
    return value


def create(ctx: Context, user_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """A new endpoint for the caller, with its secret (shown this once)."""
    errors: dict[str, str] = {}  # members it does not know are ignored, as everywhere in the API
    subscribed = _events_field(body, errors)
    url = _url_field(ctx, body, errors)
    if errors:
        raise ValidationFailed(errors)
    secret = events.new_secret()
    with ctx.engine.begin() as conn:
        # The user's row is locked first (FOR NO KEY UPDATE: enqueues referencing it go on), so two
        # creates at once cannot both find nine endpoints; the count below is a new snapshot.
        if (
            conn.execute(
                sa.text("SELECT 1 FROM users WHERE id = :u FOR NO KEY UPDATE"), {"u": user_id}
            ).first()
            is None
        ):
            raise Unauthorized("The token's user does not exist.")
        count = conn.execute(
            sa.text("SELECT count(*) FROM webhook_endpoints WHERE user_id = :u"), {"u": user_id}
        ).scalar_one()
        if count >= MAX_ENDPOINTS:
            raise Conflict(f"A user may have at most {MAX_ENDPOINTS} webhook endpoints; delete one first.")
        row = conn.execute(
            sa.text(
                "INSERT INTO webhook_endpoints (user_id, url, events, secret_enc)"
                " VALUES (:u, :url, CAST(:events AS text[]), :secret)"
                f" RETURNING {_ENDPOINT_COLUMNS}"
            ),
            {"u": user_id, "url": url, "events": subscribed, "secret": ctx.box.encrypt(secret)},
        ).one()
    try:  # whose endpoint it is, for the webhook worker's per-user cap (the worker records it too)
        ctx.redis.hset(queue.WEBHOOK_OWNERS, row.id, user_id)
    except redis.RedisError:
        pass
    return endpoint_view(row, secret)


def list_endpoints(ctx: Context, user_id: int) -> dict[str, Any]:
    """The caller's endpoints, oldest first (at most MAX_ENDPOINTS: no paging), without secrets."""
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE user_id = :u ORDER BY id"),
            {"u": user_id},
        ).all()
    return {"items": [endpoint_view(r) for r in rows]}


def delete(ctx: Context, user_id: int, endpoint_id: int) -> None:
    """Delete one of the caller's endpoints, with its delivery log; nothing more is sent to it."""
    with ctx.engine.begin() as conn:
        gone = conn.execute(
            sa.text("DELETE FROM webhook_endpoints WHERE id = :id AND user_id = :u RETURNING id"),
            {"id": endpoint_id, "u": user_id},
        ).first()
    if gone is None:
        raise NotFound("No such webhook endpoint.")


DISABLED_BY_USER = "disabled by the user"


def update(ctx: Context, user_id: int, endpoint_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """Change an endpoint's ``enabled``, ``url`` or ``events`` (the members given; at least one).

    Enabling clears the reason it was disabled (a 410 from the receiver, or the user): what is sent
    from then on goes out again; deliveries that failed meanwhile stay failed and can be replayed. A
    new URL gets the same checks as at creation and takes every delivery not yet sent. The secret
    stays (rotate it separately)."""
    errors: dict[str, str] = {}
    changes: dict[str, Any] = {}
    if "enabled" in body:
        if isinstance(body["enabled"], bool):
            changes["enabled"] = body["enabled"]
        else:
            errors["enabled"] = "must be true or false"
    if "url" in body:
        url = _url_field(ctx, body, errors)
        if url is not None:
            changes["url"] = url
    if "events" in body:
        subscribed = _events_field(body, errors) if body["events"] is not None else []
        if body["events"] is None:
            errors["events"] = "must be a non-empty list of event types: " + ", ".join(events.EVENT_TYPES)
        elif subscribed:
            changes["events"] = subscribed
    if not errors and not changes:
        errors["enabled"] = "give at least one of enabled, url and events"
    if errors:
        raise ValidationFailed(errors)
    values = {"updated_at": sa.func.now()}
    if "enabled" in changes:
        values["enabled"] = changes["enabled"]
        values["disabled_reason"] = None if changes["enabled"] else DISABLED_BY_USER
    if "url" in changes:
        values["url"] = changes["url"]
    if "events" in changes:
        values["events"] = changes["events"]
    with ctx.engine.begin() as conn:
        row = conn.execute(
            sa.update(webhook_endpoints)
            .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.user_id == user_id)
            .values(**values)
            .returning(*(webhook_endpoints.c[name] for name in _ENDPOINT_COLUMNS.split(", ")))
        ).one_or_none()
    if row is None:
        raise NotFound("No such webhook endpoint.")
    return endpoint_view(row)


def rotate(ctx: Context, user_id: int, endpoint_id: int) -> dict[str, Any]:
    """A new secret; the old one goes on signing for WEBHOOK_ROTATION_OVERLAP seconds as well."""
    secret = events.new_secret()
    with ctx.engine.begin() as conn:
        row = conn.execute(
            sa.text(
                "UPDATE webhook_endpoints SET previous_secret_enc = secret_enc, secret_enc = :secret,"
                " previous_secret_until = now() + make_interval(secs => :overlap), updated_at = now()"
                " WHERE id = :id AND user_id = :u"
                f" RETURNING {_ENDPOINT_COLUMNS}, previous_secret_until"
            ),
            {
                "id": endpoint_id,
                "u": user_id,
                "secret": ctx.box.encrypt(secret),
                "overlap": ctx.settings.webhook_rotation_overlap,
            },
        ).one_or_none()
    if row is None:
        raise NotFound("No such webhook endpoint.")
    return {**endpoint_view(row, secret), "previous_secret_expires_at": _iso(row.previous_secret_until)}


def _count_replay(ctx: Context, user_id: int) -> None:
    """One replay against the user's REPLAY_RATE_PER_USER a minute (RateLimited past it)."""
    limit = ctx.settings.replay_rate_per_user
    try:
        ratelimit.hit(ctx.redis, "replay:user", str(user_id), limit)
    except RateLimited as exc:
        raise RateLimited(
            exc.retry_after, f"This account may ask for {limit} replays a minute; try again later.",
            limit="replay_rate",
        ) from None  # fmt: skip
    except redis.RedisError:
        raise DependencyUnavailable("redis") from None


# --- the delivery log -----------------------------------------------------------------------------


def delivery_view(row: Any) -> dict[str, Any]:
    pending = row.state in PENDING_STATES
    return {
        "id": row.id,
        "webhook_id": events.webhook_id(row.event_id),  # the message id: the webhook-id header
        "event_type": row.type,
        "task_id": row.task_id,
        "state": "pending" if pending else row.state,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at) if pending else None,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "delivered_at": _iso(row.delivered_at),
    }


_DELIVERY_SELECT = """
    SELECT d.id, d.event_id, e.type, e.task_id, d.state, d.attempts, d.last_status, d.last_error,
           d.next_attempt_at, d.created_at, d.updated_at, d.delivered_at
      FROM webhook_deliveries AS d JOIN webhook_events AS e ON e.id = d.event_id
"""


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"d1:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    """The id the next page starts below (newest first); MAX_ID + 1 for the first page."""
    if not cursor:
        return MAX_ID
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, number = text.partition(":")
        if version != "d1" or not number.isascii() or not number.isdigit() or int(number) > MAX_ID:
            raise ValueError
        return int(number)
    except ValueError:
        raise ValidationFailed({"cursor": "is not a cursor this API returned"}) from None


def _own_endpoint(conn, user_id: int, endpoint_id: int, *, lock: bool = False) -> Any:
    # FOR NO KEY UPDATE: a second replay to the endpoint waits here; deliveries referencing it go on.
    row = conn.execute(
        sa.text(
            "SELECT id, enabled FROM webhook_endpoints WHERE id = :id AND user_id = :u"
            + (" FOR NO KEY UPDATE" if lock else "")
        ),
        {"id": endpoint_id, "u": user_id},
    ).one_or_none()
    if row is None:
        raise NotFound("No such webhook endpoint.")
    return row


def list_deliveries(
    ctx: Context, user_id: int, endpoint_id: int, limit: int, cursor: str | None
) -> dict[str, Any]:
    """One page of an endpoint's delivery log, newest first, keyset-paginated on id."""
    before = _decode_cursor(cursor)
    with ctx.engine.connect() as conn:
        _own_endpoint(conn, user_id, endpoint_id)
        rows = conn.execute(
            sa.text(
                _DELIVERY_SELECT + " WHERE d.endpoint_id = :e AND d.id < :before ORDER BY d.id DESC LIMIT :n"
            ),
            {"e": endpoint_id, "before": before, "n": limit + 1},
        ).all()
    items = [delivery_view(r) for r in rows[:limit]]
    return {"items": items, "next_cursor": _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None}


def replay(ctx: Context, user_id: int, endpoint_id: int, delivery_id: int) -> dict[str, Any]:
    """Send a delivered or failed delivery's event again, as a new delivery with the same webhook-id.

    Bounded twice, so replay is no HTTP flood for hire: at most REPLAY_RATE_PER_USER replays a minute per
    user (429, counted before any other work), and at most one delivery of an event to an endpoint in
    flight at a time (409 naming the pending one; the endpoint's row is locked while this is decided, so
    two replays at once cannot both find none)."""
    _count_replay(ctx, user_id)
    with ctx.engine.begin() as conn:
        endpoint = _own_endpoint(conn, user_id, endpoint_id, lock=True)
        original = conn.execute(
            sa.text("SELECT event_id, state FROM webhook_deliveries WHERE id = :d AND endpoint_id = :e"),
            {"d": delivery_id, "e": endpoint_id},
        ).one_or_none()
        if original is None:
            raise NotFound("No such delivery.")
        if not endpoint.enabled:
            raise Conflict("The endpoint is disabled; nothing is sent to it.")
        if original.state in PENDING_STATES:
            raise Conflict("The delivery is still pending; it will be sent (or retried) anyway.")
        pending = conn.execute(
            sa.text(
                "SELECT id FROM webhook_deliveries WHERE event_id = :ev AND endpoint_id = :e"
                " AND state IN ('scheduled', 'queued', 'sending') ORDER BY id LIMIT 1"
            ),
            {"ev": original.event_id, "e": endpoint_id},
        ).scalar_one_or_none()
        if pending is not None:
            raise Conflict(
                f"A replay of this event is still pending (delivery {pending}); it will be sent (or retried) "
                "anyway, and one may be replayed again once it has ended."
            )
        created = conn.execute(
            sa.text(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, state) VALUES (:ev, :e, 'queued')"
                " RETURNING id"
            ),
            {"ev": original.event_id, "e": endpoint_id},
        ).scalar_one()
        row = conn.execute(sa.text(_DELIVERY_SELECT + " WHERE d.id = :d"), {"d": created}).one()
    events.Outbox(ctx.redis).wake([(created, endpoint_id)])  # Redis down: the sweep pushes it later
    return delivery_view(row)
