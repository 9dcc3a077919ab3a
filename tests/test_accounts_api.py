"""Register, login and user over the real functions, PostgreSQL and Redis."""

from __future__ import annotations

import time
import warnings

import jwt
import pytest
import sqlalchemy as sa

from shared.db import engine_for
from tests.conftest import TEST_ENV, auth_header, login, register_user

GOOD = {
    "email": "grace@example.com",
    "password": "correct horse",
    "smtp_host": "smtp.example.com",
    "smtp_port": 587,
    "smtp-username": "grace",
    "smtp-password": "smtp-pass-123",
}


def user_count(pg_url) -> int:
    with engine_for(pg_url).connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one()


def assert_problem(response, status: int):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# --- register ---------------------------------------------------------------------------------


def test_register_returns_the_user_without_any_password(api, pg_url):
    response = api.post("/api/v1/register", json=GOOD)
    assert response.status_code == 201
    body = response.get_json()
    assert body["email"] == "grace@example.com"
    assert body["smtp_security"] == "starttls"  # defaulted from port 587
    assert response.headers["Location"] == f"/api/v1/user/{body['id']}"
    text = response.get_data(as_text=True)
    assert "correct horse" not in text and "smtp-pass-123" not in text and "password" not in text


def test_the_smtp_password_is_stored_encrypted_and_the_password_hashed(api, pg_url):
    api.post("/api/v1/register", json=GOOD)
    with engine_for(pg_url).connect() as conn:
        row = conn.execute(sa.text("SELECT password_hash, smtp_password_enc FROM users")).one()
    assert row.password_hash.startswith("$2b$") and "correct horse" not in row.password_hash
    assert "smtp-pass-123" not in row.smtp_password_enc


def test_port_465_defaults_to_implicit_tls_and_security_can_be_chosen(api):
    r1 = api.post("/api/v1/register", json={**GOOD, "smtp_port": 465})
    assert r1.get_json()["smtp_security"] == "tls"
    r2 = api.post("/api/v1/register", json={**GOOD, "email": "b@example.com", "smtp_security": "none"})
    assert r2.get_json()["smtp_security"] == "none"


def test_a_port_given_as_a_digit_string_is_accepted(api):
    response = api.post("/api/v1/register", json={**GOOD, "smtp_port": "2525"})
    assert response.status_code == 201 and response.get_json()["smtp_port"] == 2525


def test_an_email_registered_twice_in_any_case_is_a_conflict(api, pg_url):
    assert api.post("/api/v1/register", json=GOOD).status_code == 201
    assert_problem(api.post("/api/v1/register", json={**GOOD, "email": "GRACE@Example.com"}), 409)
    assert user_count(pg_url) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-email"),
        ("email", "a@b@example.com"),
        ("email", 42),
        ("password", "short"),  # 5 bytes
        ("password", "é" * 37),  # 74 bytes in UTF-8
        ("password", "x" * 73),
        ("smtp_port", 0),
        ("smtp_port", 65536),
        ("smtp_port", "abc"),
        ("smtp_port", True),
        ("smtp_port", 25.5),
        ("smtp_host", "bad host!"),
        ("smtp_host", "-leading.example.com"),
        ("smtp_host", "300.1.1.1"),
        ("smtp_host", ""),
        ("smtp_host", "a" * 64 + ".example.com"),
        ("smtp_security", "ssl"),
        ("smtp-username", 7),
    ],
)
def test_each_invalid_field_is_named_in_a_422_and_nothing_is_written(api, pg_url, field, value):
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, field: value}), 422)
    assert field in body["errors"], body
    assert user_count(pg_url) == 0


@pytest.mark.parametrize("field", ["email", "smtp_host", "smtp-username", "smtp-password"])
@pytest.mark.parametrize("bad", ["\r", "\n", "\x00"])
def test_cr_lf_or_nul_in_any_field_is_refused(api, pg_url, field, bad):
    value = GOOD[field][:5] + bad + GOOD[field][5:] if field != "email" else "gr" + bad + "ace@example.com"
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, field: value}), 422)
    assert field in body["errors"]
    assert user_count(pg_url) == 0


