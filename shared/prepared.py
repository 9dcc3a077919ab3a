"""The per-mail statements: prepared once per connection, each run as its own transaction.

Through SQLAlchemy, pg8000 spends four exchanges on a one-statement transaction and three more on
every statement: ``BEGIN`` (one round trip), then Parse, Describe and Bind/Execute (three round
trips, the SQL text re-scanned character by character in Python and re-parsed and re-planned by
PostgreSQL each time), then ``COMMIT`` (three more). On the send path that was 14 round trips per
mail for two statements, and most of the workers' and PostgreSQL's CPU per mail.

A statement marked with ``alone()`` instead runs as one Bind/Execute/Sync exchange of a statement
prepared once per pooled connection, and outside any explicit transaction: PostgreSQL runs it in
an implicit transaction of its own, so it commits (or fails) atomically by itself. That is only
right for a statement that is a whole unit of work, so ``run_alone()`` opens the connection without
``begin()``: the pool's reset (a ROLLBACK) then finds no transaction open and costs nothing. Only a
connection that comes with a transaction already open runs the statement the usual way inside it,
and ``run_alone()`` commits it (the pool's pre-ping is an empty query here, see ``_ping``, so that
it does not leave one).

The hook sits at SQLAlchemy's ``do_execute`` dialect event, so SQLAlchemy still compiles the
statement (its cache), runs the statement events (the tests counting statements see it), wraps
errors and notices a lost connection as for any other statement. Statements not marked are untouched.
"""

from __future__ import annotations

import itertools
import re
import weakref

import sqlalchemy as sa
from pg8000.core import make_params
from sqlalchemy.engine import Engine

_OPTION = "mailq_alone"
# pg8000's names of the statements prepared on each driver connection, by SQL text; a connection
# that is dropped takes its statements with it (the server forgets them with the session).
_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# SQLAlchemy's pg8000 dialect uses the "format" paramstyle: %s is a parameter, %% a literal %.
_PLACEHOLDER = re.compile(r"%([s%])")


def alone(statement: sa.TextClause) -> sa.TextClause:
    """Mark a statement that is a whole unit of work, to be run by ``run_alone()``."""
    return statement.execution_options(**{_OPTION: True})


def run_alone(engine: Engine, statement: sa.TextClause, params: dict) -> list[sa.Row]:
    """Run a statement marked with ``alone()`` as its own transaction; returns its rows."""
    with engine.connect() as conn:  # no begin(): the statement commits by itself (see above)
        rows = list(conn.execute(statement, params))
        if conn.connection.driver_connection._in_transaction:  # noqa: SLF001
            # The connection came with a transaction open, so the statement ran the usual way,
            # inside it: commit it, or the pool's reset would undo it.
            conn.commit()
        return rows


def install(engine: Engine) -> None:
    """Serve the statements marked ``alone()`` on this engine's connections (pg8000 only)."""
    if engine.dialect.driver == "pg8000":
        sa.event.listen(engine, "do_execute", _do_execute)
        engine.dialect.do_ping = _ping  # this engine's dialect only


def _ping(dbapi_connection) -> bool:
    """The pool's pre-ping as an empty query: one round trip, and no transaction left open.

    SQLAlchemy's ping is ``SELECT 1`` through a cursor, to which pg8000 adds a ``BEGIN`` (a round
    trip of its own) and leaves the transaction open, so a statement marked ``alone()`` after it
    could only run the usual way inside it. A dead connection fails this as it fails ``SELECT 1``:
    the same socket read raises the same errors, which SQLAlchemy takes for a disconnect."""
    dbapi_connection.execute_simple("")
    return True


def _numbered(statement: str) -> str:
    n = itertools.count(1)
    return _PLACEHOLDER.sub(lambda m: f"${next(n)}" if m.group(1) == "s" else "%", statement)


def _do_execute(cursor, statement, parameters, context) -> bool:
    if not context.execution_options.get(_OPTION):
        return False  # SQLAlchemy executes it the usual way
    pg = context.root_connection.connection.driver_connection
    if pg._in_transaction:  # noqa: SLF001 - inside a transaction it must join it, the usual way
        return False
    statements = _prepared.get(pg)
    if statements is None:
        statements = _prepared[pg] = {}
    prepared = statements.get(statement)
    if prepared is None:
        prepared = statements[statement] = pg.prepare_statement(_numbered(statement), ())
    name, columns, input_funcs = prepared
    result = pg.execute_named(name, make_params(pg.py_types, parameters), columns, input_funcs, statement)
    # What pg8000's Cursor.execute leaves for fetch*() and description.
    cursor._context = result  # noqa: SLF001
    cursor._row_iter = iter(result.rows or ())  # noqa: SLF001
    return True
