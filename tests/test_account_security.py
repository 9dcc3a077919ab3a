"""What a token alone may not do (issue 21, item 5): move the stored SMTP password to another server, or
outlive a password change. Moving host, port or security takes the SMTP password in the same request;
a password change (with the current password, under the login's rate limits) and `POST
/api/v1/user/{id}/logout-all` revoke every token issued before them, on every authenticated route."""

from __future__ import annotations

import pytest

from shared import routes
from shared.workers import Outcome
from tests.conftest import auth_header, login, register_user
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import assert_problem

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}
SMTP_PASSWORD = "real-smtp-password"


@pytest.fixture()
def smtp_pair():
    """The account's own SMTP server and one somebody else runs; each records the passwords it is sent."""
    sent: dict[str, list[str]] = {"own": [], "other": []}
    with (
        ScriptedSmtpServer(auth=lambda u, p: sent["own"].append(p) or p == SMTP_PASSWORD) as own,
        ScriptedSmtpServer(auth=lambda u, p: sent["other"].append(p) or True) as other,
    ):
        yield own, other, sent


def account_on(api, server) -> tuple[dict, dict]:
    user = register_user(
        api,
        smtp_host=server.host,
        smtp_port=server.port,
        **{"smtp-username": "ada", "smtp-password": SMTP_PASSWORD},
    )
    return user, auth_header(login(api))


@pytest.mark.parametrize(
    "move",
    [
        lambda other: {"smtp_port": other.port},
        lambda other: {"smtp_port": str(other.port)},
        lambda other: {"smtp_host": "localhost", "smtp_port": other.port},
        lambda other: {"smtp_security": "tls"},
    ],
    ids=["port", "port-as-string", "host-and-port", "security"],
)
def test_a_token_alone_cannot_move_the_smtp_password_to_another_server(api, pipe, smtp_pair, move):
    own, other, sent = smtp_pair
    user, headers = account_on(api, own)
    answer = api.patch(f"/api/v1/user/{user['id']}", json=move(other), headers=headers)
    api.post("/api/v1/task/enqueue", json=MAIL, headers=headers)
    pipe.pump()
    assert sent["other"] == []  # before the fix: AUTH PLAIN ada/real-smtp-password reached it
    assert "smtp-password" in assert_problem(answer, 422)["errors"]
    shown = api.get(f"/api/v1/user/{user['id']}", headers=headers).get_json()
    assert (shown["smtp_host"], shown["smtp_port"], shown["smtp_security"]) == (own.host, own.port, "none")
    assert sent["own"] == [SMTP_PASSWORD] and len(own.received) == 1


def test_moving_with_the_password_in_the_same_request_is_allowed(api, pipe, smtp_pair):
    own, other, sent = smtp_pair
    user, headers = account_on(api, own)
    body = {"smtp_port": other.port, "smtp-password": "the-other-password"}
    assert api.patch(f"/api/v1/user/{user['id']}", json=body, headers=headers).status_code == 200
    api.post("/api/v1/task/enqueue", json=MAIL, headers=headers)
    assert pipe.pump()[-1] == Outcome.SENT
    assert sent["other"] == ["the-other-password"] and sent["own"] == []


def test_restating_the_current_host_port_or_security_is_no_move(api, smtp_pair):
    own, _, _ = smtp_pair
    user, headers = account_on(api, own)
    same = {"smtp_host": own.host, "smtp_port": own.port, "smtp_security": "none", "smtp-username": "ada2"}
    answer = api.patch(f"/api/v1/user/{user['id']}", json=same, headers=headers)
    assert answer.status_code == 200 and answer.get_json()["smtp_username"] == "ada2"


# --- password change and logout-all: every older token is refused everywhere -------------------------------


def every_authenticated_request(user_id: int) -> list[tuple[str, str, dict | None]]:
    """(method, path, JSON body) for every authenticated route of the route table, with bodies that get
    past validation where a route checks the token only at its insert (enqueue, batch)."""
    bodies = {"enqueue": MAIL, "enqueue_batch": {"tasks": [MAIL]}}
    requests = []
    for route in routes.ROUTES:
        if not route.path.startswith("/api/v1/") or route.target in ("register", "login"):
            continue
        path = route.path.replace("{id}", str(user_id)).replace("{delivery_id}", "1")
        body = bodies.get(route.target, {} if route.method in ("POST", "PATCH") else None)
        requests.append((route.method, path, body))
    return requests


