"""PostgreSQL: the engine (its timeouts, timestamps and prepared statements), what counts as the
database being unavailable, and the migration entry point. The tables are in ``shared.models``.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from pg8000 import converters
from sqlalchemy.engine import Engine

from shared import prepared

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


# Every socket operation on a PostgreSQL connection ends within this many seconds (the default of
# DATABASE_SOCKET_TIMEOUT), so a connection that went half-open (a peer gone without a reset) is
# noticed instead of hanging a worker forever.
SOCKET_TIMEOUT = 60.0


def on_the_row(condition: str) -> str:
    """A condition on the row a statement finds by its primary key, written so that the planner cannot
    take it as a reason to use a partial status index instead (``coalesce`` hides it from index
    matching; in a WHERE clause NULL and false are the same).

    ``WHERE id = :id AND status = 'queued'`` may otherwise be planned as a scan of the partial index of
    queued rows, filtered by id, whenever the table's statistics say that index is nearly empty - as
    they do after an ANALYZE taken while nothing was queued. During the next burst every claim then read
    every queued row, and a drain grew with the square of its backlog (measured: PostgreSQL's CPU per
    mail 0.8 -> 2.7 ms on 20,000 queued rows; tests/test_prepared.py reproduces the plan).
    """
    return f"coalesce({condition}, false)"


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    max_overflow: int | None = None,
    socket_timeout: float = SOCKET_TIMEOUT,
) -> Engine:
    """A new engine. ``pre_ping`` checks each connection before use, so a request right after a
    PostgreSQL restart does not fail; workers skip it (one round trip per transaction) because
    their loop retries a failed step anyway, and SQLAlchemy drops the dead pool on the first error."""
    engine = sa.create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_recycle=1800,
        hide_parameters=True,  # bound values (hashes, ciphertexts, mail bodies) never reach an error log
        connect_args={"timeout": socket_timeout},
    )
    sa.event.listen(engine, "handle_error", _timeout_is_a_disconnect)
    if engine.dialect.driver == "pg8000":
        sa.event.listen(engine, "connect", _read_timestamps_natively)
    prepared.install(engine)  # the per-mail statements: prepared once per connection, one round trip
    return engine


def timestamptz_in(text: str):
    """A ``timestamptz`` as PostgreSQL writes it (``2026-12-01 20:10:17.12+00``), read by the C
    parser of ``datetime.fromisoformat``; what that refuses (infinity, BC dates, years past 9999)
    is read by pg8000's own converter, as before.

    pg8000 reads every timestamp with ``strptime`` (and retries with dateutil whenever the offset is
    not whole hours): ~8 us each, 80 times the C parser. A queue page of 50 tasks holds 250 of them:
    it was most of the page's time in Python (tests/bench's scale scenario), and a few per cent of a
    sender's CPU (the claim returns two)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return converters.timestamptz_in(text)


def timestamp_in(text: str):
    """The same for ``timestamp`` (without time zone)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return converters.timestamp_in(text)


def _read_timestamps_natively(dbapi_connection, _record) -> None:
    dbapi_connection.register_in_adapter(converters.TIMESTAMPTZ, timestamptz_in)
    dbapi_connection.register_in_adapter(converters.TIMESTAMP, timestamp_in)


def _timeout_is_a_disconnect(context) -> None:
    # pg8000 lets a read that timed out (a half-open connection: no reply, no reset) escape as a bare
    # TimeoutError, which SQLAlchemy does not take for a lost connection: it would try a ROLLBACK on
    # it and log the failure. Marked as a disconnect, the connection (and the pool) is dropped at once.
    if isinstance(context.original_exception, TimeoutError):
        context.is_disconnect = True


def engine_for(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    max_overflow: int | None = None,
    socket_timeout: float = SOCKET_TIMEOUT,
) -> Engine:
    """One engine per URL per process, created on first use (never at import time)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(
                url,
                pool_size=pool_size,
                pre_ping=pre_ping,
                max_overflow=max_overflow,
                socket_timeout=socket_timeout,
            )
        return engine


def dispose_engines() -> None:
    """Drop pooled connections, e.g. after a fork."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


# SQLSTATEs of a server that is going away, not there yet, or out of room for us right now: class 08
# (connection exceptions), class 53 (insufficient resources: 53300 too many connections, 53100 disk
# full, 53200 out of memory) and the shutdown codes of class 57.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
_UNAVAILABLE_CLASSES = ("08", "53")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL cannot be used right now (down, restarting, connection lost).

    A shutting-down server answers a new connection with 57P03, which SQLAlchemy raises as a
    ProgrammingError; pg8000 may surface a reset socket as a bare ConnectionError, and a connection
    that stopped answering (DATABASE_SOCKET_TIMEOUT) as a bare TimeoutError.
    """
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        args = getattr(exc.orig, "args", ())
        code = args[0].get("C") if args and isinstance(args[0], dict) else None
        return bool(code) and (code.startswith(_UNAVAILABLE_CLASSES) or code in _UNAVAILABLE_SQLSTATES)
    return False


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    return config


def migrate(url: str) -> None:
    """Bring the schema to the newest migration; safe to run again and from two processes at once."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
