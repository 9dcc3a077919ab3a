"""HTTP translation for the functions: request parsing, the one error format, the one status map.

Every 4xx/5xx leaves as RFC 9457 problem details (``application/problem+json``). This is the only
place that knows which HTTP status each of our error classes becomes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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


def json_body(request: flask.Request, limit: int = SMALL_BODY_LIMIT) -> dict[str, Any]:
    """The request's JSON object: 415 if not JSON, 413 over ``limit`` bytes, 400 if malformed."""
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType("The body must be JSON (Content-Type: application/json).")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The body is not valid UTF-8.") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    try:
        # JSON may spell lone surrogates (\ud800); they are not text and no driver can store them.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("The body contains invalid Unicode (a lone surrogate).") from None
    return data


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
