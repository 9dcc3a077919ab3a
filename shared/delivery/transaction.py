"""One message transaction on an open SMTP session: MAIL FROM, RCPT TO for each recipient, DATA and
the message; pipelined (RFC 2920) when the server offers PIPELINING, else one command at a time.

Pipelined, MAIL FROM, every RCPT TO and DATA leave in one write and their replies are read in order,
then the message goes and its final reply comes: two round trips per mail, however many recipients,
where one command at a time takes three plus one per recipient. Every reply is still looked at (RFC
2920 3.1), and a failure is raised exactly as the one-at-a-time path raises it, with the same stage,
so the mailer classifies both alike (shared.delivery.failures):

- MAIL FROM refused: that reply, stage "MAIL FROM"; nothing is sent.
- a recipient refused with 4xx: that reply (naming the recipient when there are several), stage
  "RCPT TO"; nothing is sent, so the whole mail is retried later and nobody gets it twice.
- every recipient refused: the first refusal, stage "RCPT TO"; nothing is sent.
- some recipients refused with 5xx: the others get the mail; ``refused`` names who did not.
- DATA refused, or the message's final reply not 250: that reply, stage "DATA".
- a 421 (the server is closing the session): that reply, at its stage, at once.

A pipelined DATA may be answered 354 although the message must not follow. The data phase then ends
without it: with the terminating dot alone when the server accepted no recipient (RFC 2920 3.1: it
has nobody to deliver to), else by hanging up, since a dot would deliver an empty message to the
recipients it accepted and a session closed in the data phase aborts the transaction (RFC 5321 3.8).
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from smtplib import SMTPResponseException, quoteaddr

from shared.delivery.failures import reply_text
from shared.delivery.smtp import PinnedSMTP

_ACCEPTED = (250, 251)  # a recipient's reply that accepts it
_CLOSING = 421  # the server says it is closing the session: no further reply will come


class Transaction:
    """One mail over ``smtp``; ``run()`` sends it and returns the final reply.

    After a failure, ``stage`` names the command whose reply it was ("RSET" for the reset an earlier
    refusal left pending, ``PinnedSMTP.reset_later``; then "MAIL FROM", "RCPT TO", "DATA"), and
    ``reusable`` says whether the session is still in step with the server (False: only hanging up ends
    it safely).
    """

    def __init__(
        self, smtp: PinnedSMTP, sender: str, recipients: Sequence[str], data: bytes, options: Sequence[str]
    ):
        self.smtp = smtp
        self.sender = sender
        self.recipients = tuple(recipients)
        self.data = data
        self.options = tuple(options)
        self.stage = "RSET" if smtp.reset_pending else "MAIL FROM"
        self.refused: list[tuple[str, int, str]] = []  # (address, code, reply) of recipients refused
        self.reusable = True

    @property
    def pipelined(self) -> bool:
        return bool(self.smtp.has_extn("pipelining"))

    def run(self) -> tuple[int, bytes]:
        """Send the mail; return the final reply (code 250). Raises smtplib.SMTPResponseException for
        a refusal, or whatever the session raised (smtplib.SMTPException, OSError)."""
        return self._pipelined() if self.pipelined else self._one_at_a_time()

    # --- one command at a time ---

    def _one_at_a_time(self) -> tuple[int, bytes]:
        smtp = self.smtp
        if smtp.reset_pending:
            self.stage = "RSET"
            self._check_reset(*smtp.docmd("RSET"))
        self.stage = "MAIL FROM"
        code, reply = smtp.mail(self.sender, self.options)
        if code != 250:
            raise SMTPResponseException(code, reply)
        self.stage = "RCPT TO"
        for address in self.recipients:
            code, reply = smtp.rcpt(address)
            if code not in _ACCEPTED:
                self.refused.append((address, code, reply_text(reply)))
                if code == _CLOSING:
                    break
        self._check_refusals()
        self.stage = "DATA"
        code, reply = smtp.data(self.data)
        if code != 250:
            raise SMTPResponseException(code, reply)
        return code, reply

    # --- pipelined ---

    def _pipelined(self) -> tuple[int, bytes]:
        smtp = self.smtp
        options = f" {' '.join(self.options)}" if self.options else ""
        if any(option.upper() == "SMTPUTF8" for option in self.options):
            smtp.command_encoding = "utf-8"  # as smtplib's mail() does
        group = [
            f"MAIL FROM:{quoteaddr(self.sender)}{options}",
            *(f"RCPT TO:{quoteaddr(address)}" for address in self.recipients),
            "DATA",
        ]
        reset = smtp.reset_pending  # left by a refused mail: RSET leads the group (RFC 2920 allows it)
        self.stage = "RSET" if reset else "MAIL FROM"
        smtp.send_group(["RSET", *group] if reset else group)
        if reset:
            self._check_reset(*self._reply())
        replies = self._read_replies(len(group))
        # The replies, judged in the order the one-at-a-time path meets them.
        failure = self._judge(replies)
        data_reply = replies[-1] if len(replies) == len(group) else None
        if failure is not None:
            if data_reply is not None and data_reply[0] == 354:
                self._abandon_data_phase(replies[1:-1])
            raise failure
        self.stage = "DATA"
        code, reply = data_reply  # type: ignore[misc]  # _judge raised unless every reply was read
        if code != 354:
            raise SMTPResponseException(code, reply)
        smtp.send_message(self.data)
        code, reply = smtp.getreply()
        if code != 250:
            raise SMTPResponseException(code, reply)
        return code, reply

    def _read_replies(self, count: int) -> list[tuple[int, bytes]]:
        """Up to count replies, in order; reading stops after a 421 (the server is closing).

        A read that fails is raised, at the stage of the command it was the reply to, unless an earlier
        reply already failed the mail: that one is what the one-at-a-time path would have raised.
        """
        replies: list[tuple[int, bytes]] = []
        for index in range(count):
            stage = self._stage_of(index, count)
            try:
                code, reply = self.smtp.getreply()
            except (smtplib.SMTPException, OSError):
                self.reusable = False  # replies are still due, or the session is gone
                if self._judge(replies) is None:
                    self.stage = stage
                    raise
                return replies
            replies.append((code, reply))
            if code == _CLOSING:
                self.reusable = False
                break
        return replies

    def _judge(self, replies: list[tuple[int, bytes]]) -> SMTPResponseException | None:
        """The refusal among the replies read so far (MAIL FROM's, then each RCPT TO's) that ends the
        transaction, with ``stage`` set to where it was; None if there is none (yet)."""
        self.refused = []
        if not replies:
            return None
        code, reply = replies[0]
        if code != 250:
            self.stage = "MAIL FROM"
            return SMTPResponseException(code, reply)
        rcpt_replies = replies[1 : 1 + len(self.recipients)]
        for address, (code, reply) in zip(self.recipients, rcpt_replies, strict=False):
            if code not in _ACCEPTED:
                self.refused.append((address, code, reply_text(reply)))
        closing = any(code == _CLOSING for _, code, _ in self.refused)
        if not closing and len(rcpt_replies) < len(self.recipients):
            return None  # the one-at-a-time path judges the recipients once it has asked for all
        try:
            self._check_refusals()
        except SMTPResponseException as refusal:
            self.stage = "RCPT TO"
            return refusal
        return None

    def _check_refusals(self) -> None:
        """Raise the RCPT TO refusal that stops the mail: any 4xx (nothing is sent yet, so the whole mail
        is retried later and nobody gets it twice), or every recipient refused. Only 5xx for some: the
        others get it."""
        if not self.refused:
            return
        address, code, text = next((r for r in self.refused if r[1] < 500), self.refused[0])
        if code < 500 or len(self.refused) == len(self.recipients):
            who = f" <{address}>" if len(self.recipients) > 1 else ""
            raise SMTPResponseException(code, text + who)

    def _abandon_data_phase(self, rcpt_replies: list[tuple[int, bytes]]) -> None:
        """The server said 354 to a DATA whose message must not follow: end the data phase without it."""
        if any(code in _ACCEPTED for code, _ in rcpt_replies):
            self.reusable = False  # a dot would deliver an empty message: only a hang-up aborts it
            return
        try:  # nobody to deliver to: the dot alone ends the data phase (RFC 2920 3.1)
            self.smtp.send(b".\r\n")
            self.smtp.getreply()
        except (smtplib.SMTPException, OSError):
            self.reusable = False

    def _reply(self) -> tuple[int, bytes]:
        try:
            return self.smtp.getreply()
        except (smtplib.SMTPException, OSError):
            self.reusable = False
            raise

    def _check_reset(self, code: int, reply: bytes) -> None:
        """The reply to the RSET a refused mail left pending; the session is no good unless it is 250."""
        if code != 250:
            self.reusable = False  # the group behind it is in flight, or the server is closing
            raise SMTPResponseException(code, reply)
        self.smtp.reset_pending = False

    def _stage_of(self, index: int, count: int) -> str:
        if index == 0:
            return "MAIL FROM"
        return "DATA" if index == count - 1 else "RCPT TO"
