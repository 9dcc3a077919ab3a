"""The benchmark's SMTP server: `mailq sink`'s mailbox behind AUTH that checks the credentials.

`mailq sink` accepts mail without AUTH and any login (local development). An independent server
with AUTH is what users send through, so the benchmark's sink requires AUTH before MAIL FROM and
accepts only the accounts it was given (``BENCH_SINK_ACCOUNTS``: a JSON object username → password,
one per tenant). It stores mail exactly as `mailq sink` does (``shared.local.sink``'s handler and index),
so the scenarios read it with the same code. Run: ``python -m tests.bench.authsink DATA_DIR PORT``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
from pathlib import Path

from aiosmtpd.smtp import AuthResult, LoginPassword

from shared.local.sink import MAILBOX, _Controller, _MailboxHandler, run_until_stopped

ACCOUNTS_ENV = "BENCH_SINK_ACCOUNTS"


def authenticator(accounts: dict[str, str]):
    def check(server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        expected = accounts.get(user)
        ok = expected is not None and hmac.compare_digest(expected, password)
        return AuthResult(success=ok, handled=False)

    return check


def serve(data_dir: Path, port: int, accounts: dict[str, str]) -> None:
    mailbox = data_dir / MAILBOX
    mailbox.mkdir(parents=True, exist_ok=True)
    controller = _Controller(
        _MailboxHandler(mailbox),
        hostname="127.0.0.1",
        port=port,
        server_hostname="bench-sink",  # socket.getfqdn() can stall on a slow resolver
        authenticator=authenticator(accounts),
        auth_required=True,  # MAIL FROM before a successful AUTH gets 530
        auth_require_tls=False,  # plaintext on loopback, like the senders' `smtp_security: none`
    )
    run_until_stopped(controller)


if __name__ == "__main__":
    # WARNING, as the benchmark runs `mailq sink`: aiosmtpd logs five INFO lines per mail.
    logging.basicConfig(level=logging.WARNING)
    serve(Path(sys.argv[1]).resolve(), int(sys.argv[2]), json.loads(os.environ[ACCOUNTS_ENV]))
