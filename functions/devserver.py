"""Every HTTP function on one port, the way production serves each one.

Each function gets its own app from functions-framework's ``create_app(target, source)`` — the
same object the Knative containers run — and a thin WSGI dispatcher picks the app by the route
table. gunicorn serves the dispatcher, as functions-framework does in production.
"""

from __future__ import annotations

import json
from pathlib import Path

import gunicorn.app.base
from gunicorn import util as gunicorn_util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from shared import routes

MAIN_SOURCE = str(Path(__file__).with_name("main.py"))


def build_app(source: str = MAIN_SOURCE):
    """A WSGI app that routes each request to its function's functions-framework app."""
    import functions_framework

    apps = {target: functions_framework.create_app(target, source) for target in routes.TARGETS}
    by_path = {route.path: route.target for route in routes.ROUTES}

    def not_found(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Not Found",
                "status": 404,
                "detail": f"No route for {path[:200]}.",
            }
        ).encode()
        start_response(
            "404 NOT FOUND",
            [("Content-Type", "application/problem+json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        matched = routes.match(environ.get("REQUEST_METHOD", "GET"), path)
        if matched is None:
            return not_found(environ, start_response)
        if matched.route is not None:
            target = matched.route.target
        else:  # known path, wrong method: the owning function answers 405
            target = next(r.target for r in routes.ROUTES if r.pattern.match(path))
        return apps[target](environ, start_response)

    dispatch.apps = apps  # type: ignore[attr-defined]
    dispatch.by_path = by_path  # type: ignore[attr-defined]
    return dispatch


MALFORMED = (
    http_errors.InvalidRequestLine,
    http_errors.InvalidRequestMethod,
    http_errors.InvalidHTTPVersion,
    http_errors.InvalidHeader,
    http_errors.InvalidHeaderName,
    http_errors.ObsoleteFolding,
)


class ProblemWorker(ThreadWorker):
    """gunicorn's threaded worker, answering what gunicorn refuses before the app sees it (an over-long
    request line or header, a malformed request line) in the problem format too, not as an HTML page."""

    def handle_error(self, req, client, addr, exc):
        if isinstance(exc, http_errors.LimitRequestLine):
            status, title, detail = 414, "URI Too Long", "The request line is longer than 8190 bytes."
        elif isinstance(exc, http_errors.LimitRequestHeaders):
            status, title, detail = (
                431,
                "Request Header Fields Too Large",
                "The request's headers are too large.",
            )
        elif isinstance(exc, MALFORMED):
            status, title, detail = 400, "Bad Request", "The request is not valid HTTP/1.1."
        else:
            return super().handle_error(req, client, addr, exc)
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
        head = (
            f"HTTP/1.1 {status} {title}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        try:
            gunicorn_util.write_nonblock(client, (head + body).encode("latin-1"))
        except OSError:
            pass  # the client is gone: nothing to answer
        return None


class Server(gunicorn.app.base.BaseApplication):
    """gunicorn with explicit workers and threads (functions-framework reads the same two knobs)."""

    def __init__(self, app, host: str, port: int, workers: int, threads: int):
        self.options = {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "functions.devserver.ProblemWorker",
            "loglevel": "warning",
            "timeout": 60,
            "graceful_timeout": 10,
            "limit_request_line": 8190,
        }
        self.application = app
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.application


def serve(host: str, port: int, workers: int = 2, threads: int = 8) -> None:
    Server(build_app(), host, port, workers, threads).run()
