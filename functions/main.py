"""The HTTP functions. functions-framework serves one of them per process (FUNCTION_TARGET).

Each body reads: parse -> call a use case in ``shared`` -> render. Names equal the targets of
``shared.routes.ROUTES``.
"""

from __future__ import annotations

import flask
import functions_framework

from functions import web
from functions.http import client_address, endpoint, json_body, problem, query_int
from shared.accounts import sessions, users
from shared.delivery import check, raw
from shared.observe import gauges, opsview
from shared.tasks import attempts, batch, bulk, content, control, pages, search, stats, views
from shared.tasks import enqueue as single  # `enqueue` is the function below
from shared.webhooks import endpoints

NO_STORE = {"Cache-Control": "no-store"}  # an answer that holds a webhook secret is never cached


@functions_framework.http
@endpoint("live", needs_context=False)
def live(request):
    return 200, {"status": "ok"}


@functions_framework.http
@endpoint("ping")
def ping(ctx, request):
    checks = users.ping(ctx)
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return problem(503, f"{', '.join(down)} is down", {"Retry-After": "5"}, checks=checks)
    return 200, {"status": "ok", "checks": checks}


@functions_framework.http
@endpoint("register")
def register(ctx, request):
    body = json_body(request)
    user = users.register(ctx, body, client_address(request, ctx.settings.trusted_proxy_hops))
    return 201, user, {"Location": f"/api/v1/user/{user['id']}"}


@functions_framework.http
@endpoint("login")
def login(ctx, request):
    body = json_body(request)
    return 200, users.login(ctx, body, client_address(request, ctx.settings.trusted_proxy_hops))


@functions_framework.http
@endpoint("get_user")
def get_user(ctx, request, id):
    caller = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, users.get_user(ctx, caller.id, id)


@functions_framework.http
@endpoint("update_user")
def update_user(ctx, request, id):
    caller = users.authenticate(ctx, request.headers.get("Authorization"))
    body = json_body(request)
    client = client_address(request, ctx.settings.trusted_proxy_hops)
    return 200, sessions.update_account(ctx, caller, id, body, client)


@functions_framework.http
@endpoint("logout_all")
def logout_all(ctx, request, id):
    caller = users.authenticate(ctx, request.headers.get("Authorization"))
    sessions.logout_all(ctx, caller, id)
    return 204, None


@functions_framework.http
@endpoint("smtp_check")
def smtp_check(ctx, request, id):
    # Test connection: the stored account's server, up to AUTH and QUIT; nothing is sent.
    caller = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, check.smtp_check(ctx, caller.id, id), NO_STORE


@functions_framework.http
@endpoint("enqueue")
def enqueue(ctx, request):
    # The token is checked here; that its user still exists and the token is of the user's current
    # generation is checked by the insert itself.
    token = users.token_claims(ctx, request.headers.get("Authorization"))
    body = json_body(request, single.request_limit(ctx), content.MAX_VALUES)
    key = request.headers.get("Idempotency-Key")
    result, _created = single.enqueue(ctx, token.user_id, body, key, token.generation)
    return 202, result, {"Location": f"/api/v1/task/{result['task_id']}"}


@functions_framework.http
@endpoint("enqueue_batch")
def enqueue_batch(ctx, request):
    token = users.token_claims(ctx, request.headers.get("Authorization"))
    body = json_body(request, batch.request_limit(ctx), batch.max_values(ctx))
    mode = batch.validation_mode(request.args.get("validation"))
    key = request.headers.get("Idempotency-Key")
    result, _created = batch.enqueue_batch(ctx, token.user_id, body, key, mode, token.generation)
    return 202, result


