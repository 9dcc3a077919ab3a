"""The dashboard function without a browser: its paths, its security headers, its files, and the API
reference it renders from shared/openapi.json. tests/test_browser.py drives the page in Chromium."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser

import pytest

from functions import apidoc, web
from shared import routes
from tests.conftest import ROOT
from tests.test_accounts_api import assert_problem

DASHBOARD_ROUTES = [r for r in routes.ROUTES if r.target == "dashboard"]
DOCUMENT = json.loads(web.OPENAPI_PATH.read_text(encoding="utf-8"))


def test_the_route_table_lists_exactly_the_files_the_function_serves():
    assert {r.path for r in DASHBOARD_ROUTES} == {*web.ASSETS, web.DOCS_PATH, web.DOCUMENT_PATH}
    files = {p.name for p in web.DASHBOARD_DIR.iterdir()}
    assert files == {name for name, _ in web.ASSETS.values()} | {web.OPS_PAGE}  # /ops: the ops function's
    # ... and the installed package (the cluster image) carries them.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(any(fnmatch(f, p) for p in patterns["functions.dashboard"]) for f in files)


def _policy(header: str) -> dict[str, list[str]]:
    directives = [d.split() for d in header.split(";") if d.strip()]
    return {d[0]: d[1:] for d in directives}


@pytest.mark.parametrize("route", DASHBOARD_ROUTES, ids=lambda r: r.path)
def test_every_answer_carries_a_strict_content_security_policy(api, route):
    response = api.get(route.path)
    assert response.status_code == 200
    assert response.mimetype == web.media_type(route.path)
    policy = _policy(response.headers["Content-Security-Policy"])
    if route.path in web.PREVIEW_POLICIES:  # the HTML preview's frame: its own policy (the test below)
        assert response.headers["Content-Security-Policy"] == web.PREVIEW_POLICIES[route.path]
        assert policy["script-src"] == ["'self'"] and policy["frame-ancestors"] == ["'self'"]
        assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert response.headers["Referrer-Policy"] == "no-referrer" and "Set-Cookie" not in response.headers
        return
    assert policy["default-src"] == ["'self'"]
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy[directive] == ["'self'"], directive  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["frame-ancestors"] == policy["object-src"] == policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    assert policy["require-trusted-types-for"] == ["'script'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "Set-Cookie" not in response.headers


class _Inline(HTMLParser):
    """Collects whatever a strict CSP would refuse: inline scripts and styles, handlers, js: URLs."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "style":
            self.found.append("<style>")
        if tag == "script":
            self._in_script = "src" not in attributes
            if attributes.get("src", "").startswith(("http:", "https:", "//")):
                self.found.append(f"foreign script {attributes['src']}")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"{tag} {name}=")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"{tag} {name}=javascript:")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.found.append("inline <script>")


@pytest.mark.parametrize("path", ["/", web.DOCS_PATH])
def test_the_pages_hold_no_inline_script_style_or_handler(api, path):
    parser = _Inline()
    parser.feed(api.get(path).get_data(as_text=True))
    assert parser.found == []


def test_the_operator_page_holds_no_inline_script_style_or_handler():
    parser = _Inline()
    parser.feed((web.DASHBOARD_DIR / web.OPS_PAGE).read_text())
    assert parser.found == []


def test_the_inline_check_sees_what_it_looks_for():
    parser = _Inline()
    parser.feed('<p style="x" onclick="y">a</p><script>1</script><a href="javascript:x">b</a><style></style>')
    assert len(parser.found) == 5


def test_the_script_never_turns_text_into_markup_and_keeps_the_token_out_of_cookies():
    names = [name for name, media in web.ASSETS.values() if media.startswith("text/javascript")]
    scripts = {name: (web.DASHBOARD_DIR / name).read_text() for name in names}
    forbidden = (
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|document\.cookie"
    )
    for name, source in scripts.items():
        assert not re.search(forbidden, source), name
        assert "localStorage" not in source, f"{name}: the token must not outlive the tab"
    assert 'credentials: "omit"' in scripts["app.js"]


def test_the_reference_renders_every_operation_and_schema_of_the_document(api):
    page = api.get(web.DOCS_PATH).get_data(as_text=True)
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            anchor = f'id="op-{op["operationId"]}"'
            assert anchor in page, f"{method.upper()} {path}"
            section = page[page.index(anchor) :].split("</section>", 1)[0]
            assert f"<code>{path}</code>" in section and method.upper() in section
            for code in op["responses"]:
                assert f">{code}</td>" in section, f"{method.upper()} {path} {code}"
    for name in DOCUMENT["components"]["schemas"]:
        assert f'id="schema-{name}"' in page
    assert "Rate limits" in page and "Pagination" in page  # the prose of the old docs/api.md


def test_markup_in_a_description_is_shown_as_text_never_run():
    document = {
        "openapi": "3.1.0",
        "info": {"title": "t<b>", "version": "1", "description": "<script>alert(1)</script> **bold**"},
        "paths": {
            "/x": {
                "get": {
                    "operationId": "x",
                    "summary": '<img src=x onerror="alert(1)">',
                    "responses": {"200": {"description": "[a](javascript:alert(1))"}},
                }
            }
        },
    }
    page = apidoc.render(json.dumps(document).encode())
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "<b>" not in page
    assert 'href="javascript:' not in page
    assert "<strong>bold</strong>" in page


def test_unknown_files_and_other_methods_get_problems(api):
    assert_problem(api.get("/ui/nope.js"), 404)
    assert_problem(api.get("/ui/"), 404)
    response = api.post("/")
    assert_problem(response, 405)
    assert response.headers["Allow"] == "GET"


def test_the_dashboard_function_answers_without_any_database(app_for, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql+pg8000://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    client = app_for("dashboard")
    assert client.get("/").status_code == 200
    assert client.get(web.DOCS_PATH).status_code == 200


class _Frames(HTMLParser):
    def __init__(self):
        super().__init__()
        self.frames: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "iframe":
            self.frames.append(dict(attrs))


def test_the_html_preview_frame_may_run_no_script_and_loads_nothing_remote_unless_asked():
    """The mail's HTML goes into preview.html's inner frame: ``sandbox`` with no permission (the
    browser test proves no script runs and nothing is fetched); the frame's policy (which the mail's
    about:srcdoc document inherits) allows no inline script anywhere and remote content only in the
    variant the user asks for."""
    parser = _Frames()
    parser.feed((web.DASHBOARD_DIR / "preview.html").read_text())
    (mail,) = [f for f in parser.frames if f.get("id") == "mail"]
    assert mail.get("sandbox") == ""  # present, and no allow-scripts / allow-same-origin / allow-*
    blocked = web.PREVIEW_POLICIES["/ui/preview.html"]
    remote = web.PREVIEW_POLICIES["/ui/preview-remote.html"]
    for policy in (blocked, remote):
        rules = dict(rule.split(" ", 1) for rule in policy.split("; "))
        assert rules["script-src"] == "'self'" and rules["default-src"] == "'none'"
        assert rules["connect-src"] == "'none'" and rules["form-action"] == "'none'"
        assert rules["frame-ancestors"] == "'self'"
    assert "http" not in blocked and "img-src data:;" in blocked + ";"
    assert "img-src data: http: https:" in remote
    # The dashboard itself keeps its own policy: nothing remote, no frame of it elsewhere.
    assert web.policy_for("/") == web.CONTENT_SECURITY_POLICY and "http" not in web.CONTENT_SECURITY_POLICY
