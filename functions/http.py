"""HTTP translation for the functions: request parsing, the one error format, the one status map.

Every 4xx/5xx leaves as RFC 9457 problem details (``application/problem+json``). This is the only
place that knows which HTTP status each of our error classes becomes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import flask
import redis

from shared import routes
from shared.config import Settings, configure_logging
from shared.context import Context, make_redis
from shared.crypto import SecretBox
from shared.db import engine_for, is_unavailable
from shared.errors import (
    BadRequest,
    Conflict,
    DependencyUnavailable,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)

log = logging.getLogger("mailq.http")

STATUS_OF: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ValidationFailed: 422,
    RateLimited: 429,
    DependencyUnavailable: 503,
}
PROBLEM_JSON = "application/problem+json"
SMALL_BODY_LIMIT = 64 * 1024  # register/login bodies are tiny; anything bigger is refused early
# Whatever its shape, a request holds at most this many times its body's bytes while it is answered (the
# text it decodes to, up to 4 bytes a character, and the values parsed from it, as wide again), plus a
# fixed few MiB: tests/test_request_memory.py measures it for the hostile shapes and the largest valid
# requests (the widest, a long string with one character past U+FFFF, measured 8.0x), and the pods' memory
# limits are computed from it (deployment/gen_gateway.py).
REQUEST_MEMORY_MULTIPLE = 9
# A body over LARGE_BODY bytes (or of unknown length) is answered only while it holds one of the process's
# LARGE_REQUEST_SLOTS: the others wait for one, up to LARGE_REQUEST_WAIT seconds, then get a 503 with
# Retry-After. So a pod holds at most that many large requests at once whatever its concurrency.
LARGE_BODY = 1024 * 1024
LARGE_REQUEST_SLOTS = 2
LARGE_REQUEST_WAIT = 20.0
_large_requests = threading.BoundedSemaphore(LARGE_REQUEST_SLOTS)
READ_CHUNK = 64 * 1024
# JSON values (objects, arrays, strings, numbers, literals) a small body may hold: its few fields, many
# times over. A request's memory is bounded by its size times a small multiple only when the count of
# values is bounded too: `[{},{},…]` costs Python about 30 times its bytes (issue 21).
SMALL_BODY_VALUES = 1000
# A string, or one of the characters that begin a value after the first in a container (","), or a
# container ("[", "{"): values <= commas + containers + 1, counted without building anything.
_VALUE_TOKEN = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")|[,\[{]')
# A lone surrogate can only be spelt as an escape (\ud800): UTF-8 cannot carry one.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F][0-9a-fA-F]{2}")

Result = tuple[int, Any] | tuple[int, Any, dict[str, str]]

# --- the per-process context: built on first use, never at import time -----------------------

_context: Context | None = None
_context_lock = threading.Lock()


def context() -> Context:
    """The process's Context, built from the environment on the first request."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                settings = Settings.from_env(os.environ)
                settings.require_runtime()
                configure_logging(settings)
                _context = Context(
                    settings=settings,
                    engine=engine_for(
                        settings.database_url,
                        socket_timeout=settings.database_socket_timeout,
                        **pool_sizing(),
                    ),
                    redis=make_redis(settings.redis_url),
                    box=SecretBox(settings.encryption_keys),
                )
    return _context


def _server_threads() -> int:
    """functions-framework's THREADS (gunicorn threads per worker)."""
    raw = os.environ.get("THREADS", "8")
    return max(1, int(raw)) if raw.isdigit() else 8


def pool_sizing() -> dict[str, int]:
    """One pooled connection per server thread and no overflow: a request holds at most one
    connection at a time, so more could only sit idle (and count against max_connections)."""
    return {"pool_size": _server_threads(), "max_overflow": 0}


def reset_context() -> None:
    """Forget the context (tests change the environment between apps)."""
    global _context
    with _context_lock:
        _context = None


# --- rendering ---------------------------------------------------------------------------------


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra) -> flask.Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    body.update(extra)
    response = flask.Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def problem_for(exc: ServiceError) -> flask.Response:
    status = next((code for cls, code in STATUS_OF.items() if isinstance(exc, cls)), 400)
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationFailed):
        extra["errors"] = exc.errors
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
        extra.update(exc.extra)  # a tenant bound names itself: "limit": "enqueue_rate", …
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="mailq"'
    if isinstance(exc, DependencyUnavailable):
        headers["Retry-After"] = "5"
        extra["dependency"] = exc.dependency
    return problem(status, exc.detail, headers, **extra)


def render(result: Result) -> flask.Response:
    status, payload, *rest = result
    headers = rest[0] if rest else {}
    if status == 204:  # No Content: no body, no media type
        response = flask.Response(status=204)
        response.headers.pop("Content-Type", None)
    else:
        response = flask.Response(json.dumps(payload), status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name] = value
    return response