@functions_framework.http
@endpoint("get_task")
def get_task(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    if request.path.endswith("/attempts"):  # GET /api/v1/task/{id}/attempts (operation task_attempts)
        limit = query_int(request, "limit", attempts.DEFAULT_PAGE, 1, attempts.MAX_PAGE)
        return 200, attempts.list_attempts(ctx, user.id, id, limit, request.args.get("cursor"))
    return 200, views.get_task(ctx, user.id, id)


@functions_framework.http
@endpoint("get_task_raw")
def get_task_raw(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    data = raw.raw_message(ctx, user.id, id)
    # A user's mail: never cached, never sniffed into something a browser would render.
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return flask.Response(data, content_type=raw.MEDIA_TYPE, headers=headers)


@functions_framework.http
@endpoint("reschedule_task")
def reschedule_task(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    body = json_body(request)
    return 200, control.reschedule(ctx, user.id, id, body)


@functions_framework.http
@endpoint("cancel_task")
def cancel_task(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, control.cancel(ctx, user.id, id)


@functions_framework.http
@endpoint("retry_task")
def retry_task(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, control.retry(ctx, user.id, id)


@functions_framework.http
@endpoint("task_queue")
def task_queue(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    found = search.parse(request.args, search.PENDING_STATUSES)
    limit = query_int(request, "limit", views.DEFAULT_PAGE, 1, views.MAX_PAGE)
    return 200, pages.list_tasks(ctx, user.id, found, limit, request.args.get("cursor"))


@functions_framework.http
@endpoint("task_queue_fail")
def task_queue_fail(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    found = search.parse(request.args, search.FAIL_STATUSES, status=False)
    limit = query_int(request, "limit", views.DEFAULT_PAGE, 1, views.MAX_PAGE)
    return 200, pages.list_tasks(ctx, user.id, found, limit, request.args.get("cursor"))


@functions_framework.http
@endpoint("task_bulk")
def task_bulk(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    body = json_body(request)
    return 200, bulk.run(ctx, user.id, body, request.headers.get("Idempotency-Key"))


@functions_framework.http
@endpoint("task_stats")
def task_stats(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, stats.task_stats(ctx, user.id)


@functions_framework.http
@endpoint("create_webhook")
def create_webhook(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    body = json_body(request)
    return 201, endpoints.create(ctx, user.id, body), NO_STORE


@functions_framework.http
@endpoint("list_webhooks")
def list_webhooks(ctx, request):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, endpoints.list_endpoints(ctx, user.id)


@functions_framework.http
@endpoint("update_webhook")
def update_webhook(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    body = json_body(request)
    return 200, endpoints.update(ctx, user.id, id, body)


@functions_framework.http
@endpoint("delete_webhook")
def delete_webhook(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    endpoints.delete(ctx, user.id, id)
    return 204, None


@functions_framework.http
@endpoint("rotate_webhook_secret")
def rotate_webhook_secret(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 200, endpoints.rotate(ctx, user.id, id), NO_STORE


@functions_framework.http
@endpoint("list_webhook_deliveries")
def list_webhook_deliveries(ctx, request, id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    limit = query_int(request, "limit", endpoints.DEFAULT_PAGE, 1, endpoints.MAX_PAGE)
    return 200, endpoints.list_deliveries(ctx, user.id, id, limit, request.args.get("cursor"))


@functions_framework.http
@endpoint("replay_webhook_delivery")
def replay_webhook_delivery(ctx, request, id, delivery_id):
    user = users.authenticate(ctx, request.headers.get("Authorization"))
    return 202, endpoints.replay(ctx, user.id, id, delivery_id)


@functions_framework.http
@endpoint("dashboard", needs_context=False)
def dashboard(request):
    # The page, its files, the API reference and the OpenAPI document: static answers, no database.
    return web.answer(request.path)


@functions_framework.http
@endpoint("metrics")
def metrics(ctx, request):
    # The queue gauges for Prometheus: fixed words as labels, no tenant's data (docs/operations.md).
    body = gauges.render(gauges.read(ctx.settings, ctx.engine, ctx.redis))
    return flask.Response(body, content_type=gauges.CONTENT_TYPE, headers={"Cache-Control": "no-store"})


@functions_framework.http
@endpoint("ops")
def ops(ctx, request):
    # The operator's page (no data in it), and the figures behind OPS_TOKEN; both 404 without it.
    if request.path == "/ops":
        opsview.require_enabled(ctx.settings, request.path)
        return web.ops_page()
    opsview.authorize(ctx.settings, request.headers.get("Authorization"))
    return 200, opsview.figures(ctx), {"Cache-Control": "no-store"}