def test_a_nul_in_the_password_is_refused(api):
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, "password": "abc\x00defgh"}), 422)
    assert "password" in body["errors"]


def test_missing_fields_are_each_reported(api):
    body = assert_problem(api.post("/api/v1/register", json={}), 422)
    assert set(body["errors"]) >= {
        "email",
        "password",
        "smtp_host",
        "smtp_port",
        "smtp-username",
        "smtp-password",
    }


def test_a_password_of_exactly_72_bytes_is_accepted(api):
    assert api.post("/api/v1/register", json={**GOOD, "password": "x" * 72}).status_code == 201


# --- malformed requests -------------------------------------------------------------------------


def test_malformed_json_is_a_400(api, pg_url):
    response = api.post("/api/v1/register", data='{"email": ', content_type="application/json")
    assert_problem(response, 400)
    assert user_count(pg_url) == 0


def test_a_json_array_is_a_400(api):
    assert_problem(api.post("/api/v1/register", json=[GOOD]), 400)


def test_invalid_utf8_is_a_400(api):
    assert_problem(
        api.post("/api/v1/register", data=b'{"email": "\xff"}', content_type="application/json"), 400
    )


def test_deep_nesting_is_a_client_error_not_a_500(api):
    deep = "[" * 100_000 + "]" * 100_000
    assert_problem(api.post("/api/v1/register", data=deep, content_type="application/json"), 413)
    nested = '{"email": ' + "[" * 5000 + "]" * 5000 + "}"
    response = api.post("/api/v1/register", data=nested, content_type="application/json")
    # More JSON values than a small body may hold: refused before it is parsed (functions/http.py).
    assert_problem(response, 413)
    nested = '{"email": ' + "[" * 500 + "]" * 500 + "}"
    response = api.post("/api/v1/register", data=nested, content_type="application/json")
    assert response.status_code in (400, 422)


def test_nesting_past_the_parsers_depth_within_the_value_bound_is_a_400_not_a_500(api, user_token):
    """A batch may hold many JSON values (MAX_BATCH mails' worth), so 5,000 nested arrays pass the count
    made before parsing and reach the parser, which gives up on the depth: a 400, never a 500."""
    _, token = user_token
    nested = '{"tasks": ' + "[" * 5000 + "]" * 5000 + "}"
    response = api.post(
        "/api/v1/task/enqueue/batch", data=nested, content_type="application/json", headers=auth_header(token)
    )
    assert_problem(response, 400)


def test_nan_is_not_json(api):
    response = api.post("/api/v1/register", data='{"smtp_port": NaN}', content_type="application/json")
    assert_problem(response, 400)


def test_a_form_body_is_a_415(api):
    assert_problem(api.post("/api/v1/register", data={"email": "x"}), 415)


def test_a_huge_body_is_a_413(api):
    assert_problem(api.post("/api/v1/register", json={**GOOD, "padding": "x" * 100_000}), 413)


def test_an_unknown_path_and_a_wrong_method_get_problem_details(api):
    assert_problem(api.get("/api/v1/nothing"), 404)
    response = api.get("/api/v1/register")
    assert_problem(response, 405)
    assert response.headers["Allow"] == "POST"


def test_a_function_answers_only_its_own_route(app_for):
    client = app_for("login")
    assert client.get("/healthz/live").status_code == 200  # every container answers the probe
    assert client.post("/api/v1/register", json=GOOD).status_code == 404


# --- login ----------------------------------------------------------------------------------------


def test_login_returns_a_bearer_token(api):
    user = register_user(api)
    response = api.post("/api/v1/login", json={"email": "ADA@example.com", "password": "correct horse"})
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == user["id"] and body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600 and body["token"].count(".") == 2


def test_unknown_email_and_wrong_password_get_the_same_401(api):
    register_user(api)
    wrong = api.post("/api/v1/login", json={"email": "ada@example.com", "password": "wrong password"})
    unknown = api.post("/api/v1/login", json={"email": "nobody@example.com", "password": "correct horse"})
    assert_problem(wrong, 401)
    assert wrong.get_json() == unknown.get_json()
    assert wrong.status_code == unknown.status_code == 401


