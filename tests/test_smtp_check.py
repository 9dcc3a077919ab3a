"""Test connection (POST /api/v1/user/{id}/smtp-check) against real SMTP servers: aiosmtpd with AUTH
and TLS from a throwaway CA, the raw-socket hostile server, and a port nobody listens on."""

from __future__ import annotations

import ssl
import time

import pytest

from functions import http
from shared.delivery.check import check_connection
from shared.delivery.smtp import SmtpAccount
from shared.domain import SmtpSecurity
from shared.hosts import PRIVATE_HOST_REFUSED
from tests.conftest import auth_header, login, register_user
from tests.hostile_smtp import HostileSmtpServer, TricklingServer
from tests.smtp_servers import ScriptedSmtpServer, free_port, make_ca, make_self_signed_context

PASSWORD = "smtp-secret-pw"  # register_user's SMTP password


def _user_at(api, port: int, email: str = "ada@example.com", **extra):
    user = register_user(api, email=email, smtp_port=port, **extra)
    return user, auth_header(login(api, email))


def _check(api, user_id: int, headers):
    return api.post(f"/api/v1/user/{user_id}/smtp-check", headers=headers)


def test_a_good_account_is_greeted_and_logged_in_and_nothing_is_sent(api):
    with ScriptedSmtpServer(auth=lambda user, password: password == PASSWORD) as server:
        user, headers = _user_at(api, server.port)
        response = _check(api, user["id"], headers)
    assert response.status_code == 200, response.get_json()
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["ok"] is True and body["error"] is None and body["auth"] == "accepted"
    assert [s["step"] for s in body["steps"]] == ["connect", "greeting", "EHLO", "AUTH", "QUIT"]
    assert all(s["ok"] for s in body["steps"]) and body["steps"][-1]["code"] == 221
    assert body["steps"][1]["code"] == 220 and body["steps"][3]["code"] == 235
    assert any(e.startswith("AUTH") for e in body["extensions"])
    assert body["server"] == f"127.0.0.1:{server.port}" and body["tls"] is None
    assert server.logins == [("ada", True)]
    assert server.data_attempts == 0 and server.received == []
    assert PASSWORD not in response.get_data(as_text=True)


def test_refused_credentials_cost_one_auth_and_say_so_without_pausing_the_account(api):
    with ScriptedSmtpServer(auth=lambda user, password: False) as server:
        user, headers = _user_at(api, server.port)
        body = _check(api, user["id"], headers).get_json()
    assert body["ok"] is False and body["auth"] == "refused"
    assert body["steps"][-1]["step"] == "AUTH" and body["steps"][-1]["ok"] is False
    assert body["steps"][-1]["code"] == 535 and body["error"].startswith("535 ")
    assert server.logins == [("ada", False)]  # one AUTH command, not one per mechanism
    again = api.get(f"/api/v1/user/{user['id']}", headers=headers).get_json()
    assert again["smtp_paused_at"] is None  # a check reports; it never changes the account


def test_a_password_the_server_echoes_is_not_shown():
    refusal = f"535 5.7.8 bad password {PASSWORD}\r\n".encode()
    with HostileSmtpServer(password="the-right-one", auth_refusal=refusal) as server:
        account = SmtpAccount("127.0.0.1", server.port, "ada", PASSWORD, SmtpSecurity.NONE)
        body = check_connection(account, allow_private=True, timeout=5)
    assert body["auth"] == "refused" and server.auth_attempts == 1
    assert PASSWORD not in str(body) and "***" in body["steps"][-1]["reply"]


def test_nobody_listening_fails_at_connect():
    account = SmtpAccount("127.0.0.1", free_port(), "ada", PASSWORD, SmtpSecurity.NONE)
    body = check_connection(account, allow_private=True, timeout=5)
    assert body["ok"] is False and body["auth"] == "not reached"
    assert [s["step"] for s in body["steps"]] == ["connect"] and body["steps"][0]["ok"] is False
    assert "connect" in body["error"]


