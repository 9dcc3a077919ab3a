"""Generate, from the route table, the path gateway's nginx config and one Knative Service per target.

    python deployment/gen_gateway.py          # rewrite knative/nginx.conf and knative/functions.yaml
    python deployment/gen_gateway.py --check  # exit 1 if either file is stale

Both outputs are committed; tests/test_manifests.py regenerates them and fails when they differ, so a
change to shared/routes.py cannot reach the cluster without this script having run (``make manifests``).

Knative routes by Host only, so the gateway maps each path of ``shared.routes.ROUTES`` to its
function's Knative Service and answers everything else itself with a JSON problem (RFC 9457).
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.config import Settings  # noqa: E402
from shared.routes import ROUTES, TARGETS, Route  # noqa: E402
from shared.tasks import batch  # noqa: E402
from shared.tasks.enqueue import request_limit  # noqa: E402

NGINX_CONF = ROOT / "knative" / "nginx.conf"
FUNCTIONS_YAML = ROOT / "knative" / "functions.yaml"
CONFIG_ENV = ROOT / "deployment" / "base" / "config.env"

NAMESPACE = "mailq"  # must equal the overlay's namespace; a manifest test compares them
IMAGE = "dev.local/mailq:dev"  # the overlay sets the real tag; dev.local skips Knative's tag resolution
# Knative Services are reached inside the cluster through Kourier's internal gateway, by Host header.
KOURIER_INTERNAL = "kourier-internal.kourier-system.svc.cluster.local:80"
GATEWAY_READ_TIMEOUT = 90  # seconds; longer than any function's timeoutSeconds plus a cold start
HOST_VARIABLE = "$mailq_function_host"


@dataclass(frozen=True)
class Profile:
    """How one kind of function is served and scaled (THREADS * WORKERS == containerConcurrency)."""

    workers: int
    threads: int
    max_scale: int
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_seconds: int = 30

    @property
    def concurrency(self) -> int:
        return self.workers * self.threads


# max_scale is bounded twice: by what one minikube node can schedule (a pod the node cannot hold
# stays Pending and only holds a place in PostgreSQL's connection budget), and by that budget
# itself: every pod may open its SQLAlchemy pool, THREADS connections (functions/http.py), and
# deployment/base/postgres.yaml's max_connections is sized for all of them at once
# (tests/test_cluster_sizing.py recomputes it from the rendered manifests).
PROFILES = {
    # Database/Redis round trips: threads wait on I/O, so one process serves eight requests at once;
    # a small CPU request (it bursts to its limit), so one pod of every function fits on the node.
    "io": Profile(1, 8, 3, "50m", "1", "192Mi", "512Mi"),
    # bcrypt at cost 12 keeps a core busy for ~250 ms per request: two at a time per pod, more pods.
    # The request is a quarter core (logins come in bursts and burst to the limit), so the idle pod
    # of each of the many functions still fits the node.
    "bcrypt": Profile(1, 2, 5, "250m", "1", "192Mi", "512Mi"),
    # Health endpoints: cheap; one pod answers far more probes than anyone sends.
    "health": Profile(1, 4, 1, "50m", "500m", "128Mi", "384Mi"),
    # The dashboard's files from memory: no database, a few people looking at once.
    "static": Profile(1, 8, 2, "50m", "500m", "128Mi", "384Mi"),
    # The queue gauges: a scrape every 15-30 s and an operator's `mailq status`, milliseconds each.
    # One pod of two threads (two PostgreSQL connections) however often it is asked.
    "scrape": Profile(1, 2, 1, "50m", "500m", "128Mi", "384Mi"),
    # Managing webhook endpoints: a few requests a day per user, each a round trip or two; small pods,
    # so six of them cost the node and PostgreSQL's connection budget little. Test connection too: a
    # thread waits on a user's SMTP server (at most 20 s, shared/delivery/check.py), rarely and rate-limited.
    "light": Profile(1, 4, 2, "25m", "500m", "128Mi", "384Mi"),
    # Batch enqueue: a request may be MAX_BATCH_BYTES (32 MiB) of JSON, parsed, checked and bound for
    # one INSERT, which holds a few times that at its peak: two at a time per pod, with room for both.
    "bulk": Profile(1, 2, 3, "50m", "1", "192Mi", "768Mi"),
}
TARGET_PROFILE = {
    "register": "bcrypt",
    "login": "bcrypt",
    "live": "health",
    "ping": "health",
    "dashboard": "static",
    "metrics": "scrape",
    "create_webhook": "light",
    "list_webhooks": "light",
    "delete_webhook": "light",
    "rotate_webhook_secret": "light",
    "list_webhook_deliveries": "light",
    "replay_webhook_delivery": "light",
    "enqueue_batch": "bulk",
    "smtp_check": "light",
}
# Request body limits of their own, per target: the gateway's location for the target's paths says so
# (client_max_body_size), and the function refuses the same size itself (functions/main.py).
TARGET_BODY_LIMIT = {"enqueue_batch": batch.request_limit}


SIZE_SETTINGS = ("MAX_BODY_BYTES", "MAX_ATTACHMENT_BYTES", "MAX_BATCH_BYTES")


def cluster_settings() -> Settings:
    """The size limits config.env gives the cluster (the rest of Settings at its defaults)."""
    values = {}
    for line in CONFIG_ENV.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#") and key in SIZE_SETTINGS:
            values[key] = value
    return Settings.from_env(values)


def body_limit(target: str | None = None) -> int:
    """The gateway's client_max_body_size for a target's paths (the server's default without one): the
    app's own request limit (shared.tasks.enqueue.request_limit, or the target's in TARGET_BODY_LIMIT)
    for the settings the cluster runs with, so nginx never refuses what the function accepts and the
    function answers every 413 itself, in its own words."""
    limit = TARGET_BODY_LIMIT.get(target, request_limit)
    return limit(types.SimpleNamespace(settings=cluster_settings()))


def profile_for(target: str) -> Profile:
    return PROFILES[TARGET_PROFILE.get(target, "io")]


def service_name(target: str) -> str:
    """The Knative Service serving one function target."""
    return "mailq-fn-" + target.replace("_", "-")


def service_host(target: str, namespace: str = NAMESPACE) -> str:
    """The cluster-local host Kourier routes to the target's Knative Service."""
    return f"{service_name(target)}.{namespace}.svc.cluster.local"


