"""The route table: the single source of truth for (method, path) -> function target.

The dev router, the gateway configuration, the Knative manifests and the OpenAPI document are
generated from this table or checked against it by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # OpenAPI style: {id}, {delivery_id}, … are positive integer segments
    target: str  # the function's name in functions/main.py (FUNCTION_TARGET)
    operation: str = ""  # the OpenAPI operationId when one function serves several routes

    @property
    def operation_id(self) -> str:
        return self.operation or self.target

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[1-9][0-9]{0,18})", self.path) + "$")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz/live", "live"),
    Route("GET", "/healthz/ping", "ping"),
    Route("POST", "/api/v1/register", "register"),
    Route("POST", "/api/v1/login", "login"),
    Route("GET", "/api/v1/user/{id}", "get_user"),
    Route("PATCH", "/api/v1/user/{id}", "update_user"),
    Route("POST", "/api/v1/user/{id}/logout-all", "logout_all"),
    Route("POST", "/api/v1/user/{id}/smtp-check", "smtp_check"),
    Route("POST", "/api/v1/task/enqueue", "enqueue"),
    Route("POST", "/api/v1/task/enqueue/batch", "enqueue_batch"),
    Route("GET", "/api/v1/task/queue", "task_queue"),
    Route("GET", "/api/v1/task/queue/fail", "task_queue_fail"),
    # Retry or cancel what a search of the queue finds (shared/tasks/bulk.py).
    Route("POST", "/api/v1/task/bulk", "task_bulk"),
    # Before {id} for the reader; {id} matches digits only, so it could not take "stats" anyway.
    Route("GET", "/api/v1/task/stats", "task_stats"),
    Route("GET", "/api/v1/task/{id}", "get_task"),
    # Its attempts (shared/tasks/attempts.py): served by the task's own function.
    Route("GET", "/api/v1/task/{id}/attempts", "get_task", "task_attempts"),
    # A user's control over a task (shared/tasks/control.py); PATCH shares its path with GET above.
    Route("PATCH", "/api/v1/task/{id}", "reschedule_task"),
    Route("POST", "/api/v1/task/{id}/cancel", "cancel_task"),
    Route("POST", "/api/v1/task/{id}/retry", "retry_task"),
    # The message as it is sent (message/rfc822; shared/delivery/raw.py).
    Route("GET", "/api/v1/task/{id}/raw", "get_task_raw"),
    # Webhook endpoints and their delivery logs (one function each; the gateway picks by method).
    Route("GET", "/api/v1/webhooks", "list_webhooks"),
    Route("POST", "/api/v1/webhooks", "create_webhook"),
    Route("PATCH", "/api/v1/webhooks/{id}", "update_webhook"),
    Route("DELETE", "/api/v1/webhooks/{id}", "delete_webhook"),
    Route("POST", "/api/v1/webhooks/{id}/rotate", "rotate_webhook_secret"),
    Route("GET", "/api/v1/webhooks/{id}/deliveries", "list_webhook_deliveries"),
    Route("POST", "/api/v1/webhooks/{id}/deliveries/{delivery_id}/replay", "replay_webhook_delivery"),
    # The dashboard function: the page, its files (a fixed list: a {segment} here is an integer id),
    # the API reference rendered from shared/openapi.json, and that document itself.
    Route("GET", "/", "dashboard"),
    Route("GET", "/ui/app.css", "dashboard", "dashboard_css"),
    Route("GET", "/ui/app.js", "dashboard", "dashboard_js"),
    Route("GET", "/ui/chart.js", "dashboard", "dashboard_chart_js"),
    Route("GET", "/ui/icon.svg", "dashboard", "dashboard_icon"),
    Route("GET", "/ui/ops.js", "dashboard", "dashboard_ops_js"),
    Route("GET", "/ui/message.js", "dashboard", "dashboard_message_js"),
    Route("GET", "/ui/webhooks.js", "dashboard", "dashboard_webhooks_js"),
    Route("GET", "/ui/attempts.js", "dashboard", "dashboard_attempts_js"),
    Route("GET", "/ui/account.js", "dashboard", "dashboard_account_js"),
    # The HTML preview's frame: remote content blocked, or loaded on request (functions/web.py).
    Route("GET", "/ui/preview.html", "dashboard", "dashboard_preview"),
    Route("GET", "/ui/preview-remote.html", "dashboard", "dashboard_preview_remote"),
    Route("GET", "/ui/preview.js", "dashboard", "dashboard_preview_js"),
    Route("GET", "/docs", "dashboard", "api_docs"),
    Route("GET", "/openapi.json", "dashboard", "openapi_document"),
    # The queue gauges in Prometheus's text format (a function of its own: it reads PostgreSQL and Redis).
    Route("GET", "/metrics", "metrics"),
    # The operator's view: its page, and the figures behind OPS_TOKEN (shared/observe/opsview.py).
    Route("GET", "/ops", "ops", "ops_page"),
    Route("GET", "/ops/status", "ops", "ops_status"),
)

MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints; anything larger cannot exist

TARGETS: tuple[str, ...] = tuple(dict.fromkeys(r.target for r in ROUTES))


@dataclass(frozen=True)
class Match:
    route: Route | None  # None: the path is known but not with this method
    params: dict[str, int]
    allowed: tuple[str, ...] = ()


def match(method: str, path: str) -> Match | None:
    """The route for a request, a Match without route for a wrong method, or None if no path fits."""
    allowed: list[str] = []
    for route in ROUTES:
        m = route.pattern.match(path)
        if m is None or any(int(v) > MAX_ID for v in m.groupdict().values()):
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return Match(route, {k: int(v) for k, v in m.groupdict().items()})
        allowed.append(route.method)
    if allowed:
        return Match(None, {}, tuple(dict.fromkeys(allowed)))
    return None
