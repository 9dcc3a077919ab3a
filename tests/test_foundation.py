"""Settings, secrets at rest, tokens, the route table, the envelope and the migrations."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared import queue, routes
from shared.accounts import auth
from shared.config import Settings
from shared.crypto import SecretBox, generate_key
from shared.errors import ConfigError, EnvelopeDecodeError, Unauthorized

ROOT = Path(__file__).resolve().parent.parent
PROD = {
    "MAILQ_ENV": "production",
    "JWT_SECRET": "s" * 32,
    "MAILQ_ENCRYPTION_KEYS": generate_key(),
    "DATABASE_URL": "postgresql+pg8000://u:p@db:5432/mailq",
    "REDIS_URL": "redis://redis:6379/0",
}


# --- settings -----------------------------------------------------------------------------------


def test_defaults_match_the_design():
    s = Settings.from_env({})
    assert (s.env, s.max_try_count, s.retry_backoff_base, s.retry_backoff_max) == (
        "development",
        3,
        30.0,
        3600.0,
    )
    assert (s.sweep_leak_window, s.rate_limit_per_email, s.rate_limit_per_client) == (300, 10, 100)
    assert s.smtp_allow_private_hosts is True and s.bcrypt_rounds == 12 and s.max_body_bytes == 1024 * 1024


def test_production_starts_with_everything_it_needs_and_refuses_private_hosts_by_default():
    s = Settings.from_env(PROD)
    assert s.is_production and s.smtp_allow_private_hosts is False and s.smtp_allow_insecure is False


@pytest.mark.parametrize(
    ("missing", "named"),
    [("JWT_SECRET", "JWT_SECRET is missing"), ("MAILQ_ENCRYPTION_KEYS", "MAILQ_ENCRYPTION_KEYS is missing")],
)
def test_production_refuses_to_start_without_a_secret_and_says_which(missing, named):
    env = {k: v for k, v in PROD.items() if k != missing}
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_production_refuses_a_short_jwt_secret():
    with pytest.raises(ConfigError, match="JWT_SECRET is too short"):
        Settings.from_env({**PROD, "JWT_SECRET": "s" * 31})


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MAILQ_ENV": "production"})
    for name in ("JWT_SECRET", "MAILQ_ENCRYPTION_KEYS", "DATABASE_URL", "REDIS_URL"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"MAX_TRY_COUNT": "zero"},
        {"MAX_TRY_COUNT": "0"},
        {"SMTP_ALLOW_PRIVATE_HOSTS": "maybe"},
        {"MAILQ_ENV": "staging"},
        {"RETRY_BACKOFF_BASE": "-1"},
        {"RETRY_BACKOFF_BASE": "10", "RETRY_BACKOFF_MAX": "5"},
    ],
)
def test_invalid_values_are_refused_with_their_name(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_the_production_functions_refuse_to_serve_without_secrets(tmp_path):
    """`mailq serve` in production without a JWT secret exits with the message, before listening."""
    import subprocess
    import sys

    env = {k: v for k, v in PROD.items() if k != "JWT_SECRET"}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        [sys.executable, "-m", "functions.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "JWT_SECRET is missing" in result.stderr


def test_the_configuration_page_documents_every_setting_and_no_other():
    page = (ROOT / "docs" / "configuration.md").read_text()
    names = set(re.findall(r"#\s+([A-Z][A-Z0-9_]+),", (ROOT / "shared" / "config.py").read_text()))
    assert len(names) >= 25
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", page, re.M)  # the first cell of each table row
    assert not names - set(rows), f"settings missing from docs/configuration.md: {sorted(names - set(rows))}"
    assert not set(rows) - names, f"docs/configuration.md documents unknown settings: {set(rows) - names}"


# --- secrets at rest --------------------------------------------------------------------------------


def test_secrets_round_trip_and_keys_rotate():
    old, new = generate_key(), generate_key()
    token = SecretBox((old,)).encrypt("smtp-pass")
    assert "smtp-pass" not in token
    rotated_box = SecretBox((new, old))
    assert rotated_box.decrypt(token) == "smtp-pass"  # the old key still decrypts
    rotated = rotated_box.rotate(token)
    assert SecretBox((new,)).decrypt(rotated) == "smtp-pass"  # the old key can now be retired
    with pytest.raises(ConfigError):
        SecretBox((new,)).decrypt(token)


def test_a_bad_key_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid Fernet key"):
        SecretBox(("not-a-key",))


# --- tokens -----------------------------------------------------------------------------------------


def test_tokens_carry_sub_iat_and_exp_and_expire():
    token = auth.issue_token(7, "k" * 32, 60, now=time.time())
    assert auth.verify_token(token, "k" * 32) == 7
    old = auth.issue_token(7, "k" * 32, 60, now=time.time() - 120)
    with pytest.raises(Unauthorized, match="expired"):
        auth.verify_token(old, "k" * 32)


def test_passwords_are_bcrypt_and_unknown_users_still_cost_a_check():
    hashed = auth.hash_password("correct horse", 4)
    assert auth.check_password("correct horse", hashed, 4)
    assert not auth.check_password("wrong horse", hashed, 4)
    assert not auth.check_password("correct horse", None, 4)


# --- route table and envelope -----------------------------------------------------------------------


def test_the_route_table_holds_the_seed_paths():
    pairs = {(r.method, r.path) for r in routes.ROUTES}
    assert {
        ("GET", "/healthz/live"),
        ("GET", "/healthz/ping"),
        ("POST", "/api/v1/register"),
        ("POST", "/api/v1/login"),
        ("GET", "/api/v1/user/{id}"),
        ("POST", "/api/v1/task/enqueue"),
        ("GET", "/api/v1/task/queue"),
        ("GET", "/api/v1/task/queue/fail"),
    } <= pairs


def test_routes_match_ids_and_not_lookalikes():
    assert routes.match("GET", "/api/v1/user/12").params == {"id": 12}
    assert routes.match("GET", "/api/v1/task/queue").route.target == "task_queue"
    assert routes.match("GET", "/api/v1/task/7").route.target == "get_task"
    assert routes.match("GET", "/api/v1/user/0") is None
    assert routes.match("GET", "/api/v1/user/1/") is None
    assert routes.match("DELETE", "/api/v1/register").allowed == ("POST",)


def test_every_route_target_is_a_function_in_main():
    import ast

    tree = ast.parse((ROOT / "functions" / "main.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(routes.TARGETS) <= defined


def test_the_envelope_round_trips_and_anything_else_is_a_decode_error():
    assert queue.decode(queue.encode(42)) == 42
    for raw in (
        b"",
        b"[]",
        b'{"v":1}',
        b'{"v":2,"task_id":1}',
        b'{"v":1,"task_id":"1"}',
        b'{"v":1,"task_id":true}',
    ):
        with pytest.raises(EnvelopeDecodeError):
            queue.decode(raw)


# --- migrations -------------------------------------------------------------------------------------


@pytest.fixture()
def scratch_db(servers):
    """A database of its own, so migrations can be run from nothing."""
    admin = sa.create_engine(servers["database_url"], poolclass=sa.pool.NullPool)
    name = f"migrations_{int(time.time() * 1000)}"
    with admin.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = servers["database_url"].replace("@/postgres?", f"@/{name}?")
    yield url
    sa.create_engine(url).dispose()
    with admin.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_migrate_is_idempotent_and_safe_to_run_twice_at_once(scratch_db):
    """Two `mailq migrate` processes on an empty database take turns; a third finds nothing to do."""
    import subprocess
    import sys

    env = {"DATABASE_URL": scratch_db, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "functions.cli", "migrate"]
    both = [subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in both:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout
    from alembic.script import ScriptDirectory

    from shared.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config(scratch_db)).get_current_head()
    engine = sa.create_engine(scratch_db)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == head
    engine.dispose()


def test_the_migrations_produce_exactly_the_models(scratch_db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from shared.db import migrate
    from shared.models import Base

    migrate(scratch_db)
    engine = sa.create_engine(scratch_db)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_migration_0014_gives_the_existing_attempt_lines_their_tasks_users(scratch_db):
    """The attempt log learns user_id: the lines written before it get their task's owner."""
    from alembic import command

    from shared.db import alembic_config

    config = alembic_config(scratch_db)
    command.upgrade(config, "0013")
    engine = sa.create_engine(scratch_db, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        users = (
            conn.execute(
                sa.text(
                    "INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username,"
                    " smtp_password_enc, smtp_security) SELECT 'm' || g || '@example.com', 'x', 'h', 587,"
                    " 'u', 'x', 'starttls' FROM generate_series(1, 2) AS g RETURNING id"
                )
            )
            .scalars()
            .all()
        )
        tasks = (
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count,"
                    " scheduled_at, next_attempt_at, message_id) SELECT u, 'r@example.org', 's', 'b', 'sent',"
                    " 1, now(), now(), 'm' || u FROM unnest(CAST(:users AS bigint[])) AS u RETURNING id"
                ),
                {"users": users},
            )
            .scalars()
            .all()
        )
        conn.execute(
            sa.text(
                "INSERT INTO task_attempts (task_id, try_count, spent, started_at, finished_at, outcome)"
                " SELECT t, 1, true, now(), now(), 'sent' FROM unnest(CAST(:tasks AS bigint[])) AS t"
            ),
            {"tasks": tasks},
        )
    command.upgrade(config, "head")
    with engine.connect() as conn:
        lines = conn.execute(sa.text("SELECT task_id, user_id FROM task_attempts ORDER BY task_id")).all()
    assert [tuple(line) for line in lines] == list(zip(tasks, users, strict=True))
    command.downgrade(config, "0013")  # and back: the column and the index go, the old index returns
    with engine.connect() as conn:
        indexes = set(conn.execute(sa.text("SELECT indexname FROM pg_indexes")).scalars())
        columns = conn.execute(
            sa.text("SELECT column_name FROM information_schema.columns WHERE table_name = 'task_attempts'")
        ).scalars()
        assert "user_id" not in set(columns)
    assert "tasks_user_outcome_at" in indexes and "task_attempts_user_finished" not in indexes
    engine.dispose()


def test_the_models_and_migrations_agree_on_indexes(scratch_db):
    """create_all from the models (only here) yields the same indexes as the migrations."""
    from shared.db import migrate
    from shared.models import Base

    migrate(scratch_db)
    engine = sa.create_engine(scratch_db)
    query = sa.text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
    )
    with engine.connect() as conn:
        migrated = conn.execute(query).all()
        conn.execute(sa.text("CREATE SCHEMA models"))
        conn.commit()
    models_engine = sa.create_engine(scratch_db)
    with models_engine.begin() as conn:
        Base.metadata.create_all(conn.execution_options(schema_translate_map={None: "models"}))
    with models_engine.connect() as conn:
        created = conn.execute(
            sa.text(
                "SELECT indexname, replace(indexdef, 'models.', 'public.') FROM pg_indexes "
                "WHERE schemaname = 'models' ORDER BY indexname"
            )
        ).all()
    models_engine.dispose()
    engine.dispose()
    assert [tuple(r) for r in created] == [tuple(r) for r in migrated if r[0] != "alembic_version_pkc"]