def test_login_without_fields_is_a_422(api):
    assert_problem(api.post("/api/v1/login", json={"email": "ada@example.com"}), 422)


# --- user -------------------------------------------------------------------------------------------


def test_a_user_can_read_their_own_record_without_secrets(api):
    user = register_user(api)
    token = login(api)
    response = api.get(f"/api/v1/user/{user['id']}", headers=auth_header(token))
    assert response.status_code == 200
    assert response.get_json() == user
    assert "smtp-secret-pw" not in response.get_data(as_text=True)


def test_another_users_id_is_not_found(api):
    register_user(api)
    other = register_user(api, email="bob@example.com")
    token = login(api)
    assert_problem(api.get(f"/api/v1/user/{other['id']}", headers=auth_header(token)), 404)
    assert_problem(api.get("/api/v1/user/999999", headers=auth_header(token)), 404)


def _token(claims, key=TEST_ENV["JWT_SECRET"], algorithm="HS256"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that our test key is short for HS512
        return jwt.encode(claims, key, algorithm=algorithm)


@pytest.mark.parametrize(
    "make_header",
    [
        lambda uid: None,
        lambda uid: "Basic abc",
        lambda uid: "Bearer",
        lambda uid: "Bearer not.a.token",
        lambda uid: "Bearer " + _token({"sub": str(uid), "iat": 1, "exp": int(time.time()) - 60}),  # > leeway
        lambda uid: (
            "Bearer " + _token({"sub": str(uid), "iat": 1, "exp": int(time.time()) + 60}, key="k" * 40)
        ),
        lambda uid: (
            "Bearer " + _token({"sub": str(uid), "iat": 1, "exp": int(time.time()) + 60}, algorithm="HS512")
        ),
        lambda uid: "Bearer " + _token({"sub": str(uid), "exp": int(time.time()) + 60}),  # no iat
        lambda uid: (
            "Bearer "
            + jwt.encode({"sub": str(uid), "iat": 1, "exp": int(time.time()) + 60}, None, algorithm="none")
        ),
        lambda uid: "Bearer " + _token({"sub": "abc", "iat": 1, "exp": int(time.time()) + 60}),
    ],
    ids=[
        "missing",
        "basic",
        "empty",
        "malformed",
        "expired",
        "forged",
        "hs512",
        "no-iat",
        "alg-none",
        "bad-sub",
    ],
)
def test_bad_tokens_are_401(api, make_header):
    user = register_user(api)
    header = make_header(user["id"])
    headers = {"Authorization": header} if header else {}
    response = api.get(f"/api/v1/user/{user['id']}", headers=headers)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_token_for_a_deleted_user_is_401(api, pg_url):
    user = register_user(api)
    token = login(api)
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM users"))
    assert_problem(api.get(f"/api/v1/user/{user['id']}", headers=auth_header(token)), 401)


# --- rate limits ------------------------------------------------------------------------------------


def test_login_is_rate_limited_per_email(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("RATE_LIMIT_PER_EMAIL", "3")
    http.reset_context()
    register_user(api)
    for _ in range(3):  # login and register count separately
        api.post("/api/v1/login", json={"email": "ada@example.com", "password": "wrong password"})
    response = api.post("/api/v1/login", json={"email": "ada@example.com", "password": "correct horse"})
    assert_problem(response, 429)
    assert 1 <= int(response.headers["Retry-After"]) <= 61
    # another email from the same client is not limited by ada's counter
    assert (
        api.post("/api/v1/login", json={"email": "bob@example.com", "password": "x" * 8}).status_code == 401
    )


def test_register_is_rate_limited_per_client(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("RATE_LIMIT_PER_CLIENT", "2")
    http.reset_context()
    assert api.post("/api/v1/register", json={**GOOD, "email": "a1@example.com"}).status_code == 201
    assert api.post("/api/v1/register", json={**GOOD, "email": "a2@example.com"}).status_code == 201
    assert_problem(api.post("/api/v1/register", json={**GOOD, "email": "a3@example.com"}), 429)


def test_the_rate_limit_is_shared_by_separate_apps(app_for, monkeypatch):
    """Two function instances (as two processes would) share the counter in Redis."""
    from functions import http

    monkeypatch.setenv("RATE_LIMIT_PER_EMAIL", "2")
    http.reset_context()
    first, second = app_for("login"), app_for("login")
    body = {"email": "x@example.com", "password": "wrong password"}
    assert first.post("/api/v1/login", json=body).status_code == 401
    assert second.post("/api/v1/login", json=body).status_code == 401
    assert second.post("/api/v1/login", json=body).status_code == 429


# --- SSRF and production rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "localhost", "::1", "192.168.0.10"]
)
def test_private_smtp_hosts_are_refused_when_not_allowed(api, monkeypatch, pg_url, host):
    from functions import http

    monkeypatch.setenv("SMTP_ALLOW_PRIVATE_HOSTS", "false")
    http.reset_context()
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, "smtp_host": host}), 422)
    assert "smtp_host" in body["errors"]
    assert user_count(pg_url) == 0


