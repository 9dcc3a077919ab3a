"""The development SMTP sink: what it stores, how it reports a taken port, and that any login works."""

from __future__ import annotations

import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest

from shared.config import Settings
from shared.delivery.mailer import Mailer
from shared.delivery.message import build_message, message_id_for
from shared.delivery.smtp import SmtpAccount
from shared.domain import SmtpSecurity
from shared.local.sink import Sink, count_message_ids, read_mailbox

SETTINGS = Settings(smtp_timeout=5.0)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sink(tmp_path):
    with Sink(tmp_path, port=0) as running:
        yield running


def a_message(task_id: int, subject: str = "Hello"):
    return build_message(
        sender="alice@example.com",
        recipient="bob@example.org",
        subject=subject,
        body="Hi there.\n",
        message_id=message_id_for(task_id, "alice@example.com"),
        date=datetime.now(UTC),
    )


def send(sink: Sink, *messages, username: str = "", password: str = "") -> None:
    account = SmtpAccount(sink.host, sink.port, username, password, SmtpSecurity.NONE)
    with Mailer(SETTINGS) as mailer:
        for message in messages:
            mailer.send(account, message)


def test_the_sink_stores_a_message_and_read_mailbox_returns_it(sink, tmp_path):
    send(sink, a_message(1, subject="Grüße"))

    [record] = read_mailbox(tmp_path)
    assert record["mail_from"] == "alice@example.com"
    assert record["rcpt_tos"] == ["bob@example.org"]
    assert record["subject"] == "Grüße"
    assert record["message_id"] == message_id_for(1, "alice@example.com")
    assert datetime.fromisoformat(record["received_at"]).tzinfo is not None
    stored = message_from_bytes((tmp_path / "mailbox" / record["file"]).read_bytes(), policy=default_policy)
    assert stored["Message-ID"] == record["message_id"]
    assert not list((tmp_path / "mailbox").glob(".*.tmp"))


def test_the_sink_offers_pipelining_and_stores_pipelined_mail_in_order(sink, tmp_path):
    with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
        client.ehlo()
        assert client.has_extn("pipelining")
    send(sink, *(a_message(i, subject=f"#{i}") for i in range(3)))  # the mailer pipelines when offered
    assert [r["subject"] for r in read_mailbox(tmp_path)] == ["#0", "#1", "#2"]


def test_read_mailbox_returns_the_latest_messages_newest_last(sink, tmp_path):
    send(sink, *(a_message(n, subject=f"mail {n}") for n in range(5)))

    records = read_mailbox(tmp_path, limit=3)

    assert [r["subject"] for r in records] == ["mail 2", "mail 3", "mail 4"]
    files = sorted(p.name for p in (tmp_path / "mailbox").glob("*.eml"))
    assert files[-3:] == [r["file"] for r in records]  # file names sort by arrival


def test_count_message_ids_counts_each_delivery(sink, tmp_path):
    send(sink, a_message(1), a_message(1), a_message(2))

    counts = count_message_ids(tmp_path)

    assert counts[message_id_for(1, "alice@example.com")] == 2
    assert counts[message_id_for(2, "alice@example.com")] == 1


def test_an_empty_mailbox_reads_as_nothing(tmp_path):
    assert read_mailbox(tmp_path) == []
    assert count_message_ids(tmp_path) == {}


def test_any_login_is_accepted(sink, tmp_path):
    send(sink, a_message(1), username="whoever@example.com", password="anything at all")

    assert len(read_mailbox(tmp_path)) == 1


def test_a_taken_port_gives_a_clear_error(tmp_path, sink):
    with pytest.raises(RuntimeError) as caught:
        Sink(tmp_path / "second", port=sink.port).start()

    assert str(caught.value) == (
        f"SMTP sink cannot listen on 127.0.0.1:{sink.port}: address already in use (use --smtp-port)"
    )


def test_serve_forever_runs_until_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        f"from shared.local.sink import serve_forever; serve_forever({str(tmp_path)!r}, '127.0.0.1', {port})"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the sink did not start"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_login_leaves_no_deprecation_warning_in_the_log_or_the_warnings(sink, tmp_path, caplog, recwarn):
    # aiosmtpd 1.4 logs "Session.login_data is deprecated" (on its logger mail.log) for its own
    # assignment on every AUTH; `mailq dev` printed it once per mail.
    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        send(sink, a_message(1), username="ada", password="anything")

    assert len(read_mailbox(tmp_path)) == 1
    assert any("AUTH" in r.getMessage() for r in caplog.records), "the AUTH exchange was not logged at all"
    deprecations = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert deprecations == []
    assert [str(w.message) for w in recwarn] == []
