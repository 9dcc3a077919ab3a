"""The operator's view at ``/ops``: what ``mailq status`` shows of the queues and the workers, read-only,
behind OPS_TOKEN.

Not a tenant's API: the token is the operator's, set in the deployment's Secret, compared in constant
time and never logged (the request log line holds the method and path only). Without OPS_TOKEN the
routes do not exist (404), so a deployment that does not want the page does not have it. The figures
are the metrics function's (shared.observe.gauges): fixed words and totals, no user, address or host.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Any

from shared.config import Settings
from shared.context import Context
from shared.errors import NotFound, Unauthorized
from shared.observe import gauges


def require_enabled(settings: Settings, path: str) -> None:
    """404, in the words of an unknown path, unless OPS_TOKEN is set."""
    if not settings.ops_token:
        raise NotFound(f"No route for GET {path}.")


def authorize(settings: Settings, authorization: str | None) -> None:
    """The request carries ``Authorization: Bearer <OPS_TOKEN>``, else 401 (404 without OPS_TOKEN)."""
    require_enabled(settings, "/ops/status")
    scheme, _, token = (authorization or "").strip().partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, settings.ops_token.encode()):
        raise Unauthorized("The operator token (OPS_TOKEN) is missing or wrong.")


def figures(ctx: Context) -> dict[str, Any]:
    """The queue figures now, as ``mailq status --json`` prints them."""
    read = gauges.read(ctx.settings, ctx.engine, ctx.redis)
    return {**asdict(read), "finished_cap": gauges.FINISHED_CAP}
