"""An account's open connections, as a sender counts them: an idle pooled connection keeps an idle slot.

The fair queue (shared.fairqueue) caps an account's slots across every sender; a slot is an open
connection, busy with a conversation or idle in a sender's pool between mails. When a conversation's
connection goes back to the pool, its busy slot becomes an idle one in the same step that lets go of
the envelope (``Sender.done`` with ``parked``); a take hands the idle slot back to this sender with the
connection's number (``Taken.reuse``); the pool tells when it closes one (``Mailer.on_close``). So
every sender together keeps no more connections open than the relay allows the account.
"""

from __future__ import annotations

import redis

PARK_MARGIN = 4.0  # seconds an idle connection's slot outlives the pool's idle limit, for a busy sender


class Parking:
    """A part of the Sender: its fair queue (``sendq``), mailer, holder prefix and ``_parked_ms``."""

    def _parked(self, session) -> str:
        """The idle slot of ``session``'s connection if it went back to the pool ('' if it did not):
        counted with the account's connections until this sender reuses or closes it."""
        if session is None or not session.connection.pooled or session.tenant is None:
            return ""
        member = f"~{self._holder}{session.connection.id}"
        session.connection.tag = (session.tenant, member)
        return member

    def counted(self, session, tenant: int, handed: int) -> None:
        """``session`` carries the envelope's conversation, counted by its busy slot: a pooled
        connection other than the one whose idle slot the take handed over lets go of its own."""
        session.tenant = tenant
        connection = session.connection
        if connection.id != handed and connection.tag is not None:
            self._unpark(connection)

    def _release(self, session) -> None:
        """Pool a connection that carried no mail, its idle slot held before the envelope goes back."""
        if session is None:
            return
        self.mailer.release(session)
        member = self._parked(session)
        if member:
            try:
                self.sendq.park(session.tenant, member, self._parked_ms)
            except redis.RedisError:
                pass  # a connection no slot counts: closed by the pool in SMTP_IDLE_SECONDS

    def _unpark(self, connection) -> None:
        """The pool closed a parked connection: its idle slot is free."""
        tenant, member = connection.tag
        connection.tag = None
        try:
            self.sendq.park(tenant, member, 0, closed=True)
        except redis.RedisError:
            pass  # it expires with its ttl
