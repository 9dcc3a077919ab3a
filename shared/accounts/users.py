"""Use cases for accounts and health. Entry points parse input, call these, and render the result.

Dependencies arrive in a ``Context`` (shared.context) built once per process; nothing here knows HTTP.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis
import sqlalchemy as sa

from shared import bounds, hosts, pace, ratelimit
from shared.accounts import auth
from shared.accounts import events as account_events
from shared.context import Context
from shared.domain import default_security
from shared.errors import Conflict, DependencyUnavailable, NotFound, Unauthorized, ValidationFailed
from shared.fairqueue import SendQueue
from shared.models import users
from shared.validation import SECURITY_CHOICES, Fields


def _email_subject(email: str) -> str:
    # Rate-limit keys carry a hash, not the address itself.
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


def count_attempt(ctx: Context, action: str, client: str, email: Any) -> None:
    """One login-like attempt against the per-client and per-email limits (RateLimited past either)."""
    s = ctx.settings
    try:
        ratelimit.hit(ctx.redis, f"{action}:client", client, s.rate_limit_per_client)
        if isinstance(email, str) and email:
            ratelimit.hit(ctx.redis, f"{action}:email", _email_subject(email), s.rate_limit_per_email)
    except redis.RedisError:
        raise DependencyUnavailable("redis") from None


def user_view(row: Any, settings: Any = None) -> dict[str, Any]:
    """The public form of a user: never a password or its hash."""
    declared = row.smtp_max_connections
    default = settings.smtp_max_connections_per_account if settings is not None else None
    return {
        "id": row.id,
        "email": row.email,
        "smtp_host": row.smtp_host,
        "smtp_port": row.smtp_port,
        "smtp_username": row.smtp_username,
        "smtp_security": row.smtp_security,
        # What the account declares of its relay (docs/relays.md): conversations at once (the
        # deployment's default when it declares none) and its send windows.
        "smtp_max_connections": declared or default,
        "smtp_send_limits": row.smtp_send_limits or [],
        "smtp_state": smtp_state(row),
        # Set when the SMTP server refused the credentials: mail waits until they are updated.
        "smtp_paused_at": row.smtp_paused_at.isoformat() if row.smtp_paused_at else None,
        "smtp_paused_reason": row.smtp_paused_reason,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


def smtp_state(row: Any) -> dict[str, Any]:
    """Whether the account's mail goes out: ``active``, ``paused`` (until its settings change) or
    ``backing_off`` (its relay refused the account; the next attempt at ``until``), with why and since."""
    if row.smtp_paused_at is not None:
        state, code, reason, since, until = (
            "paused",
            row.smtp_paused_code or "credentials",
            row.smtp_paused_reason,
            row.smtp_paused_at,
            None,
        )
    elif row.smtp_backoff_since is not None:
        state, code, reason = "backing_off", row.smtp_backoff_code, row.smtp_backoff_reason
        since, until = row.smtp_backoff_since, row.smtp_backoff_until
    else:
        return {"state": "active", "reason": None, "detail": None, "since": None, "until": None}
    return {
        "state": state,
        "reason": code,
        "detail": reason,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }


_USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.smtp_host,
    users.c.smtp_port,
    users.c.smtp_username,
    users.c.smtp_security,
    users.c.smtp_paused_at,
    users.c.smtp_paused_reason,
    users.c.smtp_paused_code,
    users.c.smtp_max_connections,
    users.c.smtp_send_limits,
    users.c.smtp_backoff_since,
    users.c.smtp_backoff_until,
    users.c.smtp_backoff_code,
    users.c.smtp_backoff_reason,
    users.c.created_at,
    users.c.updated_at,
)


def register(ctx: Context, body: dict[str, Any], client: str) -> dict[str, Any]:
    """Create a user with the SMTP account their mail goes out through."""
    count_attempt(ctx, "register", client, body.get("email"))
    f = Fields(body)
    email = f.email("email")
    password = f.password("password")
    host = f.hostname("smtp_host")
    port = f.port("smtp_port")
    username = f.string("smtp-username", max_len=320, allow_empty=True)
    smtp_password = f.string("smtp-password", max_len=1024, allow_empty=True)
    security = f.choice("smtp_security", SECURITY_CHOICES)
    if port is not None and security is None and "smtp_security" not in f.errors:
        security = default_security(port).value
    _check_smtp(ctx, f, host, port, security)
    relay = _relay_limits(ctx, f)
    if f.errors:
        raise ValidationFailed(f.errors)

    password_hash = auth.hash_password(password, ctx.settings.bcrypt_rounds)
    encrypted = ctx.box.encrypt(smtp_password)
    statement = (
        sa.insert(users)
        .values(
            email=email,
            password_hash=password_hash,
            smtp_host=host,
            smtp_port=port,
            smtp_username=username,
            smtp_password_enc=encrypted,
            smtp_security=security,
            **relay,
        )
        .returning(*_USER_COLUMNS)
    )
    try:
        with ctx.engine.begin() as conn:
            row = conn.execute(statement).one()
    except sa.exc.IntegrityError:
        raise Conflict("An account with this email already exists.") from None
    _pace(ctx, row)
    return user_view(row, ctx.settings)


def _check_smtp(ctx: Context, f: Fields, host: str | None, port: int | None, security: str | None) -> None:
    """The deployment's SMTP rules: plaintext only where allowed, no private hosts unless allowed."""
    if security == "none" and not ctx.settings.smtp_allow_insecure:
        f.fail("smtp_security", "plaintext SMTP (none) is not allowed on this deployment")
    if host is not None and port is not None:
        # The same rules as every user's host (shared.hosts): a refused address is not named.
        reason = hosts.refusal_for_caller(
            host, port, allow_private=ctx.settings.smtp_allow_private_hosts, what="SMTP host"
        )
        if reason:
            f.fail("smtp_host", reason)


