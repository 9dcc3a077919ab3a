"""What the dashboard function sends a browser: the page's files, the API reference, the OpenAPI document.

The files live in ``functions/dashboard/`` (no build step) and are read once per process, on first
use. Every answer carries a strict Content-Security-Policy: scripts, styles, images and requests
from this origin only, nothing inline, no framing. The page itself is a client of the public API
and has no other access to anything.
"""

from __future__ import annotations

import threading
from pathlib import Path

import flask

import shared

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
OPENAPI_PATH = Path(shared.__file__).with_name("openapi.json")  # package data, in the image too

# path -> (file in DASHBOARD_DIR, Content-Type). The route table lists the same paths (a test says so).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/chart.js": ("chart.js", "text/javascript; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
    "/ui/ops.js": ("ops.js", "text/javascript; charset=utf-8"),
    "/ui/message.js": ("message.js", "text/javascript; charset=utf-8"),
    "/ui/webhooks.js": ("webhooks.js", "text/javascript; charset=utf-8"),
    "/ui/attempts.js": ("attempts.js", "text/javascript; charset=utf-8"),
    "/ui/account.js": ("account.js", "text/javascript; charset=utf-8"),
    # The HTML preview's frame (one file, two policies: remote content blocked, or allowed on request).
    "/ui/preview.html": ("preview.html", "text/html; charset=utf-8"),
    "/ui/preview-remote.html": ("preview.html", "text/html; charset=utf-8"),
    "/ui/preview.js": ("preview.js", "text/javascript; charset=utf-8"),
}
OPS_PAGE = "ops.html"  # served by the ops function at /ops, only where OPS_TOKEN is set
DOCS_PATH = "/docs"
DOCUMENT_PATH = "/openapi.json"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'none'",
        "object-src 'none'",
        "base-uri 'none'",
        # The login form is sent by script; without it, the browser must not submit the password anywhere.
        "form-action 'none'",
        "frame-ancestors 'none'",
        # No string ever becomes markup or code (no innerHTML, no eval): Chromium enforces it.
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)

# The frame that shows a mail's HTML part (functions/dashboard/preview.html). The mail itself is in a
# frame inside it, ``<iframe sandbox srcdoc>``: no scripts, no forms, no popups, an opaque origin; an
# about:srcdoc document inherits this policy, so it is the mail's too. Its inline styles are allowed
# (mail is styled inline); nothing is fetched from anywhere but ``data:`` images unless the user asks
# for remote content (``/ui/preview-remote.html``: images, styles and fonts over http(s), still no
# script, no connection, no form). Only the dashboard may frame it.
_PREVIEW_COMMON = (
    "script-src 'self'",
    "connect-src 'none'",
    "object-src 'none'",
    "media-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'self'",
)
PREVIEW_POLICIES = {
    "/ui/preview.html": "; ".join(
        (
            "default-src 'none'",
            "style-src 'self' 'unsafe-inline'",
            "img-src data:",
            "font-src 'none'",
            *_PREVIEW_COMMON,
        )
    ),
    "/ui/preview-remote.html": "; ".join(
        (
            "default-src 'none'",
            "style-src 'self' 'unsafe-inline' http: https:",
            "img-src data: http: https:",
            "font-src data: http: https:",
            *_PREVIEW_COMMON,
        )
    ),
}


def policy_for(path: str) -> str:
    """The Content-Security-Policy the dashboard function answers ``path`` with."""
    return PREVIEW_POLICIES.get(path, CONTENT_SECURITY_POLICY)


SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Small files, always revalidated: a new deployment is seen on the next load.
    "Cache-Control": "no-cache",
}


def media_type(path: str) -> str:
    """The media type (without parameters) the dashboard function answers ``path`` with."""
    if path == DOCS_PATH:
        return "text/html"
    if path == DOCUMENT_PATH:
        return "application/json"
    return ASSETS[path][1].split(";")[0]


_cache: dict[str, tuple[bytes, str]] = {}
_cache_lock = threading.Lock()


def _load(path: str) -> tuple[bytes, str]:
    if path == DOCS_PATH:
        from functions import apidoc

        return apidoc.render(OPENAPI_PATH.read_bytes()).encode("utf-8"), "text/html; charset=utf-8"
    if path == DOCUMENT_PATH:
        return OPENAPI_PATH.read_bytes(), "application/json"
    name, content_type = ASSETS[path]
    return (DASHBOARD_DIR / name).read_bytes(), content_type


def ops_page() -> flask.Response:
    """The operator's page (functions/dashboard/ops.html), with the dashboard's security headers."""
    with _cache_lock:
        if OPS_PAGE not in _cache:
            _cache[OPS_PAGE] = ((DASHBOARD_DIR / OPS_PAGE).read_bytes(), "text/html; charset=utf-8")
        body, content_type = _cache[OPS_PAGE]
    response = flask.Response(body, status=200, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    return response


def answer(path: str) -> flask.Response:
    """The file (or rendered page) for one of the dashboard function's paths."""
    with _cache_lock:
        if path not in _cache:
            _cache[path] = _load(path)
        body, content_type = _cache[path]
    response = flask.Response(body, status=200, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    if path in PREVIEW_POLICIES:
        response.headers["Content-Security-Policy"] = PREVIEW_POLICIES[path]
        response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response
