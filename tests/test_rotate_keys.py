"""`mailq rotate-keys` with rows no configured key decrypts: each is skipped and named (table, id), every
other secret is rotated all the same, and the command exits non-zero saying how many it skipped."""

from __future__ import annotations

import sqlalchemy as sa
from click.testing import CliRunner

from functions.cli import main
from shared.crypto import SecretBox, generate_key

INSERT_USER = sa.text(
    "INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username, smtp_password_enc,"
    " smtp_security) VALUES (:email, 'x', 'smtp.example.com', 587, 'u', :enc, 'starttls') RETURNING id"
)
INSERT_ENDPOINT = sa.text(
    "INSERT INTO webhook_endpoints (user_id, url, events, secret_enc)"
    " VALUES (:u, 'https://hooks.example.com/', ARRAY['task.sent'], :enc) RETURNING id"
)


def test_rows_no_key_decrypts_are_skipped_and_named_and_the_rest_rotated(ctx, monkeypatch):
    old_key, new_key, lost_key = ctx.settings.encryption_keys[0], generate_key(), generate_key()
    old, lost = SecretBox((old_key,)), SecretBox((lost_key,))
    with ctx.engine.begin() as conn:
        good = [
            conn.execute(INSERT_USER, {"email": f"u{i}@example.com", "enc": old.encrypt(f"pw{i}")}).scalar()
            for i in range(3)
        ]
        bad_user = conn.execute(INSERT_USER, {"email": "lost@example.com", "enc": lost.encrypt("?")}).scalar()
        good.append(
            conn.execute(INSERT_USER, {"email": "u9@example.com", "enc": old.encrypt("pw9")}).scalar()
        )
        hook = conn.execute(INSERT_ENDPOINT, {"u": good[0], "enc": old.encrypt("whsec_a")}).scalar()
        bad_hook = conn.execute(INSERT_ENDPOINT, {"u": good[1], "enc": lost.encrypt("whsec_b")}).scalar()
    monkeypatch.setenv("DATABASE_URL", ctx.settings.database_url)
    monkeypatch.setenv("MAILQ_ENCRYPTION_KEYS", f"{new_key},{old_key}")

    result = CliRunner().invoke(main, ["rotate-keys"])

    assert result.exit_code == 1, result.output
    assert f"skipped users id {bad_user}:" in result.output
    assert f"skipped webhook_endpoints id {bad_hook}:" in result.output
    assert "re-encrypted 5 secret(s)" in result.output
    assert "Error: 2 secret(s) could not be decrypted" in result.output
    new = SecretBox((new_key,))
    with ctx.engine.connect() as conn:
        passwords = dict(conn.execute(sa.text("SELECT id, smtp_password_enc FROM users")).all())
        secrets = dict(conn.execute(sa.text("SELECT id, secret_enc FROM webhook_endpoints")).all())
    assert [new.decrypt(passwords[i]) for i in good] == ["pw0", "pw1", "pw2", "pw9"]  # after the bad row too
    assert new.decrypt(secrets[hook]) == "whsec_a"
    assert (
        lost.decrypt(passwords[bad_user]) == "?" and lost.decrypt(secrets[bad_hook]) == "whsec_b"
    )  # as they were

    again = CliRunner().invoke(main, ["rotate-keys"])  # the rest is done; only the two remain
    assert again.exit_code == 1 and "re-encrypted 0 secret(s)" in again.output
    assert "Error: 2 secret(s)" in again.output


def test_a_clean_rotation_exits_0(ctx, monkeypatch):
    old_key, new_key = ctx.settings.encryption_keys[0], generate_key()
    with ctx.engine.begin() as conn:
        conn.execute(INSERT_USER, {"email": "a@example.com", "enc": SecretBox((old_key,)).encrypt("pw")})
    monkeypatch.setenv("DATABASE_URL", ctx.settings.database_url)
    monkeypatch.setenv("MAILQ_ENCRYPTION_KEYS", f"{new_key},{old_key}")
    result = CliRunner().invoke(main, ["rotate-keys"])
    assert result.exit_code == 0, result.output
    assert "re-encrypted 1 secret(s)" in result.output and "can be retired" in result.output