def location_for(route: Route) -> str:
    """The nginx location matching exactly the paths the route table matches for this route."""
    if "{" not in route.path:
        return f"location = {route.path}"
    # The route's own regex, with named groups made non-capturing: the gateway and the route table
    # cannot disagree about what an {id} is. Quoted because of the {m,n} quantifier.
    regex = re.sub(r"\(\?P<\w+>", "(?:", route.pattern.pattern)
    return f'location ~ "{regex}"'


def allowed_methods(routes: list[Route]) -> list[str]:
    methods = list(dict.fromkeys(r.method for r in routes))
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")  # shared.routes.match answers HEAD wherever GET is routed
    return methods


def problem(status: int, title: str, detail: str) -> str:
    # Single-quoted nginx string: the JSON itself contains no single quotes or backslashes.
    body = f'{{"type":"about:blank","title":"{title}","status":{status},"detail":"{detail}"}}'
    assert "'" not in body and "\\" not in body
    return f"'{body}'"


def _routes_by_path() -> dict[str, list[Route]]:
    by_path: dict[str, list[Route]] = {}
    for route in ROUTES:
        by_path.setdefault(route.path, []).append(route)
    return by_path


def method_targets(routes: list[Route]) -> list[tuple[str, str]]:
    """(method, target) for one path, HEAD going where GET goes (as shared.routes.match does)."""
    pairs = [(r.method, r.target) for r in routes]
    get = next((t for m, t in pairs if m == "GET"), None)
    if get is not None and all(m != "HEAD" for m, _ in pairs):
        pairs.append(("HEAD", get))
    return pairs


GENERATED = (
    "# GENERATED by deployment/gen_gateway.py from shared/routes.py -- do not edit; run `make manifests`."
)