def test_plaintext_smtp_is_refused_where_not_allowed(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("SMTP_ALLOW_INSECURE", "false")
    http.reset_context()
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, "smtp_security": "none"}), 422)
    assert "smtp_security" in body["errors"]


# --- health -----------------------------------------------------------------------------------------


def test_live_and_ping_answer_when_everything_is_up(api):
    assert api.get("/healthz/live").get_json() == {"status": "ok"}
    ping = api.get("/healthz/ping")
    assert ping.status_code == 200 and ping.get_json()["checks"] == {"postgresql": "ok", "redis": "ok"}


def test_ping_names_redis_when_it_is_down(api, monkeypatch):
    from functions import http
    from shared.local.embedded import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    http.reset_context()
    body = assert_problem(api.get("/healthz/ping"), 503)
    assert body["checks"] == {"postgresql": "ok", "redis": "down"}
    assert "redis" in body["detail"]


def test_ping_names_postgresql_when_it_is_down(api, monkeypatch, tmp_path):
    from functions import http

    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql+pg8000://postgres@/postgres?unix_sock={tmp_path}/.s.PGSQL.5432"
    )
    http.reset_context()
    body = assert_problem(api.get("/healthz/ping"), 503)
    assert body["checks"] == {"postgresql": "down", "redis": "ok"}


def test_login_answers_503_not_500_when_postgresql_is_down(api, monkeypatch, tmp_path):
    from functions import http

    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql+pg8000://postgres@/postgres?unix_sock={tmp_path}/.s.PGSQL.5432"
    )
    http.reset_context()
    body = assert_problem(
        api.post("/api/v1/login", json={"email": "a@example.com", "password": "x" * 8}), 503
    )
    assert body["dependency"] == "postgresql"


@pytest.mark.parametrize("field", ["email", "password", "smtp-username", "smtp-password", "smtp_host"])
def test_a_lone_surrogate_is_a_400_and_the_next_request_still_works(api, pg_url, field):
    raw = '{"' + field + '": "\\ud800x"}'
    body = {k: v for k, v in GOOD.items() if k != field}
    import json

    data = json.dumps(body)[:-1] + ", " + raw[1:]
    assert_problem(api.post("/api/v1/register", data=data, content_type="application/json"), 400)
    assert api.post("/api/v1/register", json=GOOD).status_code == 201
    assert (
        api.post("/api/v1/login", json={"email": GOOD["email"], "password": GOOD["password"]}).status_code
        == 200
    )


@pytest.mark.parametrize("bad", ["\r", "\n"])
def test_cr_or_lf_in_the_password_is_refused(api, bad):
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, "password": "abcd" + bad + "efgh"}), 422)
    assert "password" in body["errors"]


def test_an_id_beyond_bigint_is_not_found(api):
    user = register_user(api)
    token = login(api)
    assert_problem(api.get("/api/v1/user/9999999999999999999", headers=auth_header(token)), 404)
    assert_problem(api.get("/api/v1/task/9999999999999999999", headers=auth_header(token)), 404)
    assert api.get(f"/api/v1/user/{user['id']}", headers=auth_header(token)).status_code == 200