SMTP_FIELDS = ("smtp_host", "smtp_port", "smtp-username", "smtp-password", "smtp_security")
# What an account declares of its relay (docs/relays.md); changing them does not resume a paused account.
RELAY_FIELDS = ("smtp_max_connections", "smtp_send_limits")


def _relay_limits(ctx: Context, f: Fields) -> dict[str, Any]:
    """smtp_max_connections (1 … SMTP_MAX_CONNECTIONS_PER_ACCOUNT_LIMIT; null: the deployment's default)
    and smtp_send_limits (up to four windows), as given in the body; an absent field is not returned."""
    values: dict[str, Any] = {}
    ceiling = ctx.settings.smtp_max_connections_per_account_limit
    if "smtp_max_connections" in f.body:
        value = f.body["smtp_max_connections"]
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= ceiling
        ):
            f.fail(
                "smtp_max_connections", f"must be an integer from 1 to {ceiling} (or null for the default)"
            )
        else:
            values["smtp_max_connections"] = value
    if "smtp_send_limits" in f.body:
        windows, errors = pace.parse_limits(f.body["smtp_send_limits"])
        for name, message in errors.items():
            f.fail(name, message)
        if not errors:
            values["smtp_send_limits"] = windows
    return values


def _pace(ctx: Context, row: Any, *, resume: bool = False) -> None:
    """The declared maximum and send limits where every sender's take sees them; a resume (new SMTP
    settings) also ends a backoff and has the account probe with one conversation again."""
    declared = row.smtp_max_connections or ctx.settings.smtp_max_connections_per_account
    try:
        pace.Pace(ctx.redis).configure(
            row.id,
            min(declared, ctx.settings.smtp_max_connections_per_account_limit),
            pace.encode_limits(row.smtp_send_limits or []),
            resume=resume,
        )
    except redis.RedisError:
        pass  # a sender writes them too when it next reads the account


