"""Key rotation: every stored secret re-encrypted with the first key of MAILQ_ENCRYPTION_KEYS, so the
older keys can be retired (`mailq rotate-keys`).

A secret that no configured key decrypts is left as it is and reported by table and id: the run goes on
with the rest, and the operator decides what to do with that row (its owner sets a new SMTP password, or
rotates the webhook secret). One bad row never stops a rotation of thousands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.crypto import SecretBox
from shared.errors import ConfigError

log = logging.getLogger("mailq.keys")

# (table, column) of every secret stored encrypted: SMTP passwords, webhook signing secrets (the current
# one and one still in its rotation overlap).
ENCRYPTED = (
    ("users", "smtp_password_enc"),
    ("webhook_endpoints", "secret_enc"),
    ("webhook_endpoints", "previous_secret_enc"),
)


@dataclass
class Rotation:
    """What a rotation did: how many secrets it rewrote, and each one no key decrypts (table, id)."""

    rewritten: int = 0
    undecryptable: list[tuple[str, int]] = field(default_factory=list)


def rotate_keys(engine: Engine, box: SecretBox, batch: int = 500) -> Rotation:
    """Re-encrypt every stored secret with the first key; safe while the service runs and to run again.

    A secret that cannot be decrypted with any configured key is skipped and listed (by table and id,
    never its value), and the rest are rotated all the same."""
    rotation = Rotation()
    for table, column in ENCRYPTED:
        _rotate_column(engine, box, table, column, batch, rotation)
    return rotation


def _rotate_column(engine: Engine, box: SecretBox, table: str, column: str, batch: int, rotation: Rotation):
    after = 0
    select = sa.text(
        f"SELECT id, {column} AS token FROM {table} WHERE id > :after AND {column} IS NOT NULL"  # noqa: S608 - fixed names
        " ORDER BY id LIMIT :batch FOR UPDATE"
    )
    update = sa.text(f"UPDATE {table} SET {column} = :token WHERE id = :id")  # noqa: S608 - fixed names
    while True:
        with engine.begin() as conn:
            rows = conn.execute(select, {"after": after, "batch": batch}).all()
            for row in rows:
                if box.is_current(row.token):
                    continue
                try:
                    token = box.rotate(row.token)
                except ConfigError:
                    rotation.undecryptable.append((table, row.id))
                    log.warning(
                        "%s %d: its %s cannot be decrypted with any configured key; skipped",
                        table,
                        row.id,
                        column,
                    )
                    continue
                conn.execute(update, {"id": row.id, "token": token})
                rotation.rewritten += 1
        if not rows:
            return
        after = rows[-1].id
