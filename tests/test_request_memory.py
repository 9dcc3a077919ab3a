"""Memory per request (issue 21 item 3): whatever a body's shape, the API worker holds at most a small
multiple of its size while it answers it.

Each request is built before measuring and handed to the function itself (functions/main.py), so the
peak is what the worker allocates for it: reading, the shape bound, parsing, the checks, the INSERT and
the answer. tracemalloc counts every Python allocation, the database driver's buffers included.
The multiple is functions/http.py's REQUEST_MEMORY_MULTIPLE; the pods' memory limits are computed from
it (deployment/gen_gateway.py, recomputed by tests/test_cluster_sizing.py).
"""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc

import flask
import pytest
from werkzeug.test import EnvironBuilder

from functions import http
from functions import main as functions
from tests.conftest import auth_header, login, register_user

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello"}
MiB = 1024 * 1024
# What a warm worker allocates for any request besides its body (connections, statements, the answer):
# measured at about 0.3 MiB for a 100-byte enqueue, bounded generously.
FIXED = 4 * MiB


@pytest.fixture(scope="module", autouse=True)
def _earlier_objects_frozen():
    """What the worker's earlier tests left (schemathesis's schemas, say) is not this module's garbage:
    the collections before each measurement look at new objects only. In a long pytest worker a full
    collection took 2 to 5 s, twice per test."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture()
def token(api):
    register_user(api)
    headers = auth_header(login(api))
    # Warm the worker: connections, prepared statements and lazy imports are not a request's cost.
    for function, path, body in (
        (functions.enqueue, "/api/v1/task/enqueue", MAIL),
        (functions.enqueue_batch, "/api/v1/task/enqueue/batch", {"tasks": [MAIL]}),
    ):
        assert call(function, path, json.dumps(body).encode(), headers)[0] == 202
    return headers


def call(function, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, int]:
    """(status, peak bytes allocated while the function answered ``raw``)."""
    request = flask.Request(
        EnvironBuilder(
            path=path, method="POST", data=raw, content_type="application/json", headers=headers
        ).get_environ()
    )
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        response = function(request)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return response.status_code, peak


def within(peak: int, raw: bytes) -> bool:
    return peak <= http.REQUEST_MEMORY_MULTIPLE * len(raw) + FIXED


def expansion(prefix: dict, size: int) -> bytes:
    """``prefix`` with an unknown member holding ``[{},{},…]``, ``size`` bytes in all (the issue's shape)."""
    head = json.dumps({**prefix, "x": []}).encode()[:-2]
    n = (size - len(head) - 2) // 3
    return head + b"{}," * (n - 1) + b"{}]}"


def single_limit() -> int:
    from shared.config import Settings
    from shared.tasks import content

    return content.request_limit(Settings.from_env({}))


def check(name: str, function, path: str, raw: bytes, headers: dict[str, str], statuses: tuple[int, ...]):
    """Answer ``raw`` and hold its peak to the multiple; the figure is printed (pytest -s shows it)."""
    status, peak = call(function, path, raw, headers)
    line = f"{name}: {len(raw) / MiB:.1f} MiB -> {status}, peak {peak / MiB:.1f} MiB ({peak / len(raw):.1f}x)"
    print(line)
    assert status in statuses and within(peak, raw), line


def test_an_expanding_single_enqueue_is_refused_before_it_is_built(token):
    raw = expansion(MAIL, single_limit() - 1024)
    check("expansion", functions.enqueue, "/api/v1/task/enqueue", raw, token, (413,))


def test_an_expanding_batch_is_refused_before_it_is_built(token):
    raw = expansion({"tasks": [MAIL]}, 8 * MiB)
    check("batch expansion", functions.enqueue_batch, "/api/v1/task/enqueue/batch", raw, token, (413,))


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(b"[" * 200_000 + b"]" * 200_000, id="deep-arrays"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="deep-objects"),
        pytest.param(b"1," * 500_000, id="many-numbers"),
        pytest.param(b'"",' * 400_000, id="many-strings"),
    ],
)
def test_other_hostile_shapes_in_an_unknown_member_stay_bounded(token, shape):
    raw = json.dumps(MAIL).encode()[:-1] + b', "x": [' + shape + b"0]}"
    check("shape", functions.enqueue, "/api/v1/task/enqueue", raw, token, (400, 413))


def test_wide_characters_in_a_long_string_stay_bounded(token):
    # One character beyond U+FFFF makes Python store the whole string at four bytes a character.
    filler = "a" * (single_limit() - 4096) + "\U0001f600"
    raw = json.dumps({**MAIL, "x": filler}, ensure_ascii=False).encode()
    check("wide", functions.enqueue, "/api/v1/task/enqueue", raw, token, (202, 413))


def test_the_largest_valid_single_enqueue_stays_bounded(token):
    body = "\u00e9" * (512 * 1024)  # 1 MiB of UTF-8, sent as \\u escapes
    attachment = base64.b64encode(b"\x00" * (10 * MiB - 4096)).decode()
    raw = json.dumps({**MAIL, "body": body, "attachments": [{"filename": "a.bin", "content": attachment}]})
    raw = raw.encode()
    check("largest single", functions.enqueue, "/api/v1/task/enqueue", raw, token, (202,))


def test_a_full_batch_stays_bounded(token):
    raw = json.dumps({"tasks": [{**MAIL, "body": "x" * 60_000}] * 500}).encode()
    check("full batch", functions.enqueue_batch, "/api/v1/task/enqueue/batch", raw, token, (202,))


def test_a_small_body_with_many_values_is_refused_before_it_is_built(token):
    raw = expansion({"email": "x@example.org", "password": "y"}, http.SMALL_BODY_LIMIT - 16)
    check("small", functions.login, "/api/v1/login", raw, {}, (413,))


def test_a_large_request_waits_for_one_of_the_process_slots_a_small_one_does_not(token, monkeypatch):
    monkeypatch.setattr(http, "LARGE_REQUEST_WAIT", 0.2)
    large = json.dumps({**MAIL, "x": "a" * http.LARGE_BODY}).encode()
    small = json.dumps(MAIL).encode()
    for _ in range(http.LARGE_REQUEST_SLOTS):
        assert http._large_requests.acquire(timeout=1)
    try:
        assert call(functions.enqueue, "/api/v1/task/enqueue", large, token)[0] == 503
        assert call(functions.enqueue, "/api/v1/task/enqueue", small, token)[0] == 202
    finally:
        for _ in range(http.LARGE_REQUEST_SLOTS):
            http._large_requests.release()
    # Every slot is given back after each answer, refused or not.
    for _ in range(3):
        assert call(functions.enqueue, "/api/v1/task/enqueue", large, token)[0] == 202
    assert all(http._large_requests.acquire(timeout=0) for _ in range(http.LARGE_REQUEST_SLOTS))
    for _ in range(http.LARGE_REQUEST_SLOTS):
        http._large_requests.release()
