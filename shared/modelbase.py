"""The declarative base every table of ``shared.models`` (and ``shared.attempt_log``) is defined on:
one metadata, which the migrations are checked against."""

from __future__ import annotations

from sqlalchemy import orm


class Base(orm.DeclarativeBase):
    pass