def render_nginx(namespace: str = NAMESPACE) -> str:
    out = [
        GENERATED,
        "#",
        "# The path gateway: each API path goes to its function's Knative Service through Kourier's",
        "# cluster-local gateway (Knative routes by Host only); every other path gets a JSON 404 from",
        "# nginx itself. Runs as the non-root nginx-unprivileged image with a read-only root filesystem.",
        "worker_processes 2;",
        "pid /tmp/nginx.pid;",
        "error_log /dev/stderr warn;",
        "",
        "events {",
        "    worker_connections 1024;",
        "}",
        "",
        "http {",
        "    log_format gateway '$remote_addr \"$request\" $status $body_bytes_sent $request_time '",
        "                       '\"$upstream_status\" $upstream_response_time $request_id';",
        "    access_log /dev/stdout gateway;",
        "    server_tokens off;",
        "    client_body_temp_path /tmp/nginx-client-body;",
        "    proxy_temp_path /tmp/nginx-proxy;",
        "    fastcgi_temp_path /tmp/nginx-fastcgi;",
        "    uwsgi_temp_path /tmp/nginx-uwsgi;",
        "    scgi_temp_path /tmp/nginx-scgi;",
        "    keepalive_timeout 65s;",
        "",
        "    upstream kourier_internal {",
        f"        server {KOURIER_INTERNAL};",
        "        keepalive 32;",
        "    }",
        "",
        "    # Probes only; the Service does not expose this port.",
        "    server {",
        "        listen 8081;",
        "        location = /nginx-health {",
        "            access_log off;",
        "            default_type text/plain;",
        '            return 200 "ok\\n";',
        "        }",
        "    }",
        "",
        "    server {",
        "        listen 8080 default_server;",
        "        server_name _;",
        "        default_type application/problem+json;",
        "        # shared.tasks.enqueue.request_limit for config.env's MAX_BODY_BYTES and",
        "        # MAX_ATTACHMENT_BYTES (a full-size body sent as \\uXXXX escapes is six times its",
        "        # size, attachments are base64): beyond it nginx answers 413, below it the function",
        "        # does, in its own words. A location whose function has a limit of its own says so.",
        f"        client_max_body_size {body_limit()};",
        "",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        f"        proxy_set_header Host {HOST_VARIABLE};",
        "        # Replace, never append: whatever X-Forwarded-For a client sends is dropped here, so the",
        "        # first entry the function sees is always the address nginx saw. Kourier's envoy does not",
        "        # append (net-kourier's use-remote-address defaults to false); Knative's activator (always",
        "        # in the path: target-burst-capacity -1) and queue-proxy each append their peer, so the",
        '        # function receives "client, kourier, activator" -- hence TRUSTED_PROXY_HOPS=3.',
        "        proxy_set_header X-Forwarded-For $remote_addr;",
        "        proxy_set_header X-Real-IP $remote_addr;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
        "        proxy_set_header X-Request-ID $request_id;",
        "        proxy_connect_timeout 5s;",
        "        proxy_send_timeout 60s;",
        f"        proxy_read_timeout {GATEWAY_READ_TIMEOUT}s;",
        "        # nginx's default, bounded: a request that failed to connect, or found its pooled keepalive",
        "        # connection already closed by Kourier, goes out again on a fresh connection instead of",
        "        # becoming a 502. nginx never resends a POST or PATCH it has already sent (that needs",
        "        # `non_idempotent`, deliberately absent), so an enqueue still reaches a function at most",
        "        # once; and no retry after a read timeout, which starts past the 10 s below.",
        "        proxy_next_upstream error timeout;",
        "        proxy_next_upstream_tries 3;",
        "        proxy_next_upstream_timeout 10s;",
        "",
        "        error_page 413 @too_large;",
        "        error_page 502 503 @unreachable;",
        "        error_page 504 @timeout;",
    ]
    for path, routes in _routes_by_path().items():
        target = routes[0].target
        methods = allowed_methods(routes)
        not_allowed = problem(405, "Method Not Allowed", f"Allowed: {', '.join(methods)}.")
        pairs = method_targets(routes)
        out += [
            "",
            f"        # {', '.join(f'{m} -> {t}' for m, t in pairs)}: {path}",
            f"        {location_for(routes[0])} {{",
            f"            set {HOST_VARIABLE} {service_host(target, namespace)};",
        ]
        if target in TARGET_BODY_LIMIT:
            out.append(f"            client_max_body_size {body_limit(target)};")
        out += [
            f"            if ($request_method !~ ^(?:{'|'.join(methods)})$) {{",
            f'                add_header Allow "{", ".join(methods)}" always;',
            f"                return 405 {not_allowed};",
            "            }",
        ]
        # One path served by several functions: the method picks the function ("set" inside "if"
        # is one of the few things nginx does safely there).
        for method, other in pairs:
            if other != target:
                out += [
                    f"            if ($request_method = {method}) {{",
                    f"                set {HOST_VARIABLE} {service_host(other, namespace)};",
                    "            }",
                ]
        out += [
            "            proxy_pass http://kourier_internal;",
            "        }",
        ]
    out += [
        "",
        "        # Anything the route table does not know.",
        "        location / {",
        f"            return 404 {problem(404, 'Not Found', 'No such endpoint.')};",
        "        }",
        "",
        "        location @too_large {",
        f"            return 413 {problem(413, 'Content Too Large', 'The request body is too large.')};",
        "        }",
        "",
        "        location @unreachable {",
        f"            return 502 {problem(502, 'Bad Gateway', 'The function could not be reached.')};",
        "        }",
        "",
        "        location @timeout {",
        f"            return 504 {problem(504, 'Gateway Timeout', 'The function did not answer in time.')};",
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(out)


def render_service(target: str, namespace: str = NAMESPACE) -> str:
    p = profile_for(target)
    return f"""\
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {service_name(target)}
  namespace: {namespace}
  labels:
    app.kubernetes.io/name: mailq
    app.kubernetes.io/component: function
    mailq.dev/function: {target}
    mailq.dev/stage: app
    # Reachable only inside the cluster (through the gateway), never on Kourier's external gateway.
    networking.knative.dev/visibility: cluster-local
spec:
  template:
    metadata:
      labels:
        app.kubernetes.io/name: mailq
        app.kubernetes.io/component: function
        mailq.dev/function: {target}
      annotations:
        autoscaling.knative.dev/class: kpa.autoscaling.knative.dev
        autoscaling.knative.dev/metric: concurrency
        autoscaling.knative.dev/min-scale: "0"
        autoscaling.knative.dev/max-scale: "{p.max_scale}"
        # Aim for 70 % of the threads busy, so a burst finds a free thread while a new pod starts.
        autoscaling.knative.dev/target: "{p.concurrency}"
        autoscaling.knative.dev/target-utilization-percentage: "70"
        # Keep the activator in the path at every scale: it load-balances by free slots, and it
        # makes the X-Forwarded-For chain the same length at 0 and at N pods (TRUSTED_PROXY_HOPS).
        autoscaling.knative.dev/target-burst-capacity: "-1"
    spec:
      containerConcurrency: {p.concurrency}
      timeoutSeconds: {p.timeout_seconds}
      containers:
        - name: function
          image: {IMAGE}
          command: ["functions-framework", "--source", "functions/main.py", "--target", "$(FUNCTION_TARGET)"]
          ports:
            - name: http1
              containerPort: 8080
          envFrom:
            - configMapRef:
                name: mailq-config
          env:
            - name: FUNCTION_TARGET
              value: {target}
            # functions-framework would derive THREADS from the node's CPU count; pin both.
            - name: WORKERS
              value: "{p.workers}"
            - name: THREADS
              value: "{p.threads}"
            - name: DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: mailq-secrets
                  key: DATABASE_URL
            - name: REDIS_URL
              valueFrom:
                secretKeyRef:
                  name: mailq-secrets
                  key: REDIS_URL
            - name: JWT_SECRET
              valueFrom:
                secretKeyRef:
                  name: mailq-secrets
                  key: JWT_SECRET
            - name: MAILQ_ENCRYPTION_KEYS
              valueFrom:
                secretKeyRef:
                  name: mailq-secrets
                  key: MAILQ_ENCRYPTION_KEYS
          # Every function answers /healthz/live whatever its target. Neither probe touches
          # PostgreSQL or Redis: a database outage must not restart or hide every function
          # (GET /healthz/ping reports it instead).
          readinessProbe:
            httpGet:
              path: /healthz/live
          livenessProbe:
            httpGet:
              path: /healthz/live
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 3
          resources:
            requests:
              cpu: {p.cpu_request}
              memory: {p.memory_request}
            limits:
              cpu: "{p.cpu_limit}"
              memory: {p.memory_limit}
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            capabilities:
              drop: ["ALL"]
            seccompProfile:
              type: RuntimeDefault
"""


def render_functions(namespace: str = NAMESPACE) -> str:
    head = (
        GENERATED + "\n"
        "# One Knative Service per function target; deployment/gen_gateway.py's PROFILES say why each\n"
        "# is sized and scaled as it is.\n"
    )
    return head + "".join(render_service(t, namespace) for t in TARGETS)


def outputs() -> dict[Path, str]:
    return {NGINX_CONF: render_nginx(), FUNCTIONS_YAML: render_functions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are current")
    args = parser.parse_args(argv)
    stale = [path for path, text in outputs().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `make manifests`)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