# --- parsing -----------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def json_body(
    request: flask.Request, limit: int = SMALL_BODY_LIMIT, max_values: int = SMALL_BODY_VALUES
) -> dict[str, Any]:
    """The request's JSON object: 415 if not JSON, 413 over ``limit`` bytes or ``max_values`` JSON
    values (counted before anything is built), 400 if malformed."""
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType("The body must be JSON (Content-Type: application/json).")
    raw = read_body(request, limit)
    if not within_values(raw, max_values):
        raise PayloadTooLarge(
            f"The body holds more than {max_values} JSON values (objects, arrays, strings, numbers); "
            "nothing was read."
        )
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The body is not valid UTF-8.") from None
    del raw  # only the text is parsed: the bytes are not held at the peak
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None
    del text
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    if surrogates and _lone_surrogate(data):
        # JSON may spell lone surrogates (\ud800); they are not text and no driver can store them.
        raise BadRequest("The body contains invalid Unicode (a lone surrogate).")
    return data


def read_body(request: flask.Request, limit: int) -> bytes:
    """The request's bytes, 413 over ``limit``. Memory follows the body's size, not the limit: a stream
    read of ``limit`` bytes would allocate the whole limit for every request, however small."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    if length is not None:
        return request.stream.read(length)  # the server's stream ends at Content-Length
    buffer = bytearray()  # chunked: read until the end or past the limit, whichever comes first
    while len(buffer) <= limit:
        chunk = request.stream.read(READ_CHUNK)
        if not chunk:
            break
        buffer += chunk
    if len(buffer) > limit:
        raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    return bytes(buffer)


def within_values(raw: bytes, most: int) -> bool:
    """True when the JSON text ``raw`` holds at most ``most`` values, decided without parsing it: every
    value but the first of a container follows a comma, so values <= commas + containers + 1. The bytes'
    own count (commas in strings included) settles most bodies at C speed; otherwise strings are skipped
    token by token, stopping as soon as the count passes ``most``."""
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") < most:
        return True
    count = 1
    for token in _VALUE_TOKEN.finditer(raw):
        if token.lastindex is None:  # a comma or an opening bracket, not a string
            count += 1
            if count > most:
                return False
    return True


def _lone_surrogate(value: Any) -> bool:
    """True when any string in the parsed body (keys included) holds a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def client_address(request: flask.Request, trusted_hops: int) -> str:
    """The caller's address: our own proxies' X-Forwarded-For entries are trusted, nothing more."""
    if trusted_hops > 0:
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops][:64]
    return request.remote_addr or "unknown"


def query_int(request: flask.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ValidationFailed({name: f"must be an integer from {lo} to {hi}"})
    return int(raw)


# --- the function wrapper ----------------------------------------------------------------------


def endpoint(target: str, *, needs_context: bool = True) -> Callable:
    """Make a view into a functions-framework HTTP function for ``target`` of the route table.

    The view is called as ``view(ctx, request, **path_params)`` (or ``view(request)`` without
    context) and returns ``(status, payload[, headers])``.
    """

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def function(request: flask.Request) -> flask.Response:
            started = time.perf_counter()
            response = _dispatch(target, view, needs_context, request)
            log.log(
                logging.INFO if response.status_code >= 400 else logging.DEBUG,
                "%s %s -> %d (%.1f ms)",
                request.method,
                request.path,
                response.status_code,
                (time.perf_counter() - started) * 1000,
            )
            return response

        return function

    return decorate


def _dispatch(target: str, view: Callable, needs_context: bool, request: flask.Request) -> flask.Response:
    path = request.path
    if path == "/healthz/live" and request.method in ("GET", "HEAD"):
        # Every function container answers the liveness probe, whatever its target.
        return render((200, {"status": "ok"}))
    matched = routes.match(request.method, path)
    if matched is None:
        return problem(404, f"No route for {request.method} {path[:200]}.")
    if matched.route is None:
        return problem(405, f"{request.method} is not allowed here.", {"Allow": ", ".join(matched.allowed)})
    if matched.route.target != target:
        return problem(404, f"No route for {request.method} {path[:200]} in this function.")
    large = is_large(request)
    if large and not _large_requests.acquire(timeout=LARGE_REQUEST_WAIT):
        return problem(
            503, "Too many large requests are being answered at once; retry shortly.", {"Retry-After": "2"}
        )
    try:
        result = (
            view(context(), request, **matched.params) if needs_context else view(request, **matched.params)
        )
        return result if isinstance(result, flask.Response) else render(result)
    except ServiceError as exc:
        return problem_for(exc)
    except Exception as exc:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            dependency = "redis"
        elif is_unavailable(exc):
            dependency = "postgresql"
        else:
            # The trace goes to our log only; the caller gets the problem format, never a stack trace.
            log.exception("unhandled error in %s", target)
            return problem(500, "An internal error occurred.")
        log.warning("%s unavailable during %s %s: %s", dependency, request.method, path, type(exc).__name__)
        return problem_for(DependencyUnavailable(dependency))
    finally:
        if large:
            _large_requests.release()


def is_large(request: flask.Request) -> bool:
    """A body over LARGE_BODY bytes, or one whose length is not said (chunked)."""
    if request.content_length is not None:
        return request.content_length > LARGE_BODY
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()
