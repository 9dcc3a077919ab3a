"""Reading one page of a search (shared.tasks.search): the statements, each through one index, and
the loop that runs them. The module docstring of shared.tasks.search says which index serves which
search; tests/test_queue_plans.py measures what each page reads at 1,000,000 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from shared.accounts import standing
from shared.context import Context
from shared.models import SUBJECT_KEY_LENGTH, subject_key, task_tags, tasks
from shared.tasks import views
from shared.tasks.search import (
    BY_CREATED,
    BY_ID,
    BY_MESSAGE_ID,
    BY_RECIPIENT,
    BY_SUBJECT,
    BY_TAG,
    SCANNED,
    STATUSES,
    Search,
    decode_cursor,
    encode_cursor,
)

SCAN_ROWS = 1000  # rows one request looks at, at most, when the index does not decide every condition
CHUNK_ROWS = 100  # ... read this many (or a page and one more) per statement

# --- the statements ------------------------------------------------------------------------------------


def _only(column: sa.Column, user_id: int) -> sa.ColumnElement[bool]:
    """``column = ANY('{user_id}')``: the same estimate as ``column = user_id``, but not an equality the
    planner folds into a constant, so ``ORDER BY user_id, id`` stays an order only an index led by
    ``user_id`` provides (with ``user_id = …`` walking the primary key in id order, filtering, would
    satisfy it too -- through the user's whole history first)."""
    return column == sa.any_(sa.literal([int(user_id)], sa.ARRAY(sa.BigInteger)))


def _status_in(statuses: tuple[str, ...]) -> sa.ColumnElement[bool]:
    if len(statuses) == 1:
        return tasks.c.status == statuses[0]
    # Literal values (validated constants) let PostgreSQL match the partial index for this exact
    # status set even under a generic plan.
    assert all(s in STATUSES for s in statuses)
    return sa.text(f"tasks.status IN ({', '.join(repr(s) for s in statuses)})")


def _like_prefix(text: str) -> str:
    """A LIKE pattern for "starts with ``text``": its own %, _ and \\ match only themselves."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _subject_prefix(column: sa.ColumnElement, prefix: str) -> sa.ColumnElement[bool]:
    """``column`` (a subject key) starts with the first SUBJECT_KEY_LENGTH characters of ``prefix``,
    lowercased by PostgreSQL as the index lowercases."""
    pattern = sa.func.lower(sa.literal(_like_prefix(prefix[:SUBJECT_KEY_LENGTH]), sa.Text))
    return column.like(pattern.collate("C"), escape="\\")


def _conditions(search: Search, row: Any, skip: str) -> list[sa.ColumnElement[bool]]:
    """Every condition of ``search`` on ``row`` (a selectable with the task's columns), except what the
    way ``skip`` already decided through its index."""
    where: list[sa.ColumnElement[bool]] = []
    if len(search.statuses) < len(STATUSES):
        where.append(row.c.status.in_(search.statuses))
    if search.created_from is not None:
        where.append(row.c.created_at >= search.created_from)
    if search.created_to is not None:
        where.append(row.c.created_at < search.created_to)
    if search.recipient is not None and skip != BY_RECIPIENT:
        where.append(row.c.recipient_email == search.recipient)
    if search.message_id is not None and skip != BY_MESSAGE_ID:
        where.append(row.c.message_id == search.message_id)
    if search.subject is not None:
        if skip != BY_SUBJECT:
            where.append(_subject_prefix(subject_key(row.c.subject), search.subject))
        if len(search.subject) > SUBJECT_KEY_LENGTH:  # beyond what the index holds: the whole prefix
            full = sa.func.lower(sa.literal(_like_prefix(search.subject), sa.Text))
            where.append(sa.func.lower(row.c.subject).like(full, escape="\\"))
    if search.tag is not None and skip != BY_TAG:
        where.append(sa.exists().where(task_tags.c.task_id == row.c.id, task_tags.c.tag == search.tag))
    return where


def statement(user_id: int, search: Search, limit: int, after: tuple | None = None) -> sa.Select:
    """The statement that reads one page (tests EXPLAIN it): a page and one more row of the task's
    VIEW_COLUMNS in the way's order, or for a scanned way the first of the statements that look
    at its rows (``_scanned``)."""
    way = search.way
    if way in SCANNED:
        return _scanned(user_id, search, chunk_size(limit), after)
    if way == BY_ID:  # the key, then the rest of the search on that one row
        return sa.select(*views.VIEW_COLUMNS).where(
            tasks.c.id == search.task_id,
            tasks.c.user_id == user_id,
            *_conditions(search, tasks, BY_ID),
            *([tasks.c.id > after[0]] if after else []),
        )
    if way == BY_CREATED:
        return _merged(user_id, search, limit, after, by_created=True)
    if search.statuses == STATUSES:
        return _merged(user_id, search, limit, after, by_created=False)
    # One status, still to go out, or failed or cancelled: an index of exactly those rows, in id order.
    return (
        sa.select(*views.VIEW_COLUMNS)
        .where(
            _only(tasks.c.user_id, user_id),
            _status_in(search.statuses),
            *([tasks.c.id > after[0]] if after else []),
        )
        .order_by(tasks.c.user_id, tasks.c.id)
        .limit(limit + 1)
    )


def _merged(user_id: int, search: Search, limit: int, after: tuple | None, *, by_created: bool) -> sa.Select:
    """One index range per status (tasks_user_status_created by created_at, or tasks_user_status_id by
    id), each read in order up to a page, merged: at most a page per status is read. Each branch
    selects only the index's own columns, so an index-only scan is its cheapest plan whatever the
    statistics say; the page's rows are then fetched by key."""
    branches = []
    for status in search.statuses:
        if by_created:
            order = (tasks.c.created_at, tasks.c.id)
            where = [tasks.c.user_id == user_id, tasks.c.status == status]
            if search.created_from is not None:
                where.append(tasks.c.created_at >= search.created_from)
            if search.created_to is not None:
                where.append(tasks.c.created_at < search.created_to)
            if after:
                where.append(sa.tuple_(*order) > sa.tuple_(*after))
        else:
            order = (tasks.c.user_id, tasks.c.id)
            where = [_only(tasks.c.user_id, user_id), tasks.c.status == status]
            if after:
                where.append(tasks.c.id > after[0])
        branches.append(sa.select(*order).where(*where).order_by(*order).limit(limit + 1))
    keys = sa.union_all(*branches).subquery("keys")
    key_order = (keys.c.created_at, keys.c.id) if by_created else (keys.c.user_id, keys.c.id)
    page = sa.select(*keys.c).order_by(*key_order).limit(limit + 1).subquery("page")
    row = (
        sa.select(*views.VIEW_COLUMNS)
        .where(tasks.c.id == page.c.id)
        .limit(1)  # one row by its key; the LIMIT keeps PostgreSQL from flattening it into a join
        .lateral("t")
    )
    page_order = (page.c.created_at, page.c.id) if by_created else (page.c.user_id, page.c.id)
    return sa.select(*row.c).select_from(page.join(row, sa.true())).order_by(*page_order)


def chunk_size(limit: int) -> int:
    """Rows a scanned way reads per statement: a page and one more, and at least CHUNK_ROWS."""
    return min(SCAN_ROWS, max(limit + 1, CHUNK_ROWS))


def _scanned(user_id: int, search: Search, size: int, after: tuple | None) -> sa.Select:
    """The next ``size`` of the user's rows in the way's index order, each with ``hit``: whether it
    meets the rest of the search.

    A LIMIT of a page or so is what keeps PostgreSQL on the index's order, which stops early. Planned
    for a LIMIT of 1,000 (SCAN_ROWS at once), a recipient with 2,000 mails was read whole for a page
    of 50 (a bitmap scan and a sort of all of them: cheaper for 1,000 rows, not for the 52 needed),
    and a tag of 50,000 rows was sorted whole before the index's visibility map was set."""
    way = search.way
    if way == BY_TAG:
        tagged = (
            sa.select(task_tags.c.task_id)
            .where(
                task_tags.c.user_id == user_id,
                task_tags.c.tag == search.tag,
                *([task_tags.c.task_id > after[0]] if after else []),
            )
            .order_by(task_tags.c.task_id)
            .limit(size)
            .subquery("tagged")
        )
        # A chunk of the tag's rows, then each task by its key (the chunk is a LIMITed subquery, so
        # the planner cannot turn this into a walk of all the user's tasks).
        looked = (
            sa.select(*views.VIEW_COLUMNS, tagged.c.task_id.label("pos"))
            .select_from(tagged.join(tasks, tasks.c.id == tagged.c.task_id))
            .where(tasks.c.user_id == user_id)
        )
        order: tuple = ("pos",)
    elif way == BY_SUBJECT:
        key = subject_key(tasks.c.subject)
        where = [tasks.c.user_id == user_id, _subject_prefix(key, search.subject)]
        if after:
            where.append(sa.tuple_(key, tasks.c.id) > sa.tuple_(sa.literal(after[0], sa.Text), after[1]))
        looked = (
            sa.select(*views.VIEW_COLUMNS, key.label("subject_key"))
            .where(*where)
            .order_by(key, tasks.c.id)
            .limit(size)
        )
        order = ("subject_key", "id")
    else:
        column = tasks.c.recipient_email if way == BY_RECIPIENT else tasks.c.message_id
        value = search.recipient if way == BY_RECIPIENT else search.message_id
        looked = (
            sa.select(*views.VIEW_COLUMNS, tasks.c.user_id)
            .where(
                _only(tasks.c.user_id, user_id),
                column == value,
                *([tasks.c.id > after[0]] if after else []),
            )
            .order_by(tasks.c.user_id, tasks.c.id)
            .limit(size)
        )
        order = ("user_id", "id")
    rows = looked.subquery("looked")
    hit = sa.and_(sa.true(), *_conditions(search, rows, way))
    return sa.select(*rows.c, hit.label("hit")).order_by(*(rows.c[name] for name in order))


# --- running a search ---------------------------------------------------------------------------------


@dataclass
class Page:
    items: list[Any] = field(default_factory=list)  # the matching rows, in the way's order
    next_cursor: str | None = None


def read(conn, user_id: int, search: Search, limit: int, cursor: str | None) -> Page:
    """One page of ``search`` for ``user_id``: at most ``limit`` rows, and the cursor that goes on."""
    way = search.way
    after = decode_cursor(way, cursor)
    page = Page()
    if way not in SCANNED:
        rows = conn.execute(statement(user_id, search, limit, after)).all()
        page.items = rows[:limit]
        if len(rows) > limit:
            page.next_cursor = encode_cursor(way, rows[limit - 1])
        return page
    looked, size = 0, chunk_size(limit)
    while looked < SCAN_ROWS:
        size = min(size, SCAN_ROWS - looked)
        rows = conn.execute(_scanned(user_id, search, size, after)).all()
        for row in rows:
            if row.hit:
                if len(page.items) == limit:  # one match more than the page: there is a next page
                    page.next_cursor = encode_cursor(way, page.items[-1])
                    return page
                page.items.append(row)
            after = _position(way, row)
        looked += len(rows)
        if len(rows) < size:  # the index has no more of the user's rows
            return page
    page.next_cursor = encode_cursor(way, rows[-1])  # looked at all it may: go on after the last one
    return page


def _position(way: str, row: Any) -> tuple:
    if way == BY_SUBJECT:
        return (row.subject_key, row.id)
    return (row.pos,) if way == BY_TAG else (row.id,)


def list_tasks(ctx: Context, caller_id: int, found: Search, limit: int, cursor: str | None) -> dict[str, Any]:
    """The answer of GET /task/queue and /task/queue/fail: ``{items, next_cursor}``."""
    with ctx.engine.connect() as conn:
        page = read(conn, caller_id, found, limit, cursor)
    queued = any(r.status == "queued" for r in page.items)
    waiting = standing.waiting(ctx, caller_id) if queued else None  # why the account's queued mail waits
    items = [views.task_view(r, max_tries=ctx.settings.max_try_count, waiting=waiting) for r in page.items]
    return {"items": items, "next_cursor": page.next_cursor}
