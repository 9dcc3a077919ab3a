"""The process's Settings, read once from its environment for a `mailq` command: a setting that is
wrong or missing, or a database that cannot be reached, ends the command with one line (a click error),
never a traceback."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import click

from shared.config import Settings
from shared.errors import ConfigError


def load_settings(environ=None) -> Settings:
    try:
        return Settings.from_env(os.environ if environ is None else environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def require_runtime(settings: Settings) -> Settings:
    """``settings`` when everything a serving process needs is there; else the one line that says what is
    missing (Settings.require_runtime's message)."""
    try:
        settings.require_runtime()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def unreachable(exc: BaseException, settings: Settings) -> click.ClickException | None:
    """The one line for a PostgreSQL or Redis that cannot be reached (where, never the credentials), or
    None when ``exc`` is something else (a bug keeps its traceback)."""
    from shared.workers import dependency_of

    which = dependency_of(exc)
    if which is None:
        return None
    if which == "Redis":
        url, name = settings.redis_url, "REDIS_URL"
    else:
        url, name = settings.database_url, "DATABASE_URL"
    return click.ClickException(
        f"{which} at {_where(url)} cannot be reached ({type(exc).__name__}); check {name}"
    )


def _where(url: str) -> str:
    """host:port of a URL (or a unix socket's path), without user or password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 'default port'}"
    except ValueError:
        return "the configured address"
