"""`mailq account`: an operator's commands for one account.

    mailq account limits EMAIL                       # its tenant bounds, and what it holds now
    mailq account limits EMAIL --max-pending 500000  # raise one for this account only
    mailq account limits EMAIL --rate default        # back to the deployment's value

The bounds themselves are shared/bounds.py's; this only reads and writes the account's overrides
(users.max_pending_tasks, max_pending_bytes, enqueue_rate, enqueue_burst) and puts them in force at once.
"""

from __future__ import annotations

import click
import sqlalchemy as sa

from functions.settings import load_settings, unreachable

DEFAULT = "default"
# option -> (column, what it is, unit, parse)
OPTIONS = {
    "max_pending": ("max_pending_tasks", "max pending mails", "", int),
    "max_pending_bytes": ("max_pending_bytes", "max pending bytes", "", int),
    "rate": ("enqueue_rate", "enqueue rate", " mails/s", float),
    "burst": ("enqueue_burst", "enqueue burst", " mails", int),
}
SETTING = {  # the deployment's value of each, in Settings
    "max_pending_tasks": "max_pending_per_user",
    "max_pending_bytes": "max_pending_bytes_per_user",
    "enqueue_rate": "enqueue_rate_per_user",
    "enqueue_burst": "enqueue_burst_per_user",
}


@click.group()
def account() -> None:
    """An operator's commands for one account."""


@account.command()
@click.argument("email")
@click.option("--max-pending", help="mails not yet sent or cancelled (an integer, or 'default')")
@click.option("--max-pending-bytes", help="their content bytes together (an integer, or 'default')")
@click.option("--rate", help="mails per second it may enqueue (a number above 0, or 'default')")
@click.option("--burst", help="mails at once above the rate (at least MAX_BATCH, or 'default')")
def limits(email: str, **options: str | None) -> None:
    """Show an account's tenant bounds, or set them for this account (see docs/security.md)."""
    from shared import bounds
    from shared.context import make_redis
    from shared.db import engine_for
    from shared.models import users

    settings = load_settings()
    if not settings.database_url:
        raise click.ClickException("account limits needs DATABASE_URL (and REDIS_URL to apply at once)")
    changes = _parse(options, settings)
    engine = engine_for(settings.database_url)
    try:
        with engine.begin() as conn:
            user_id = conn.execute(
                sa.select(users.c.id).where(sa.func.lower(users.c.email) == email.strip().lower())
            ).scalar_one_or_none()
            if user_id is None:
                raise click.ClickException(f"no account with the email {email}")
            if changes:
                conn.execute(sa.update(users).where(users.c.id == user_id).values(**changes))
        row = bounds.count_pending(engine, user_id)
    except sa.exc.DBAPIError as exc:
        raise unreachable(exc, settings) or exc from None
    if changes and settings.redis_url:  # in force at the next enqueue, without waiting for a rebuild
        client = make_redis(settings.redis_url)
        try:
            bounds.update(client, user_id, **{_FIELD[c]: v for c, v in changes.items()})
        except Exception as exc:  # noqa: BLE001 - PostgreSQL holds the change; a rebuild reads it
            click.echo(f"note: Redis not updated ({type(exc).__name__}); in force when its copy is rebuilt")
        finally:
            client.close()
    click.echo(f"account {email.strip().lower()} (id {user_id})")
    for column, what, unit, _ in OPTIONS.values():
        value, default = getattr(row, column), getattr(settings, SETTING[column])
        if value is None:
            click.echo(f"{what:<22} {_number(default)}{unit} (deployment default)")
        else:
            click.echo(
                f"{what:<22} {_number(value)}{unit} (set for this account; deployment: {_number(default)})"
            )
    click.echo(f"{'pending now':<22} {row.tasks} mails, {row.bytes} bytes")


_FIELD = {"max_pending_tasks": "o_tasks", "max_pending_bytes": "o_bytes", "enqueue_rate": "o_rate",
          "enqueue_burst": "o_burst"}  # fmt: skip


def _number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse(options: dict[str, str | None], settings) -> dict[str, float | int | None]:
    """The columns to write: a number, or None for 'default'; one line for anything else."""
    changes: dict[str, float | int | None] = {}
    for option, raw in options.items():
        if raw is None:
            continue
        column, _, _, kind = OPTIONS[option]
        flag = "--" + option.replace("_", "-")
        if raw.strip().lower() == DEFAULT:
            changes[column] = None
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise click.ClickException(f"{flag} must be a number or 'default', got {raw!r}") from None
        if (kind is float and not value > 0) or (kind is int and value < 0):
            raise click.ClickException(f"{flag} must be {'above 0' if kind is float else 'at least 0'}")
        if option == "burst" and value < settings.max_batch:
            raise click.ClickException(f"--burst must be at least MAX_BATCH ({settings.max_batch})")
        changes[column] = value
    return changes
