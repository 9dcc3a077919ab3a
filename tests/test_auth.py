"""Login costs the same for every refusal, and tokens are HS256 with exp, iat and sub and a small
clock leeway. Login's bcrypt work is counted with a spy that still runs the real check: timing it
would only prove something on a quiet machine."""

from __future__ import annotations

import time

import bcrypt
import jwt
import pytest

from shared.accounts import auth, users
from shared.errors import Unauthorized

SECRET = "k" * 32
TTL = 60


@pytest.fixture()
def bcrypt_checks(monkeypatch):
    """The cost of every bcrypt check that did its work (the real check runs; one that bcrypt
    refused at once, e.g. for a password over 72 bytes, raised and cost nothing)."""
    costs: list[int] = []
    real = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        matched = real(password, hashed)
        costs.append(int(hashed[4:6]))  # "$2b$04$…": the cost factor is the work
        return matched

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    return costs


@pytest.fixture()
def ada(ctx):
    body = {
        "email": "ada@example.com",
        "password": "correct horse",
        "smtp_host": "127.0.0.1",
        "smtp_port": 1025,
        "smtp-username": "",
        "smtp-password": "",
        "smtp_security": "none",
    }
    return users.register(ctx, body, "test-client")


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("ada@example.com", "wrong horse"),
        ("nobody@example.com", "correct horse"),
        ("ada@example.com", "x" * 80),  # bcrypt refuses > 72 bytes at once unless we check anyway
        ("nobody@example.com", "x" * 80),
    ],
    ids=["wrong-password", "unknown-email", "long-password", "long-password-unknown-email"],
)
def test_every_refused_login_does_exactly_one_bcrypt_check_at_the_configured_cost(
    ctx, ada, bcrypt_checks, email, password
):
    with pytest.raises(Unauthorized):
        users.login(ctx, {"email": email, "password": password}, "test-client")
    assert bcrypt_checks == [ctx.settings.bcrypt_rounds]


def test_a_successful_login_does_one_bcrypt_check_too(ctx, ada, bcrypt_checks):
    users.login(ctx, {"email": "ada@example.com", "password": "correct horse"}, "test-client")
    assert bcrypt_checks == [ctx.settings.bcrypt_rounds]


# --- tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("issued_ago", [-20, TTL + 10], ids=["issued-20s-in-the-future", "expired-10s-ago"])
def test_a_token_off_by_less_than_the_leeway_is_accepted(issued_ago):
    token = auth.issue_token(7, SECRET, TTL, now=time.time() - issued_ago)
    assert auth.verify_token(token, SECRET) == 7


@pytest.mark.parametrize("issued_ago", [-60, TTL + 60], ids=["issued-60s-in-the-future", "expired-60s-ago"])
def test_a_token_off_by_60_seconds_is_refused(issued_ago):
    token = auth.issue_token(7, SECRET, TTL, now=time.time() - issued_ago)
    with pytest.raises(Unauthorized):
        auth.verify_token(token, SECRET)


@pytest.mark.parametrize("missing", ["exp", "iat", "sub"])
def test_a_token_without_exp_iat_or_sub_is_refused(missing):
    now = int(time.time())
    claims = {"sub": "7", "iat": now, "exp": now + TTL}
    del claims[missing]
    with pytest.raises(Unauthorized):
        auth.verify_token(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET)


def test_a_token_signed_with_another_algorithm_and_the_right_secret_is_refused():
    now = int(time.time())
    token = jwt.encode({"sub": "7", "iat": now, "exp": now + TTL}, SECRET * 2, algorithm="HS512")
    with pytest.raises(Unauthorized):
        auth.verify_token(token, SECRET * 2)
