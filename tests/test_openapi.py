"""shared/openapi.json against the route table, the code, and live answers of the functions.

The document is hand-written; these tests make it fail loudly when it and the code drift apart:
- it is a structurally valid OpenAPI 3.1 document whose schemas are valid JSON Schema 2020-12
  (and, when ``openapi-spec-validator`` is installed, passes that validator too);
- its (method, path) pairs are exactly those of ``shared.routes.ROUTES``, and every operationId is
  the route's function target;
- every error answer is a ``Problem`` as ``application/problem+json``;
- what it says about auth, bodies and limits matches the functions' source and constants;
- real answers from the functions (real PostgreSQL and Redis) are documented and match the schemas.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from functions import http as fhttp
from functions import main, web
from shared import routes
from shared.tasks import batch, enqueue, stats, views
from shared.validation import SECURITY_CHOICES
from tests.conftest import auth_header, login, register_user

DOC_PATH = Path(__file__).resolve().parent.parent / "shared" / "openapi.json"
DOC: dict[str, Any] = json.loads(DOC_PATH.read_text(encoding="utf-8"))
DOC_URI = "urn:mailq:openapi"
REGISTRY = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(DOC))

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PATH_ITEM_KEYS = {*HTTP_METHODS, "$ref", "summary", "description", "servers", "parameters"}
PROBLEM_REF = "#/components/schemas/Problem"
PROBLEM_JSON = "application/problem+json"
AUTHENTICATED_OPERATIONS_SCHEME = "bearerAuth"

# --- helpers -------------------------------------------------------------------------------------


def _pointer(ref: str) -> Any:
    """The part of the document an internal ``#/...`` reference points at."""
    assert ref.startswith("#/"), f"only internal references are used: {ref}"
    node: Any = DOC
    for raw in ref[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and key in node, f"unresolvable $ref {ref}"
        node = node[key]
    return node


def _deref(obj: dict) -> dict:
    """Follow OpenAPI-level ``$ref``s (responses, parameters, headers) to the object itself."""
    seen = set()
    while "$ref" in obj:
        assert obj["$ref"] not in seen, f"reference cycle at {obj['$ref']}"
        seen.add(obj["$ref"])
        obj = _pointer(obj["$ref"])
    return obj


def _walk(node: Any, path: str = "#"):
    """Every (json-pointer, dict) in the document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key.replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


def _absolute(schema: Any) -> Any:
    """A copy of a schema whose ``#/...`` references name the document, so it validates on its own."""
    if isinstance(schema, dict):
        return {
            key: (DOC_URI + value if key == "$ref" and value.startswith("#") else _absolute(value))
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_absolute(v) for v in schema]
    return schema


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


@FORMATS.checks("idn-email")
def _is_email(value: object) -> bool:
    return not isinstance(value, str) or value.count("@") == 1 and all(value.split("@"))


@FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def validator(schema: dict) -> Draft202012Validator:
    return Draft202012Validator(_absolute(schema), registry=REGISTRY, format_checker=FORMATS)


def schema_errors(schema: dict, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(schema).iter_errors(instance)
    ]


def operations():
    """(METHOD, path, operation) for every operation in the document."""
    for path, item in DOC["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def operation(method: str, path: str) -> dict:
    assert method.lower() in DOC["paths"].get(path, {}), (
        f"shared/openapi.json does not document {method} {path}"
    )
    return DOC["paths"][path][method.lower()]


def request_schema(method: str, path: str) -> dict:
    return operation(method, path)["requestBody"]["content"]["application/json"]["schema"]


def parameters(op: dict) -> list[dict]:
    return [_deref(p) for p in op.get("parameters", [])]


ROUTE_IDS = [f"{r.method} {r.path}" for r in routes.ROUTES]
# The functions that answer 429: login and register (per client and email), PATCH user (a password change
# counts against the login's limits), the tenant bounds (docs/security.md), and the SMTP check's rate.
RATE_LIMITED = (
    "register", "login", "update_user", "enqueue", "enqueue_batch", "retry_task", "replay_webhook_delivery",
    "smtp_check",
)  # fmt: skip


# --- the document itself -------------------------------------------------------------------------


def test_document_is_openapi_3_1_structurally():
    assert DOC["openapi"] == "3.1.0"
    assert isinstance(DOC["info"]["title"], str) and isinstance(DOC["info"]["version"], str)
    assert DOC["servers"][0]["url"] == "http://127.0.0.1:8080"
    for path, item in DOC["paths"].items():
        assert path.startswith("/"), path
        assert set(item) <= PATH_ITEM_KEYS, f"{path}: unknown keys {set(item) - PATH_ITEM_KEYS}"
    operation_ids = [op["operationId"] for _, _, op in operations()]
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    for method, path, op in operations():
        where = f"{method} {path}"
        assert op["responses"], where
        for code, response in op["responses"].items():
            assert re.fullmatch(r"[1-5](\d\d|XX)|default", code), f"{where}: bad status key {code}"
            response = _deref(response)
            assert response["description"], f"{where} {code}: a response needs a description"
            for media, content in response.get("content", {}).items():
                assert "schema" in content, f"{where} {code} {media}: no schema"
            for name, header in response.get("headers", {}).items():
                assert "schema" in _deref(header), f"{where} {code} header {name}: no schema"
        # Path templates and path parameters agree, both ways.
        templated = set(re.findall(r"\{(\w+)\}", path))
        declared = {
            p["name"]
            for p in parameters(op) + [_deref(p) for p in DOC["paths"][path].get("parameters", [])]
            if p["in"] == "path"
        }
        assert templated == declared, f"{where}: path template {templated} vs path parameters {declared}"
        for p in parameters(op):
            assert p["in"] in ("path", "query", "header", "cookie"), f"{where}: {p}"
            assert "schema" in p, f"{where}: parameter {p['name']} has no schema"
            if p["in"] == "path":
                assert p["required"] is True, f"{where}: path parameters must be required"
        for requirement in op.get("security", []):
            for scheme in requirement:
                assert scheme in DOC["components"]["securitySchemes"], f"{where}: unknown scheme {scheme}"
    assert DOC["components"]["securitySchemes"][AUTHENTICATED_OPERATIONS_SCHEME] == {
        **DOC["components"]["securitySchemes"][AUTHENTICATED_OPERATIONS_SCHEME],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }


def test_every_reference_resolves():
    refs = [(where, node["$ref"]) for where, node in _walk(DOC) if isinstance(node.get("$ref"), str)]
    assert refs
    for where, ref in refs:
        assert ref.startswith("#/"), f"{where}: external reference {ref}"
        _pointer(ref)


def _all_schemas():
    """Every Schema Object in the document (components, parameters, headers, media types)."""
    for name, schema in DOC["components"]["schemas"].items():
        yield f"components/schemas/{name}", schema
    for where, node in _walk(DOC):
        if where.startswith("#/components/schemas"):
            continue
        is_parameter_or_header = (
            "in" in node or where.startswith("#/components/headers/") or "/headers/" in where
        )
        is_media_type = re.search(r"/content/[^/]+$", where) is not None
        if (is_parameter_or_header or is_media_type) and isinstance(node.get("schema"), dict):
            yield where, node["schema"]


def test_every_schema_is_valid_json_schema_2020_12():
    checked = 0
    for where, schema in _all_schemas():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:  # noqa: BLE001 - reported with its location
            pytest.fail(f"{where}: {exc}")
        checked += 1
    assert checked > 20


def test_every_example_matches_its_schema():
    checked = 0
    for where, node in _walk(DOC):
        if re.search(r"/content/[^/]+$", where) and "example" in node:
            errors = schema_errors(node["schema"], node["example"])
            assert not errors, f"{where}: the example does not match its schema: {errors}"
            checked += 1
    assert checked >= 20


def test_document_passes_openapi_spec_validator():
    spec_validator = pytest.importorskip("openapi_spec_validator")
    spec_validator.validate(copy.deepcopy(DOC), cls=spec_validator.OpenAPIV31SpecValidator)


# --- the document against the route table and the code ------------------------------------------


def test_document_and_route_table_have_the_same_routes():
    in_table = {(r.method, r.path) for r in routes.ROUTES}
    in_document = {(method, path) for method, path, _ in operations()}
    assert len(routes.ROUTES) == len(in_table), "ROUTES lists a (method, path) twice"
    assert in_table == in_document, (
        f"in ROUTES but not in shared/openapi.json: {sorted(in_table - in_document)}; "
        f"in shared/openapi.json but not in ROUTES: {sorted(in_document - in_table)}"
    )


def uses_dependencies(route: routes.Route) -> bool:
    """False for the functions built without a context (no PostgreSQL, no Redis): they cannot 503."""
    return "needs_context=False" not in inspect.getsource(getattr(main, route.target))


@pytest.mark.parametrize("route", routes.ROUTES, ids=ROUTE_IDS)
def test_operation_id_is_the_route_operation_and_names_its_function(route):
    op = operation(route.method, route.path)
    assert op["operationId"] == route.operation_id
    assert callable(getattr(main, route.target, None)), f"functions/main.py has no function {route.target}"


@pytest.mark.parametrize("route", routes.ROUTES, ids=ROUTE_IDS)
def test_every_error_response_is_a_problem(route):
    op = operation(route.method, route.path)
    errors = {code: _deref(r) for code, r in op["responses"].items() if code == "default" or code[0] in "45"}
    successes = {code: _deref(r) for code, r in op["responses"].items() if code[0] == "2"}
    assert successes, "an operation needs a success response"
    # The API answers JSON; the dashboard function answers each of its paths with that file's type, the
    # metrics function in Prometheus's text format.
    success_type = {"metrics": "text/plain", "get_task_raw": "message/rfc822", "ops_page": "text/html"}.get(
        route.operation_id, "application/json"
    )
    if route.target == "dashboard":
        success_type = web.media_type(route.path)
    for code, response in successes.items():
        if code == "204":  # No Content: no body, so no media type
            assert "content" not in response, f"{code} has no body"
            continue
        assert set(response["content"]) == {success_type}, f"{code}: successes are {success_type}"
    for code, response in errors.items():
        assert set(response["content"]) == {PROBLEM_JSON}, f"{code}: errors are {PROBLEM_JSON} only"
        schema = response["content"][PROBLEM_JSON]["schema"]
        refs = [schema.get("$ref")] + [part.get("$ref") for part in schema.get("allOf", [])]
        assert PROBLEM_REF in refs, f"{code}: the schema must be (or be allOf) {PROBLEM_REF}"
        status = [
            p["properties"]["status"] for p in schema.get("allOf", []) if "status" in p.get("properties", {})
        ]
        assert status == [{"const": int(code)}], f"{code}: the Problem's status must be pinned to {code}"


def test_problem_schema_matches_the_code():
    problem = DOC["components"]["schemas"]["Problem"]
    assert problem["required"] == ["type", "title", "status", "detail"]
    assert set(problem["properties"]) == {
        "type",
        "title",
        "status",
        "detail",
        "errors",
        "dependency",
        "checks",
        "limit",
    }
    # What functions/http.py really renders, for each kind of extra member.
    for response in (
        fhttp.problem_for(fhttp.ValidationFailed({"email": "is required"})),
        fhttp.problem_for(fhttp.DependencyUnavailable("redis")),
        fhttp.problem_for(fhttp.RateLimited(7)),
        fhttp.problem_for(fhttp.RateLimited(3, "Over the bound.", limit="pending_tasks")),
        fhttp.problem(503, "redis is down", checks={"postgresql": "ok", "redis": "down"}),
        fhttp.problem(404, "No route."),
    ):
        assert response.mimetype == PROBLEM_JSON
        body = json.loads(response.get_data())
        assert not schema_errors({"$ref": PROBLEM_REF}, body), body


def test_every_status_the_code_maps_is_documented():
    documented = {int(code) for _, _, op in operations() for code in op["responses"] if code.isdigit()}
    assert set(fhttp.STATUS_OF.values()) <= documented


@pytest.mark.parametrize("route", routes.ROUTES, ids=ROUTE_IDS)
def test_auth_and_bodies_follow_the_function_source(route):
    """Bearer auth exactly where the function authenticates; a JSON body exactly where it parses one."""
    op = operation(route.method, route.path)
    source = inspect.getsource(getattr(main, route.target))
    responses = op["responses"]
    authenticates = "users.authenticate(" in source or "users.token_claims(" in source
    assert (op.get("security") == [{AUTHENTICATED_OPERATIONS_SCHEME: []}]) is authenticates
    # The operator's figures take OPS_TOKEN instead (the ops function serves its page without it).
    operator = route.operation_id == "ops_status" and "opsview.authorize(" in source
    assert (op.get("security") == [{"opsToken": []}]) is operator
    assert ("401" in responses) is (authenticates or operator or route.target == "login")
    reads_body = "json_body(" in source
    assert ("requestBody" in op) is reads_body
    if reads_body:
        assert op["requestBody"]["required"] is True
        assert set(op["requestBody"]["content"]) == {"application/json"}
        assert {"400", "413", "415", "422"} <= set(responses)
    else:
        assert not {"400", "413", "415"} & set(responses)
    assert ("503" in responses) is uses_dependencies(route)
    if route.target in RATE_LIMITED:
        rate_limited = _deref(responses["429"])
        assert _deref(rate_limited["headers"]["Retry-After"])["required"] is True
    else:
        assert "429" not in responses


def test_constants_match_the_code():
    from shared.tasks.content import MAX_SUBJECT

    schemas = DOC["components"]["schemas"]
    params = DOC["components"]["parameters"]
    assert schemas["TaskStatus"]["enum"] == list(views.STATUS_CHOICES)
    assert schemas["SmtpSecurity"]["enum"] == list(SECURITY_CHOICES)
    assert schemas["RegisterRequest"]["properties"]["smtp_security"]["enum"] == [*SECURITY_CHOICES, None]
    assert params["Limit"]["schema"]["default"] == views.DEFAULT_PAGE
    assert params["Limit"]["schema"]["maximum"] == views.MAX_PAGE
    assert schemas["TaskPage"]["properties"]["items"]["maxItems"] == views.MAX_PAGE
    assert schemas["EnqueueRequest"]["properties"]["subject"]["maxLength"] == MAX_SUBJECT
    assert schemas["Task"]["properties"]["subject"]["maxLength"] == MAX_SUBJECT
    assert params["IdempotencyKey"]["schema"]["maxLength"] == enqueue.MAX_IDEMPOTENCY_KEY
    figures = schemas["TaskStats"]["properties"]
    assert figures["counts"]["required"] == list(views.STATUS_CHOICES)
    assert {c["maximum"] for c in figures["counts"]["properties"].values()} == {stats.COUNT_CAP}
    assert figures["minutes"]["minItems"] == figures["minutes"]["maxItems"] == stats.WINDOW_MINUTES
    assert schemas["TaskMinute"]["required"] == ["start", *stats.OUTCOMES, *stats.ALIASES]
    register = schemas["RegisterRequest"]
    assert {"smtp-username", "smtp-password"} <= set(register["required"])
    assert "smtp_username" not in register["properties"] and "smtp_password" not in register["properties"]


# --- live answers against the document -----------------------------------------------------------


def check(response, method: str, path: str, status: int) -> Any:
    """Assert the answer is ``status``, documented for the operation, and matches its schema and headers."""
    is_json = response.mimetype == "application/json" or response.mimetype.endswith("+json")
    body = response.get_json(silent=True) if is_json else response.get_data(as_text=True)
    assert response.status_code == status, (response.status_code, body)
    documented = operation(method, path)["responses"].get(str(status))
    assert documented is not None, (
        f"{method} {path} answered {status}, which shared/openapi.json does not list"
    )
    documented = _deref(documented)
    assert response.mimetype in documented["content"], (response.mimetype, list(documented["content"]))
    errors = schema_errors(documented["content"][response.mimetype]["schema"], body)
    assert not errors, f"{method} {path} {status} does not match the document: {errors}\n{body}"
    for name, header in documented.get("headers", {}).items():
        header = _deref(header)
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"{method} {path} {status}: header {name} missing"
            continue
        schema = header["schema"]
        typed: Any = int(value) if schema.get("type") == "integer" else value
        assert not schema_errors(schema, typed), f"header {name}: {value!r}"
    return body


def assert_request_valid(method: str, path: str, payload: dict) -> None:
    errors = schema_errors(request_schema(method, path), payload)
    assert not errors, f"a request the server accepts is invalid per the document: {errors}"


REGISTER = {
    "email": "grace@example.com",
    "password": "correct horse",
    "smtp_host": "127.0.0.1",
    "smtp_port": "1025",  # the string form is accepted too
    "smtp-username": "grace",
    "smtp-password": "smtp-secret-pw",
    "smtp_security": "none",
}


def test_live_health(api):
    check(api.get("/healthz/live"), "GET", "/healthz/live", 200)
    check(api.get("/healthz/ping"), "GET", "/healthz/ping", 200)


def test_live_metrics(api):
    text = check(api.get("/metrics"), "GET", "/metrics", 200)
    assert 'mailq_tasks{status="queued"} 0.0' in text


def test_live_accounts(api):
    assert_request_valid("POST", "/api/v1/register", REGISTER)
    user = check(api.post("/api/v1/register", json=REGISTER), "POST", "/api/v1/register", 201)
    assert user["smtp_port"] == 1025 and user["smtp_username"] == "grace"

    response = api.post(
        "/api/v1/register",
        json={**REGISTER, "smtp_port": 587, "smtp_security": None, "email": "ada@example.com"},
    )
    other = check(response, "POST", "/api/v1/register", 201)
    assert response.headers["Location"] == f"/api/v1/user/{other['id']}"
    assert other["smtp_security"] == "starttls"

    credentials = {"email": "GRACE@example.com", "password": "correct horse"}
    assert_request_valid("POST", "/api/v1/login", credentials)
    token = check(api.post("/api/v1/login", json=credentials), "POST", "/api/v1/login", 200)
    assert token["id"] == user["id"]
    headers = auth_header(token["token"])

    me = check(api.get(f"/api/v1/user/{user['id']}", headers=headers), "GET", "/api/v1/user/{id}", 200)
    assert me == user

    # The errors each of these operations documents.
    check(api.get(f"/api/v1/user/{other['id']}", headers=headers), "GET", "/api/v1/user/{id}", 404)
    check(api.get(f"/api/v1/user/{user['id']}"), "GET", "/api/v1/user/{id}", 401)
    check(api.post("/api/v1/register", json=REGISTER), "POST", "/api/v1/register", 409)
    check(
        api.post("/api/v1/login", json={**credentials, "password": "wrong horse"}),
        "POST",
        "/api/v1/login",
        401,
    )
    check(api.post("/api/v1/login", data="email=x", content_type="text/plain"), "POST", "/api/v1/login", 415)
    check(api.post("/api/v1/login", data="{", content_type="application/json"), "POST", "/api/v1/login", 400)
    check(api.post("/api/v1/login", json={"email": "x@example.com"}), "POST", "/api/v1/login", 422)
    oversized = {"email": "x@example.com", "password": "p" * 70_000}
    check(api.post("/api/v1/login", json=oversized), "POST", "/api/v1/login", 413)


def test_live_password_change_and_logout_all(api):
    user = check(api.post("/api/v1/register", json=REGISTER), "POST", "/api/v1/register", 201)
    path = f"/api/v1/user/{user['id']}"
    credentials = {"email": REGISTER["email"], "password": "correct horse"}
    headers = auth_header(api.post("/api/v1/login", json=credentials).get_json()["token"])
    wrong = {"password": "a new password", "current_password": "wrong horse"}
    assert_request_valid("PATCH", "/api/v1/user/{id}", wrong)
    check(api.patch(path, json=wrong, headers=headers), "PATCH", "/api/v1/user/{id}", 422)
    moved = {"smtp_port": 2526}
    check(api.patch(path, json=moved, headers=headers), "PATCH", "/api/v1/user/{id}", 422)
    right = {"password": "a new password", "current_password": "correct horse"}
    assert check(api.patch(path, json=right, headers=headers), "PATCH", "/api/v1/user/{id}", 200) == user
    check(api.get(path, headers=headers), "GET", "/api/v1/user/{id}", 401)  # revoked
    fresh = {"email": REGISTER["email"], "password": "a new password"}
    headers = auth_header(api.post("/api/v1/login", json=fresh).get_json()["token"])
    response = api.post(f"{path}/logout-all", headers=headers)
    assert (
        response.status_code == 204
        and "204" in operation("POST", "/api/v1/user/{id}/logout-all")["responses"]
    )
    check(api.post(f"{path}/logout-all", headers=headers), "POST", "/api/v1/user/{id}/logout-all", 401)


def test_live_tenant_bound(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_PENDING_PER_USER", "1")
    http.reset_context()
    check(api.post("/api/v1/register", json=REGISTER), "POST", "/api/v1/register", 201)
    credentials = {"email": REGISTER["email"], "password": "correct horse"}
    headers = auth_header(api.post("/api/v1/login", json=credentials).get_json()["token"])
    mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello"}
    check(api.post("/api/v1/task/enqueue", json=mail, headers=headers), "POST", "/api/v1/task/enqueue", 202)
    refused = api.post("/api/v1/task/enqueue", json=mail, headers=headers)
    assert check(refused, "POST", "/api/v1/task/enqueue", 429)["limit"] == "pending_tasks"
    batch = api.post("/api/v1/task/enqueue/batch", json={"tasks": [mail]}, headers=headers)
    check(batch, "POST", "/api/v1/task/enqueue/batch", 429)


def test_live_register_422_is_a_problem_and_invalid_per_the_document(api):
    bad = {
        "email": "not-an-email",
        "password": "p",  # (the document's minLength is 2: 8 bytes can be 2 four-byte characters)
        "smtp_host": "bad_host!",
        "smtp_port": 0,
        "smtp-username": "a\r\nb",
        "smtp-password": "x",
        "smtp_security": "ssl",
    }
    problem = check(api.post("/api/v1/register", json=bad), "POST", "/api/v1/register", 422)
    assert set(problem["errors"]) == {
        "email",
        "password",
        "smtp_host",
        "smtp_port",
        "smtp-username",
        "smtp_security",
    }
    # Each field the server refused is refused by the document's schema as well.
    for field in problem["errors"]:
        errors = schema_errors(request_schema("POST", "/api/v1/register"), {**REGISTER, field: bad[field]})
        assert errors, f"the document accepts {field}={bad[field]!r}, which the server refuses"


def test_live_tasks(api):
    register_user(api)
    headers = auth_header(login(api))
    mail = {"recipient_email": "grace@example.org", "subject": "Hello", "body": "Hi Grace!"}
    assert_request_valid("POST", "/api/v1/task/enqueue", mail)

    keyed = {**headers, "Idempotency-Key": "order-1"}
    response = api.post("/api/v1/task/enqueue", json=mail, headers=keyed)
    first = check(response, "POST", "/api/v1/task/enqueue", 202)
    assert first["status"] == "queued"
    assert response.headers["Location"] == f"/api/v1/task/{first['task_id']}"
    replay = check(
        api.post("/api/v1/task/enqueue", json=mail, headers=keyed), "POST", "/api/v1/task/enqueue", 202
    )
    assert replay["task_id"] == first["task_id"]
    clash = api.post("/api/v1/task/enqueue", json={**mail, "subject": "Other"}, headers=keyed)
    assert "Idempotency-Key" in check(clash, "POST", "/api/v1/task/enqueue", 422)["errors"]

    later = {**mail, "scheduled_at": (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat()}
    assert_request_valid("POST", "/api/v1/task/enqueue", later)
    scheduled = check(
        api.post("/api/v1/task/enqueue", json=later, headers=headers), "POST", "/api/v1/task/enqueue", 202
    )
    assert scheduled["status"] == "scheduled"

    page = check(api.get("/api/v1/task/queue", headers=headers), "GET", "/api/v1/task/queue", 200)
    assert [t["id"] for t in page["items"]] == [first["task_id"], scheduled["task_id"]]
    assert page["next_cursor"] is None
    page = check(api.get("/api/v1/task/queue?limit=1", headers=headers), "GET", "/api/v1/task/queue", 200)
    assert isinstance(page["next_cursor"], str)
    rest = check(
        api.get(f"/api/v1/task/queue?limit=1&cursor={page['next_cursor']}", headers=headers),
        "GET",
        "/api/v1/task/queue",
        200,
    )
    assert [t["id"] for t in rest["items"]] == [scheduled["task_id"]]
    only = check(
        api.get("/api/v1/task/queue?status=scheduled", headers=headers), "GET", "/api/v1/task/queue", 200
    )
    assert [t["status"] for t in only["items"]] == ["scheduled"]
    check(api.get("/api/v1/task/queue?limit=0", headers=headers), "GET", "/api/v1/task/queue", 422)
    check(api.get("/api/v1/task/queue?status=lost", headers=headers), "GET", "/api/v1/task/queue", 422)
    check(api.get("/api/v1/task/queue/fail", headers=headers), "GET", "/api/v1/task/queue/fail", 200)
    check(
        api.get("/api/v1/task/queue/fail?cursor=nope", headers=headers), "GET", "/api/v1/task/queue/fail", 422
    )

    task = check(
        api.get(f"/api/v1/task/{first['task_id']}", headers=headers), "GET", "/api/v1/task/{id}", 200
    )
    assert task["body"] == "Hi Grace!" and task["status"] == "queued"
    check(api.get("/api/v1/task/999999", headers=headers), "GET", "/api/v1/task/{id}", 404)
    check(api.get("/api/v1/task/queue"), "GET", "/api/v1/task/queue", 401)
    check(api.post("/api/v1/task/enqueue", json=mail), "POST", "/api/v1/task/enqueue", 401)

    to_grace = check(
        api.get("/api/v1/task/queue?recipient=grace@EXAMPLE.org", headers=headers),
        "GET",
        "/api/v1/task/queue",
        200,
    )
    assert [t["id"] for t in to_grace["items"]] == [first["task_id"], scheduled["task_id"]]
    check(api.get("/api/v1/task/queue?recipient=nobody", headers=headers), "GET", "/api/v1/task/queue", 422)
    check(
        api.get("/api/v1/task/queue/fail?recipient=bob@example.org", headers=headers),
        "GET",
        "/api/v1/task/queue/fail",
        200,
    )
    figures = check(api.get("/api/v1/task/stats", headers=headers), "GET", "/api/v1/task/stats", 200)
    assert figures["counts"]["queued"] == 1 and figures["counts"]["scheduled"] == 1
    check(api.get("/api/v1/task/stats"), "GET", "/api/v1/task/stats", 401)


@pytest.mark.parametrize("route", [r for r in routes.ROUTES if r.target == "dashboard"], ids=lambda r: r.path)
def test_live_dashboard_files(api, route):
    response = api.get(route.path)
    body = check(response, route.method, route.path, 200)
    assert body, f"{route.path} is empty"
    assert response.headers["Content-Security-Policy"] == web.policy_for(route.path)


def test_live_task_control(api):
    register_user(api)
    headers = auth_header(login(api))
    mail = {"recipient_email": "grace@example.org", "subject": "Hello", "body": "Hi Grace!"}
    task_id = api.post("/api/v1/task/enqueue", json=mail, headers=headers).get_json()["task_id"]
    one, cancel, retry = "/api/v1/task/{id}", "/api/v1/task/{id}/cancel", "/api/v1/task/{id}/retry"
    at = {"scheduled_at": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
    assert_request_valid("PATCH", one, at)

    moved = check(api.patch(f"/api/v1/task/{task_id}", json=at, headers=headers), "PATCH", one, 200)
    assert moved["status"] == "scheduled" and moved["tries_left"] == 3
    check(api.patch(f"/api/v1/task/{task_id}", json={}, headers=headers), "PATCH", one, 422)
    check(api.patch(f"/api/v1/task/{task_id}", data="x", headers=headers), "PATCH", one, 415)
    cancelled = check(api.post(f"/api/v1/task/{task_id}/cancel", headers=headers), "POST", cancel, 200)
    assert cancelled["status"] == "cancelled" and cancelled["tries_left"] is None
    check(api.post(f"/api/v1/task/{task_id}/cancel", headers=headers), "POST", cancel, 409)
    check(api.patch(f"/api/v1/task/{task_id}", json=at, headers=headers), "PATCH", one, 409)
    retried = check(api.post(f"/api/v1/task/{task_id}/retry", headers=headers), "POST", retry, 200)
    assert retried["status"] == "queued"
    check(api.post(f"/api/v1/task/{task_id}/retry", headers=headers), "POST", retry, 409)
    for method, path in (("POST", cancel), ("POST", retry), ("PATCH", one)):
        url = path.replace("{id}", "999999")
        check(api.open(url, method=method, json=at, headers=headers), method, path, 404)
        check(api.open(url, method=method, json=at), method, path, 401)


def test_live_webhooks(api, ctx):
    from shared.models import EVENT_TYPES
    from shared.tasks import events
    from shared.webhooks import endpoints

    schemas = DOC["components"]["schemas"]
    assert schemas["EventType"]["enum"] == list(events.EVENT_TYPES) == list(EVENT_TYPES)
    assert schemas["WebhookList"]["properties"]["items"]["maxItems"] == endpoints.MAX_ENDPOINTS
    assert DOC["components"]["parameters"]["DeliveryLimit"]["schema"]["maximum"] == endpoints.MAX_PAGE
    assert schemas["WebhookEvent"]["properties"]["data"]["properties"]["reason"]["enum"] == list(
        events.CANCEL_REASONS
    )

    register_user(api)
    headers = auth_header(login(api))
    body = {"url": "https://hooks.example.com/mailq", "events": ["task.sent"]}
    assert_request_valid("POST", "/api/v1/webhooks", body)
    created = check(api.post("/api/v1/webhooks", json=body, headers=headers), "POST", "/api/v1/webhooks", 201)
    one = f"/api/v1/webhooks/{created['id']}"
    check(api.get("/api/v1/webhooks", headers=headers), "GET", "/api/v1/webhooks", 200)
    check(api.post(one + "/rotate", headers=headers), "POST", "/api/v1/webhooks/{id}/rotate", 200)
    log = check(api.get(one + "/deliveries", headers=headers), "GET", "/api/v1/webhooks/{id}/deliveries", 200)
    assert log == {"items": [], "next_cursor": None}
    check(
        api.get(one + "/deliveries?limit=0", headers=headers), "GET", "/api/v1/webhooks/{id}/deliveries", 422
    )
    replay = "/api/v1/webhooks/{id}/deliveries/{delivery_id}/replay"
    check(api.post(one + "/deliveries/1/replay", headers=headers), "POST", replay, 404)
    check(
        api.post("/api/v1/webhooks", json={"url": "ftp://x"}, headers=headers),
        "POST",
        "/api/v1/webhooks",
        422,
    )
    check(api.get("/api/v1/webhooks"), "GET", "/api/v1/webhooks", 401)
    for _ in range(endpoints.MAX_ENDPOINTS - 1):
        api.post("/api/v1/webhooks", json=body, headers=headers)
    check(api.post("/api/v1/webhooks", json=body, headers=headers), "POST", "/api/v1/webhooks", 409)
    deleted = api.delete(one, headers=headers)
    assert deleted.status_code == 204 and "204" in operation("DELETE", "/api/v1/webhooks/{id}")["responses"]
    assert deleted.get_data() == b"" and "Content-Type" not in deleted.headers
    check(api.delete(one, headers=headers), "DELETE", "/api/v1/webhooks/{id}", 404)


def test_the_webhook_request_mailq_sends_is_documented_and_matches_a_real_one(ctx):
    from datetime import UTC, datetime

    from shared.tasks import events

    hook = DOC["webhooks"]["taskEvent"]["post"]
    schema = hook["requestBody"]["content"]["application/json"]["schema"]
    data = {
        "task_id": 1,
        "status": "failed",
        "recipient_email": "bob@example.org",
        "message_id": "<m@example.com>",
        "try_count": 1,
        "last_error": "451 busy",
        "smtp_code": 451,
        "next_attempt_at": "2026-11-30T10:00:00.123456+00:00",
        "tags": {},
    }
    payload = events.body(events.DEFERRED, datetime.now(UTC), data)
    assert not schema_errors(schema, json.loads(payload))
    headers = events.headers("msg_1", 1700000000, payload, [events.new_secret(), events.new_secret()])
    for parameter in hook["parameters"]:
        assert not schema_errors(parameter["schema"], headers[parameter["name"]]), parameter["name"]


def test_the_content_and_batch_limits_match_the_code():
    from shared.config import Settings
    from shared.tasks import content

    schemas, params = DOC["components"]["schemas"], DOC["components"]["parameters"]
    request = schemas["EnqueueRequest"]["properties"]
    assert set(content.NEW_FIELDS) <= set(request)
    assert request["cc"]["maxItems"] == request["bcc"]["maxItems"] == content.MAX_ADDRESSES
    assert request["headers"]["maxProperties"] == content.MAX_HEADERS
    assert request["headers"]["additionalProperties"]["maxLength"] == content.MAX_HEADER_VALUE
    assert request["attachments"]["maxItems"] == content.MAX_ATTACHMENTS
    assert request["from_name"]["maxLength"] == request["recipient_name"]["maxLength"] == content.MAX_NAME
    assert request["tags"]["maxProperties"] == content.MAX_TAGS
    assert request["tags"]["additionalProperties"]["maxLength"] == content.MAX_TAG_VALUE
    assert request["tags"]["propertyNames"]["pattern"] == content.TAG_KEY.pattern
    assert schemas["Attachment"]["properties"]["filename"]["maxLength"] == content.MAX_FILENAME
    assert params["Tag"]["schema"]["pattern"].startswith(content.TAG_KEY.pattern[:-1] + ":")
    defaults = Settings.from_env({})
    assert schemas["BatchRequest"]["properties"]["tasks"]["maxItems"] == defaults.max_batch
    assert params["Validation"]["schema"]["enum"] == list(batch.MODES)


def test_every_examples_entry_matches_its_schema():
    checked = 0
    for where, node in _walk(DOC):
        if re.search(r"/content/[^/]+$", where) and "examples" in node:
            for name, example in node["examples"].items():
                errors = schema_errors(node["schema"], example["value"])
                assert not errors, f"{where} {name}: the example does not match its schema: {errors}"
                checked += 1
    assert checked >= 2


def test_live_content_and_batch(api):
    register_user(api)
    headers = auth_header(login(api))
    examples = operation("POST", "/api/v1/task/enqueue")["requestBody"]["content"]["application/json"][
        "examples"
    ]
    rich = examples["rich"]["value"]
    created = check(
        api.post("/api/v1/task/enqueue", json=rich, headers=headers), "POST", "/api/v1/task/enqueue", 202
    )
    task = check(
        api.get(f"/api/v1/task/{created['task_id']}", headers=headers), "GET", "/api/v1/task/{id}", 200
    )
    assert task["tags"] == rich["tags"] and task["attachments"][0]["size"] == 70  # the PNG's bytes
    listed = check(
        api.get("/api/v1/task/queue?tag=campaign:reports", headers=headers), "GET", "/api/v1/task/queue", 200
    )
    assert [t["id"] for t in listed["items"]] == [created["task_id"]]
    check(api.get("/api/v1/task/queue?tag=nocolon", headers=headers), "GET", "/api/v1/task/queue", 422)
    check(
        api.get("/api/v1/task/queue/fail?tag=campaign:reports", headers=headers),
        "GET",
        "/api/v1/task/queue/fail",
        200,
    )
    bad = {**rich, "headers": {"From": "eve@example.org"}}
    assert (
        "headers.From"
        in check(
            api.post("/api/v1/task/enqueue", json=bad, headers=headers), "POST", "/api/v1/task/enqueue", 422
        )["errors"]
    )

    path = "/api/v1/task/enqueue/batch"
    example = operation("POST", path)["requestBody"]["content"]["application/json"]["example"]
    assert_request_valid("POST", path, example)
    stored = check(api.post(path, json=example, headers=headers), "POST", path, 202)
    assert [i["status"] for i in stored["items"]] == ["queued", "queued"]
    mixed = {"tasks": [*example["tasks"], {"recipient_email": "nobody", "subject": "x", "body": "x"}]}
    answer = check(api.post(path + "?validation=permissive", json=mixed, headers=headers), "POST", path, 202)
    assert list(answer["items"][2]) == ["errors"]
    problem = check(api.post(path, json=mixed, headers=headers), "POST", path, 422)
    assert list(problem["errors"]) == ["tasks[2].recipient_email"]
    check(api.post(path + "?validation=loose", json=example, headers=headers), "POST", path, 422)
    check(api.post(path, json=example), "POST", path, 401)
    check(api.post(path, data="{", content_type="application/json", headers=headers), "POST", path, 400)
    check(api.post(path, data="x", content_type="text/plain", headers=headers), "POST", path, 415)


def test_live_search_bulk_and_raw(api):
    register_user(api)
    headers = auth_header(login(api))
    mail = {"recipient_email": "grace@example.org", "subject": "Invoice 7", "body": "Hi Grace!"}
    task_id = api.post("/api/v1/task/enqueue", json=mail, headers=headers).get_json()["task_id"]
    queue = "/api/v1/task/queue"
    for query in (
        "status=all",
        "subject=invoice",
        f"id={task_id}",
        "message_id=x@example.com",
        "created_from=2026-01-01T00:00:00Z&created_to=2999-01-01T00:00:00Z",
    ):
        page = check(api.get(f"{queue}?{query}", headers=headers), "GET", queue, 200)
        assert [t["id"] for t in page["items"]] in ([task_id], []), query
    check(api.get(f"{queue}?created_from=soon", headers=headers), "GET", queue, 422)
    fail = "/api/v1/task/queue/fail"
    check(api.get(f"{fail}?subject=invoice", headers=headers), "GET", fail, 200)

    bulk = "/api/v1/task/bulk"
    body = {"action": "cancel", "subject": "invoice"}
    assert_request_valid("POST", bulk, body)
    keyed = {**headers, "Idempotency-Key": "cancel-invoices"}
    answer = check(api.post(bulk, json=body, headers=keyed), "POST", bulk, 200)
    assert answer["changed"] == 1
    check(api.post(bulk, json={"action": "retry", "status": "queued"}, headers=headers), "POST", bulk, 422)
    check(api.post(bulk, json=body), "POST", bulk, 401)
    check(api.post(bulk, data="{", content_type="application/json", headers=headers), "POST", bulk, 400)
    check(api.post(bulk, data="x", content_type="text/plain", headers=headers), "POST", bulk, 415)

    raw = "/api/v1/task/{id}/raw"
    text = check(api.get(f"/api/v1/task/{task_id}/raw", headers=headers), "GET", raw, 200)
    assert "Subject: Invoice 7\r\n" in text
    check(api.get("/api/v1/task/999999/raw", headers=headers), "GET", raw, 404)
    check(api.get(f"/api/v1/task/{task_id}/raw"), "GET", raw, 401)


def test_live_ops(api, monkeypatch):
    from functions import http

    check(api.get("/ops"), "GET", "/ops", 404)  # OPS_TOKEN unset: no operator view
    check(api.get("/ops/status"), "GET", "/ops/status", 404)
    monkeypatch.setenv("OPS_TOKEN", "operator-" + "o" * 40)
    http.reset_context()
    page = api.get("/ops")
    check(page, "GET", "/ops", 200)
    assert page.headers["Content-Security-Policy"] == web.CONTENT_SECURITY_POLICY
    check(api.get("/ops/status"), "GET", "/ops/status", 401)
    figures = check(
        api.get("/ops/status", headers=auth_header("operator-" + "o" * 40)), "GET", "/ops/status", 200
    )
    assert figures["finished"] == {"sent": 0, "cancelled": 0}