def assert_refused_everywhere(api, headers, user_id: int) -> None:
    for method, path, body in every_authenticated_request(user_id):
        response = api.open(path, method=method, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.get_data(as_text=True))


def change_password(api, user, headers, new="a new password", current="correct horse", **extra):
    body = {"password": new, "current_password": current, **extra}
    return api.patch(f"/api/v1/user/{user['id']}", json=body, headers=headers)


def test_a_password_change_revokes_every_token_issued_before_it_on_every_route(api, pg_url):
    user = register_user(api)
    first, second = auth_header(login(api)), auth_header(login(api))
    assert api.get(f"/api/v1/user/{user['id']}", headers=second).status_code == 200
    assert change_password(api, user, first).status_code == 200
    for old in (first, second):
        assert_refused_everywhere(api, old, user["id"])
    assert (
        api.post("/api/v1/login", json={"email": user["email"], "password": "correct horse"}).status_code
        == 401
    )
    fresh = auth_header(login(api, password="a new password"))
    assert api.get(f"/api/v1/user/{user['id']}", headers=fresh).status_code == 200
    assert api.post("/api/v1/task/enqueue", json=MAIL, headers=fresh).status_code == 202


def test_logout_all_revokes_every_token_and_a_new_login_works(api):
    user = register_user(api)
    first, second = auth_header(login(api)), auth_header(login(api))
    response = api.post(f"/api/v1/user/{user['id']}/logout-all", headers=second)
    assert response.status_code == 204 and response.get_data() == b""
    for old in (first, second):
        assert_refused_everywhere(api, old, user["id"])
    fresh = auth_header(login(api))
    assert api.post("/api/v1/task/enqueue", json=MAIL, headers=fresh).status_code == 202


def test_logout_all_is_only_for_ones_own_id(api):
    register_user(api)
    eve = register_user(api, email="eve@example.com")
    headers = auth_header(login(api))
    assert_problem(api.post(f"/api/v1/user/{eve['id']}/logout-all", headers=headers), 404)
    eve_headers = auth_header(login(api, "eve@example.com"))
    assert api.get(f"/api/v1/user/{eve['id']}", headers=eve_headers).status_code == 200


def test_a_wrong_current_password_changes_nothing(api):
    user = register_user(api)
    headers = auth_header(login(api))
    problem = assert_problem(change_password(api, user, headers, current="not it at all"), 422)
    assert "current_password" in problem["errors"]
    assert api.get(f"/api/v1/user/{user['id']}", headers=headers).status_code == 200  # still valid
    login(api)  # the old password still works


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": "a new password"}, "current_password"),
        ({"password": "short", "current_password": "correct horse"}, "password"),
        ({"password": "a new password", "current_password": "correct horse", "smtp_port": 26}, "smtp_port"),
        ({"current_password": "correct horse"}, "password"),
    ],
)
def test_a_password_change_needs_both_passwords_and_nothing_else(api, body, field):
    user = register_user(api)
    headers = auth_header(login(api))
    problem = assert_problem(api.patch(f"/api/v1/user/{user['id']}", json=body, headers=headers), 422)
    assert field in problem["errors"]
    assert api.get(f"/api/v1/user/{user['id']}", headers=headers).status_code == 200


def test_guessing_the_current_password_spends_the_logins_rate_limit(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("RATE_LIMIT_PER_EMAIL", "3")
    http.reset_context()
    user = register_user(api)
    headers = auth_header(login(api))  # one attempt of the three
    for guess in ("guess one", "guess two"):
        assert change_password(api, user, headers, current=guess).status_code == 422
    assert_problem(change_password(api, user, headers, current="correct horse"), 429)  # even the right one
    body = {"email": user["email"], "password": "correct horse"}
    assert_problem(api.post("/api/v1/login", json=body), 429)  # the same counter as the login's
