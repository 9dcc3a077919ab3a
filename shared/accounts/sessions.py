"""An account's own security: changing its password, and revoking every token at once.

A token carries its user's token generation (shared.accounts.auth); a password change or a logout-all
raises the generation, so every token issued before it is refused on every route from then on. Changing
the password takes the current one, checked under the login's rate limits (the per-client and per-email
counters of `POST /login`): a stolen token cannot guess its way to the password faster than a login can.
"""

from __future__ import annotations

from typing import Any

import redis
import sqlalchemy as sa

from shared import bounds
from shared.accounts import auth, users
from shared.context import Context
from shared.errors import NotFound, Unauthorized, ValidationFailed
from shared.models import users as users_table
from shared.validation import Fields

PASSWORD_FIELDS = ("password", "current_password")


def update_account(
    ctx: Context, caller: Any, user_id: int, body: dict[str, Any], client: str
) -> dict[str, Any]:
    """PATCH /user/{id}: a password change (with the current password, in a request of its own), or a
    change of the SMTP account (shared.accounts.users.update_smtp)."""
    if not any(name in body for name in PASSWORD_FIELDS):
        return users.update_smtp(ctx, caller.id, user_id, body)
    if caller.id != user_id:
        raise NotFound("No such user.")
    others = [name for name in body if name not in PASSWORD_FIELDS]
    if others:
        raise ValidationFailed(
            {
                name: "cannot be changed with the password: change the password in a request of its own"
                for name in others
            }  # fmt: skip
        )
    return change_password(ctx, caller, body, client)


def change_password(ctx: Context, caller: Any, body: dict[str, Any], client: str) -> dict[str, Any]:
    """Set a new password when ``current_password`` is right; every token issued before is revoked."""
    users.count_attempt(ctx, "login", client, caller.email)  # the login's limits, before any check
    f = Fields(body)
    new = f.password("password")
    current = f.string("current_password", max_len=1024)
    if f.errors:
        raise ValidationFailed(f.errors)
    with ctx.engine.connect() as conn:
        stored = conn.execute(
            sa.select(users_table.c.password_hash).where(users_table.c.id == caller.id)
        ).scalar_one_or_none()
    if not auth.check_password(current, stored, ctx.settings.bcrypt_rounds):
        raise ValidationFailed({"current_password": "is not the account's password"})
    password_hash = auth.hash_password(new, ctx.settings.bcrypt_rounds)
    _next_generation(ctx, caller, password_hash=password_hash)
    return users.get_user(ctx, caller.id, caller.id)


def logout_all(ctx: Context, caller: Any, user_id: int) -> None:
    """Revoke every token of the caller's, this request's one included."""
    if caller.id != user_id:
        raise NotFound("No such user.")
    _next_generation(ctx, caller)


def _next_generation(ctx: Context, caller: Any, **values: Any) -> None:
    """Raise the token generation (and write ``values``) unless another change raised it first."""
    statement = (
        sa.update(users_table)
        .where(users_table.c.id == caller.id, users_table.c.token_generation == caller.token_generation)
        .values(token_generation=users_table.c.token_generation + 1, **values)
        .returning(users_table.c.id)
    )
    with ctx.engine.begin() as conn:
        if conn.execute(statement).one_or_none() is None:
            raise Unauthorized(bounds.REVOKED)
    try:
        # The enqueue bounds keep the generation beside the counters (shared.bounds), changed in place.
        bounds.update(ctx.redis, caller.id, gen=caller.token_generation + 1)
    except redis.RedisError:
        pass  # enqueue's insert checks the generation itself: a stale copy refuses nothing it should not