def update_smtp(ctx: Context, caller_id: int, user_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """Change the caller's SMTP settings (any of SMTP_FIELDS); a paused account is resumed.

    The host is checked again, the password encrypted again; an absent field keeps its value
    (``smtp_security`` too: it is not re-derived from a new port).
    """
    if caller_id != user_id:
        raise NotFound("No such user.")
    f = Fields(body)
    changeable = SMTP_FIELDS + RELAY_FIELDS
    for name in body:
        if name not in changeable:
            f.fail(name, "cannot be changed here (only " + ", ".join(changeable) + ")")
    if not any(name in body for name in changeable):
        f.fail("body", "must change at least one of " + ", ".join(changeable))
    if f.errors:
        raise ValidationFailed(f.errors)
    with ctx.engine.connect() as conn:
        current = conn.execute(
            sa.select(users.c.smtp_host, users.c.smtp_port, users.c.smtp_security).where(
                users.c.id == user_id
            )
        ).one_or_none()
    if current is None:
        raise NotFound("No such user.")
    values: dict[str, Any] = {}
    if "smtp_host" in body:
        values["smtp_host"] = f.hostname("smtp_host")
    if "smtp_port" in body:
        values["smtp_port"] = f.port("smtp_port")
    if "smtp-username" in body:
        values["smtp_username"] = f.string("smtp-username", max_len=320, allow_empty=True)
    if "smtp-password" in body:
        clear = f.string("smtp-password", max_len=1024, allow_empty=True)
        values["smtp_password_enc"] = None if clear is None else ctx.box.encrypt(clear)
    if "smtp_security" in body:
        values["smtp_security"] = f.choice("smtp_security", SECURITY_CHOICES)
        if values["smtp_security"] is None:
            f.fail("smtp_security", "must be one of " + ", ".join(SECURITY_CHOICES))
    _require_password_to_move(f, body, values, current)
    if not f.errors:
        _check_smtp(
            ctx,
            f,
            values.get("smtp_host", current.smtp_host),
            values.get("smtp_port", current.smtp_port),
            values.get("smtp_security", current.smtp_security),
        )
    relay = _relay_limits(ctx, f)
    if f.errors:
        raise ValidationFailed(f.errors)
    resume = any(name in body for name in SMTP_FIELDS)  # new SMTP settings: its mail may go out again
    if resume:
        values.update(
            smtp_paused_at=None,
            smtp_paused_reason=None,
            smtp_paused_code=None,
            smtp_backoff_since=None,
            smtp_backoff_until=None,
            smtp_backoff_code=None,
            smtp_backoff_reason=None,
        )
    statement = (
        sa.update(users)
        .where(users.c.id == user_id)
        .values(**values, **relay, updated_at=sa.func.now())
        .returning(*_USER_COLUMNS)
    )
    with ctx.engine.begin() as conn:
        was_paused = conn.execute(
            sa.select(users.c.smtp_paused_code).where(
                users.c.id == user_id, users.c.smtp_paused_at.isnot(None)
            )
        ).scalar_one_or_none()
        row = conn.execute(statement).one_or_none()
        created = []
        if row is not None and resume and was_paused is not None:
            body = account_events.data(row.id, "active", was_paused, None, since=row.updated_at)
            created = account_events.write(conn, row.id, account_events.RESUMED, body)
    if row is None:
        raise NotFound("No such user.")
    account_events.wake(ctx.redis, created)
    _pace(ctx, row, resume=resume)
    if resume:
        try:
            SendQueue(ctx.redis).resume(user_id)  # its waiting mail goes out again now
        except redis.RedisError:
            pass  # PostgreSQL says resumed; the next sweep resumes it in Redis too
    return user_view(row, ctx.settings)


MOVES = ("smtp_host", "smtp_port", "smtp_security")


def _require_password_to_move(f: Fields, body: dict[str, Any], values: dict[str, Any], current: Any) -> None:
    """Sending the stored SMTP password to another server (host, port or security changed) takes that
    password in the same request: a token alone must not be able to send it wherever it likes."""
    moved = [name for name in MOVES if name in values and values[name] != getattr(current, name)]
    if moved and "smtp-password" not in body:
        f.fail(
            "smtp-password",
            f"is required to change {', '.join(moved)}: the stored password is sent only to the server it "
            "was given for",
        )


def login(ctx: Context, body: dict[str, Any], client: str) -> dict[str, Any]:
    """A Bearer token for the right email and password; the same 401 for every wrong combination."""
    count_attempt(ctx, "login", client, body.get("email"))
    f = Fields(body)
    email = f.string("email", max_len=254)
    password = f.string("password", max_len=1024)
    if f.errors:
        raise ValidationFailed(f.errors)
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(users.c.id, users.c.password_hash, users.c.token_generation).where(
                sa.func.lower(users.c.email) == email.lower()
            )
        ).one_or_none()
    ok = auth.check_password(password, row.password_hash if row else None, ctx.settings.bcrypt_rounds)
    if not ok or row is None:
        raise Unauthorized("The email or password is wrong.")
    s = ctx.settings
    return {
        "id": row.id,
        "token": auth.issue_token(row.id, s.jwt_secret, s.jwt_ttl_seconds, generation=row.token_generation),
        "token_type": "Bearer",
        "expires_in": s.jwt_ttl_seconds,
    }


def token_claims(ctx: Context, authorization: str | None) -> auth.TokenClaims:
    """The user id and token generation of a valid Bearer token; Unauthorized otherwise. Whether that
    user still exists and the generation is still current is the caller's to check (``authenticate``
    does; enqueue's insert does it in the same statement)."""
    return auth.verify_claims(auth.bearer_token(authorization), ctx.settings.jwt_secret)


def authenticate(ctx: Context, authorization: str | None) -> Any:
    """The caller (``.id``, ``.email``) from an Authorization header; Unauthorized unless a live user
    and a token of the user's current generation."""
    claims = token_claims(ctx, authorization)
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(users.c.id, users.c.email, users.c.token_generation).where(users.c.id == claims.user_id)
        ).one_or_none()
    if row is None:
        raise Unauthorized("The token's user does not exist.")
    if row.token_generation != claims.generation:
        raise Unauthorized(bounds.REVOKED)
    return row


def get_user(ctx: Context, caller_id: int, user_id: int) -> dict[str, Any]:
    """The caller's own record; anyone else's id is simply not found."""
    if caller_id != user_id:
        raise NotFound("No such user.")
    with ctx.engine.connect() as conn:
        row = conn.execute(sa.select(*_USER_COLUMNS).where(users.c.id == user_id)).one_or_none()
    if row is None:
        raise NotFound("No such user.")
    return user_view(row, ctx.settings)


def ping(ctx: Context) -> dict[str, str]:
    """The state of each dependency: "ok" or "down"."""
    result = {}
    try:
        with ctx.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        result["postgresql"] = "ok"
    except Exception:  # noqa: BLE001 - any failure means down; the reason goes to the log, not the caller
        result["postgresql"] = "down"
    try:
        ctx.redis.ping()
        result["redis"] = "ok"
    except Exception:  # noqa: BLE001
        result["redis"] = "down"
    return result