def test_starttls_shows_the_session_and_the_certificate(tmp_path):
    ca = make_ca(tmp_path)
    with ScriptedSmtpServer(tls_context=ca.server_context(), auth=lambda u, p: True) as server:
        account = SmtpAccount("localhost", server.port, "ada", PASSWORD, SmtpSecurity.STARTTLS)
        body = check_connection(
            account,
            allow_private=True,
            timeout=5,
            ssl_context_factory=lambda: ssl.create_default_context(cafile=str(ca.ca_path)),
        )
    assert body["ok"] is True, body["error"]
    assert [s["step"] for s in body["steps"]] == [
        "connect",
        "greeting",
        "EHLO",
        "STARTTLS",
        "EHLO",
        "AUTH",
        "QUIT",
    ]
    assert body["tls"]["version"].startswith("TLSv1") and body["tls"]["cipher"]
    assert "localhost" in body["tls"]["certificate_subject"]
    assert not any(e.startswith("STARTTLS") for e in body["extensions"])  # the EHLO after STARTTLS


def test_an_unverifiable_certificate_stops_before_auth(tmp_path):
    with ScriptedSmtpServer(tls_context=make_self_signed_context(tmp_path), auth=lambda u, p: True) as server:
        account = SmtpAccount("localhost", server.port, "ada", PASSWORD, SmtpSecurity.STARTTLS)
        body = check_connection(account, allow_private=True, timeout=5)
    assert body["ok"] is False and body["auth"] == "not reached"
    assert body["steps"][-1]["step"] == "STARTTLS" and "certificate" in body["error"].lower()
    assert server.logins == []


def test_a_trickling_server_cannot_hold_the_check_past_its_deadline():
    with TricklingServer(delay=0.5) as server:
        account = SmtpAccount("127.0.0.1", server.port, "", "", SmtpSecurity.NONE)
        started = time.monotonic()
        body = check_connection(account, allow_private=True, timeout=5, seconds=1.5)
        took = time.monotonic() - started
    assert body["ok"] is False and "deadline" in body["error"]
    assert took < 5  # a bound that only catches a hang: the deadline is 1.5 s


def test_a_refused_host_is_refused_before_any_connection():
    account = SmtpAccount("127.0.0.1", 25, "ada", PASSWORD, SmtpSecurity.NONE)
    body = check_connection(account, allow_private=False, timeout=5)
    assert body["ok"] is False and body["steps"] == [] and body["auth"] == "not reached"
    assert body["error"] == f"127.0.0.1:25: {PRIVATE_HOST_REFUSED}"  # as at register: no address named


def test_another_users_id_is_not_found_and_a_token_is_required(api):
    with ScriptedSmtpServer(auth=lambda u, p: True) as server:
        ada, ada_headers = _user_at(api, server.port)
        bob, _ = _user_at(api, server.port, email="bob@example.com")
        assert _check(api, bob["id"], ada_headers).status_code == 404
        assert api.post(f"/api/v1/user/{ada['id']}/smtp-check").status_code == 401
    assert server.connections == 0


def test_checks_are_rate_limited_per_user(api, monkeypatch):
    monkeypatch.setenv("SMTP_CHECK_RATE_PER_USER", "2")
    http.reset_context()
    with ScriptedSmtpServer(auth=lambda u, p: True) as server:
        user, headers = _user_at(api, server.port)
        answers = [_check(api, user["id"], headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert int(answers[2].headers["Retry-After"]) >= 1
    assert answers[2].mimetype == "application/problem+json"
    assert server.connections == 2


@pytest.mark.parametrize("security", [SmtpSecurity.NONE])
def test_an_account_without_username_is_not_asked_to_log_in(security):
    with ScriptedSmtpServer() as server:
        account = SmtpAccount("127.0.0.1", server.port, "", "", security)
        body = check_connection(account, allow_private=True, timeout=5)
    assert body["ok"] is True and body["auth"] == "not asked (no SMTP username)"
    assert [s["step"] for s in body["steps"]] == ["connect", "greeting", "EHLO", "QUIT"]
