"""The process's Settings, read once from its environment for a `mailq` command: a setting that is
wrong ends the command with its message (a click error), never a traceback."""

from __future__ import annotations

import os

import click

from shared.config import Settings
from shared.errors import ConfigError


def load_settings(environ=None) -> Settings:
    try:
        return Settings.from_env(os.environ if environ is None else environ)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
