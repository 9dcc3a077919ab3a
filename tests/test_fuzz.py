"""Bad input: schemathesis against shared/openapi.json with a real token, then explicit malformed requests.

Every answer must be one the document allows (status, content type, headers, body schema), never a 5xx,
and a refused request writes no row and pushes no envelope. `make fuzz` runs the schemathesis part longer
(MAILQ_FUZZ_EXAMPLES per operation and mode) and, with MAILQ_FUZZ_LIVE=1, over HTTP against `mailq serve`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import hypothesis
import hypothesis.configuration
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared import queue
from shared.db import engine_for
from shared.local.embedded import free_port
from tests.conftest import ROOT, auth_header, login, register_user
from tests.test_accounts_api import assert_problem

# Hypothesis keeps a cache directory; out of the work tree, not in a `.hypothesis/` beside the code.
hypothesis.configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "mailq-hypothesis"))

EXAMPLES = int(os.environ.get("MAILQ_FUZZ_EXAMPLES", "25"))
LIVE = os.environ.get("MAILQ_FUZZ_LIVE") == "1"

SCHEMA = schemathesis.openapi.from_path(ROOT / "shared" / "openapi.json")
# The token is ours (a real one); extra query parameters are ignored by design, like any HTTP API.
SCHEMA.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# positive_data_acceptance is left out on purpose: the document cannot say "8 to 72 bytes of UTF-8",
# "a hostname that exists" or "a cursor this API returned", so schema-valid data is refused with a 422.


def counts(pg_url: str, redis_client) -> tuple[int, int, int]:
    with engine_for(pg_url).connect() as conn:
        users = conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one()
        tasks = conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()
    return users, tasks, redis_client.llen(queue.TASK_LIST)


# --- schemathesis -------------------------------------------------------------------------------------


@pytest.fixture()
def target(env, clean, base_env):
    """Where requests go: the dev dispatcher in-process (WSGI), or `mailq serve` over HTTP when LIVE."""
    from functions.devserver import build_app

    if not LIVE:
        yield {"app": build_app()}
        return
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions.cli", "serve", "--port", str(port), "--workers", "2"],
        env={**os.environ, **base_env, "LOG_LEVEL": "WARNING"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/live", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield {"base_url": f"http://127.0.0.1:{port}"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def _lenient_query(case) -> bool:
    """Queries the API reads leniently on purpose, which a schema cannot express: an empty `status`,
    `limit` or `cursor` means "absent" (the document says so), and of a repeated parameter the first
    value counts (Flask's request.args.get); an object has no single value to send."""
    return any(v == "" or isinstance(v, list | dict) for v in (case.query or {}).values())


@pytest.mark.parametrize(
    ("operation", "mode"),
    [
        (op, mode)
        for op in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        # An operation without parameters or body has no negative input (GET /healthz/live).
        if mode == GenerationMode.POSITIVE
        or op.definition.raw.get("parameters")
        or op.definition.raw.get("requestBody")
    ],
    ids=lambda v: v.label if hasattr(v, "label") else v.value,
)
def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_document(target, api, operation, mode):
    register_user(api)
    token = login(api)
    headers = auth_header(token) if operation.definition.raw.get("security") else None
    if operation.path.startswith("/api/v1/task/{id}"):
        # Tasks 1 to 3 exist (ids restart for every test), so small generated ids reach the use cases.
        for at in (None, "2999-01-01T00:00:00Z", None):
            mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hi", "scheduled_at": at}
            assert api.post("/api/v1/task/enqueue", json=mail, headers=headers).status_code == 202
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    failures: dict[str, str] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=not LIVE,  # the same cases on every run of `make test`
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(headers=headers, **target)
        for check in checks:
            if check is negative_data_rejection and (_lenient_query(case) or response.status_code == 414):
                # A 414 is a rejection too (a query too long for the request line, documented as a
                # problem answer); schemathesis's list of rejecting statuses just does not name it.
                continue
            try:
                case.validate_response(response, checks=[check], headers=headers)
            except BaseException as exc:  # schemathesis raises a FailureGroup (an exception group)
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                failures.setdefault(check.__name__, f"{response.status_code}: {str(exc)[-1500:]}")

    try:
        fuzz()
    except hypothesis.errors.Unsatisfiable:
        pytest.skip("no input of this kind can be generated for this operation")
    assert not failures, "\n\n".join(f"{name}: {text}" for name, text in failures.items())


# --- malformed bodies, every endpoint that takes one -----------------------------------------------------

MALFORMED = {
    "truncated": b'{"email": ',
    "single quotes": b"{'email': 'a@example.com'}",
    "trailing garbage": b'{"email": "a@example.com"} x',
    "empty": b"",
    "null": b"null",
    "a string": b'"hello"',
    "a number": b"42",
    "an array": b'[{"email": "a@example.com"}]',
    "NaN": b'{"email": NaN}',
    "Infinity": b'{"smtp_port": Infinity}',
    "invalid UTF-8": b'{"email": "\xff\xfe"}',
    "overlong UTF-8": b'{"email": "\xc0\xaf"}',
    "UTF-16": '{"email": "a@example.com"}'.encode("utf-16"),
    "a lone surrogate": b'{"email": "\\ud800@example.com", "subject": "\\udfff"}',
    "deep arrays": b'{"email": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "deep objects": b'{"a": ' * 20_000 + b"1" + b"}" * 20_000,
}


@pytest.fixture()
def caller(api, redis_url):
    import redis

    register_user(api)
    headers = auth_header(login(api))
    client = redis.Redis.from_url(redis_url)
    yield headers, client
    client.close()


# The body is read before the task is looked up: these are refused whether task 1 exists or not.
BODY_PATHS = [
    "POST /api/v1/register",
    "POST /api/v1/login",
    "POST /api/v1/task/enqueue",
    "POST /api/v1/task/enqueue/batch",
    "PATCH /api/v1/task/1",
    "POST /api/v1/task/bulk",
    "POST /api/v1/webhooks",
    "PATCH /api/v1/webhooks/1",
]


@pytest.mark.parametrize("route", BODY_PATHS)
def test_a_malformed_body_is_a_4xx_problem_and_writes_nothing(api, caller, pg_url, route):
    headers, redis_client = caller
    method, path = route.split()
    before = counts(pg_url, redis_client)
    wrong = {}
    for name, data in MALFORMED.items():
        response = api.open(path, method=method, data=data, content_type="application/json", headers=headers)
        body = response.get_json(silent=True) or {}
        if not (
            400 <= response.status_code < 500
            and response.mimetype == "application/problem+json"
            and body.get("status") == response.status_code
        ):
            wrong[name] = (response.status_code, response.get_data(as_text=True)[:200])
    assert not wrong
    assert counts(pg_url, redis_client) == before


@pytest.mark.parametrize("route", BODY_PATHS)
def test_a_body_that_is_not_json_is_a_415(api, caller, pg_url, route):
    headers, redis_client = caller
    method, path = route.split()
    before = counts(pg_url, redis_client)
    for content_type in (
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/xml",
        "application/jsonx",
    ):
        data = b'{"email": "a@example.com"}'
        response = api.open(path, method=method, data=data, content_type=content_type, headers=headers)
        assert_problem(response, 415)
    assert counts(pg_url, redis_client) == before


@pytest.mark.parametrize("route", BODY_PATHS)
def test_a_body_over_the_request_limit_is_a_413(api, caller, pg_url, route):
    from functions.http import context
    from shared.tasks import batch, enqueue

    headers, redis_client = caller
    method, path = route.split()
    before = counts(pg_url, redis_client)
    limits = {
        "/api/v1/task/enqueue": enqueue.request_limit,
        "/api/v1/task/enqueue/batch": batch.request_limit,
    }
    size = limits[path](context()) if path in limits else 64 * 1024  # register and login: 64 KiB
    body = b'{"recipient_email": "bob@example.org", "subject": "x", "pad": "' + b"x" * size + b'"}'
    response = api.open(path, method=method, data=body, content_type="application/json", headers=headers)
    assert_problem(response, 413)
    assert counts(pg_url, redis_client) == before


WRONG_TYPES = [42, 4.2, True, [], {}, ["a@example.com"], {"email": "a@example.com"}]


def test_a_login_field_of_the_wrong_type_is_a_422(api, caller):
    for field in ("email", "password"):
        for value in (None, *WRONG_TYPES):
            body = {"email": "ada@example.com", "password": "correct horse", field: value}
            problem = assert_problem(api.post("/api/v1/login", json=body), 422)
            assert field in problem["errors"], (field, value)


@pytest.mark.parametrize("field", ["recipient_email", "subject", "body", "scheduled_at"])
def test_an_enqueue_field_of_the_wrong_type_is_a_422_and_writes_nothing(api, caller, pg_url, field):
    headers, redis_client = caller
    for value in WRONG_TYPES:
        mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello", field: value}
        problem = assert_problem(api.post("/api/v1/task/enqueue", json=mail, headers=headers), 422)
        assert field in problem["errors"], value
    assert counts(pg_url, redis_client)[1:] == (0, 0)


# --- CR, LF and NUL in everything that ends up in a header --------------------------------------------------


@pytest.mark.parametrize("field", ["recipient_email", "subject"])
def test_cr_lf_or_nul_in_a_header_bound_enqueue_field_is_a_422(api, caller, pg_url, field):
    headers, redis_client = caller
    for bad in ("\r", "\n", "\r\n", "\x00", "\r\nBcc: eve@example.org", "\n.\r\nMAIL FROM:<eve@example.org>"):
        value = {"recipient_email": f"bob{bad}@example.org", "subject": f"Hi{bad}there"}[field]
        mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello", field: value}
        problem = assert_problem(api.post("/api/v1/task/enqueue", json=mail, headers=headers), 422)
        assert field in problem["errors"], repr(bad)
    assert counts(pg_url, redis_client)[1:] == (0, 0)


# str.splitlines() — and with it the email package's header check — also breaks lines at these.
UNICODE_LINE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_unicode_line_breaks_in_the_subject_are_a_422(api, caller, pg_url):
    headers, redis_client = caller
    accepted = []
    for sep in UNICODE_LINE_BREAKS:
        mail = {"recipient_email": "bob@example.org", "subject": f"Hi{sep}Bcc: eve@example.org", "body": "x"}
        response = api.post("/api/v1/task/enqueue", json=mail, headers=headers)
        if response.status_code != 422:
            accepted.append((repr(sep), response.status_code))
    assert not accepted, f"accepted: {accepted}"


def test_a_nul_in_the_login_email_is_a_4xx_not_a_500(api, caller):
    response = api.post("/api/v1/login", json={"email": "ada\x00@example.com", "password": "correct horse"})
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)


def test_an_invalid_idempotency_key_is_a_422_and_writes_nothing(api, caller, pg_url):
    headers, redis_client = caller
    mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello"}
    for key in ("", " ", "k\x00", "k\x7f", "ключ", "x" * 256, "\t"):
        response = api.post("/api/v1/task/enqueue", json=mail, headers={**headers, "Idempotency-Key": key})
        problem = assert_problem(response, 422)
        assert "Idempotency-Key" in problem["errors"], repr(key)
    assert counts(pg_url, redis_client)[1:] == (0, 0)


# --- query strings and path segments --------------------------------------------------------------------


BAD_LIST_QUERIES = [
    "limit=0",
    "limit=501",
    "limit=-1",
    "limit=1e3",
    "limit=%D9%A3",
    "limit=1.0",
    "limit=0x10",
    "limit=%205",
    "limit=99999999999999999999999",
    "status=SENT",
    "status=sent,queued",
    "cursor=%00",
    "cursor=djE6LTE",
    "cursor=djE6YWJj",
    "cursor=" + "A" * 5000,
]
IMPOSSIBLE_PATHS = [
    "/api/v1/task/0",
    "/api/v1/task/-1",
    "/api/v1/task/01",
    "/api/v1/task/1.5",
    "/api/v1/task/9223372036854775808",
    "/api/v1/task/%00",
    "/api/v1/user/0",
    "/api/v1/user/99999999999999999999",
    "/api/v1/webhooks/0/deliveries",
    "/api/v1/webhooks/01/deliveries",
    "/api/v1/webhooks/9223372036854775808/deliveries",
    "/api/v1/webhooks/1/deliveries/",
]


def test_bad_list_parameters_are_422_and_impossible_ids_are_404(api, caller):
    headers, _ = caller
    for path in ("/api/v1/task/queue", "/api/v1/task/queue/fail"):
        for query in BAD_LIST_QUERIES:
            if path.endswith("fail") and query.startswith("status="):
                continue  # the fail list takes no status
            assert_problem(api.get(f"{path}?{query}", headers=headers), 422)
    for path in IMPOSSIBLE_PATHS:
        assert_problem(api.get(path, headers=headers), 404)


def test_cancel_reschedule_and_retry_of_an_impossible_id_are_404(api, caller):
    headers, _ = caller
    for path in (p for p in IMPOSSIBLE_PATHS if p.startswith("/api/v1/task/")):
        for method, suffix in (("POST", "/cancel"), ("POST", "/retry"), ("PATCH", "")):
            response = api.open(path + suffix, method=method, json={"scheduled_at": None}, headers=headers)
            assert_problem(response, 404)
