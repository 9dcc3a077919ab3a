"""A tenant's SMTP server is hostile by default: one that repeats the password it was sent in its
refusal must not get it written into ``last_error`` (which the API shows) or a log line."""

from __future__ import annotations

import base64
import logging
import socket
import threading

import pytest
import sqlalchemy as sa

from shared.tasks import views

PASSWORD = "hunter2-Echo-Pw-5150"


class EchoingSmtpServer:
    """A raw SMTP server on 127.0.0.1 that offers AUTH PLAIN and, at ``stage`` (AUTH, MAIL or DATA),
    refuses with a reply that quotes the password the client logged in with."""

    def __init__(self, stage: str, reply: str):
        self.stage, self.reply = stage, reply
        self.host = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopping = threading.Event()
        self._conn: socket.socket | None = None

    def __enter__(self) -> EchoingSmtpServer:
        self._listener.settimeout(0.05)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None:  # a pooled client connection: hang up on it, as a server's idle timeout would
            conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self._conn = conn
                try:
                    self._talk(conn)
                except OSError:
                    pass
                self._conn = None

    def _talk(self, conn: socket.socket) -> None:
        lines = conn.makefile("rb")
        password = ""

        def send(text: str) -> None:
            conn.sendall(text.encode() + b"\r\n")

        def answer(stage: str, ok: str) -> None:
            send(self.reply.format(password=password) if stage == self.stage else ok)

        send("220 echo.test ESMTP")
        for raw in lines:
            command = raw.decode().strip()
            verb = command.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                send("250-echo.test\r\n250 AUTH PLAIN")
            elif verb == "AUTH":
                password = base64.b64decode(command.split()[2]).split(b"\0")[2].decode()
                answer("AUTH", "235 2.7.0 authenticated")
            elif verb == "MAIL":
                answer("MAIL", "250 OK")
            elif verb == "DATA":
                send("354 go ahead")
                for line in lines:
                    if line == b".\r\n":
                        break
                answer("DATA", "250 OK queued")
            elif verb == "QUIT":
                send("221 bye")
                return
            else:  # RCPT, RSET, NOOP
                send("250 OK")


@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        # a refused login pauses the account: the mail waits, the reason in last_error and on the user
        ("AUTH", "535 5.7.8 {password} is not the password", "queued"),
        ("MAIL", "550 5.7.1 the account with password {password} may not send", "cancelled"),
        ("DATA", "451 4.3.0 try again later, {password}", "failed"),
    ],
    ids=["535-to-auth", "550-to-mail-from", "451-to-data"],
)
def test_a_password_the_server_repeats_is_not_recorded_or_logged(pipe, caplog, stage, reply, status):
    caplog.set_level(logging.DEBUG)
    with EchoingSmtpServer(stage, reply) as server:
        user = pipe.user(server, **{"smtp-username": "ada", "smtp-password": PASSWORD})
        task_id = pipe.enqueue(user)
        pipe.pump()
    row = pipe.task(task_id)
    view = views.get_task(pipe.ctx, user.id, task_id)
    with pipe.ctx.engine.connect() as conn:
        paused_reason = conn.execute(sa.text("SELECT smtp_paused_reason FROM users")).scalar_one()
        logged = conn.execute(sa.text("SELECT reply FROM task_attempts WHERE task_id = :id"), {"id": task_id})
        replies = [r for (r,) in logged]
    # The reply was recorded: on the task (a refused login is the account's: nothing was claimed, the
    # task says why it waits), in its attempt log, and on the paused account…
    recorded = [row.last_error or view["waiting"], *replies]
    assert row.status == status and all(reply[:3] in text for text in recorded) and replies
    assert not any(PASSWORD in text for text in recorded)  # …without the password in it
    assert PASSWORD not in caplog.text
    assert (paused_reason is not None) == (stage == "AUTH") and PASSWORD not in (paused_reason or "")
