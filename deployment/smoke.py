"""`make smoke`: an end-to-end check of a live mailq cluster, printing each step.

    python deployment/smoke.py [--context mailq] [--namespace mailq] [--gateway http://HOST:PORT]

It starts an SMTP sink in the cluster (a pod running SINK below on the mailq image, and a Service),
registers a throwaway account sending to it, enqueues 20 mails through the gateway, and watches:
KEDA scaling the sender above zero, the 20 mails arriving at the sink exactly once (its log) and
turning `sent` (the API), then the sender scaling back to zero after the ScaledObject's cooldown.
The sink is removed at the end; the throwaway account stays (there is no API to delete one).

The sink speaks plaintext SMTP on a private address, so the cluster must allow both
(SMTP_ALLOW_PRIVATE_HOSTS=true, SMTP_ALLOW_INSECURE=true in deployment/base/config.env): a test
cluster's settings, never production's. The script checks and stops with that explanation otherwise.

Uses the `kubernetes` client (the `ops` extra), as `mailq status --cluster` does. Exit status 0 when
every step passed, 1 otherwise. It cannot run without a cluster; tests/test_smoke.py checks its
sink and its reading of the API objects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAILS = 20
SINK_NAME = "mailq-smoke-sink"
SINK_PORT = 2525
ARRIVED = "ARRIVED "  # the sink's log line for each message, followed by its Message-ID

# A minimal SMTP server (standard library only: the image has nothing else to offer): accepts every
# message and logs one ARRIVED line per message with its Message-ID.
SINK = r"""
import socketserver, sys

class Session(socketserver.StreamRequestHandler):
    def handle(self):
        def say(line):
            self.wfile.write(line.encode() + b"\r\n")
        say("220 mailq-smoke-sink ESMTP")
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line.decode("latin-1").strip().split(" ")[0].upper()
            if verb == "EHLO":
                say("250-mailq-smoke-sink")
                say("250 8BITMIME")
            elif verb == "DATA":
                say("354 go ahead")
                message_id = "?"
                while True:
                    data = self.rfile.readline(65536)
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    if data.lower().startswith(b"message-id:"):
                        message_id = data.split(b":", 1)[1].strip().decode("latin-1")
                print("ARRIVED " + message_id, flush=True)
                say("250 2.0.0 accepted")
            elif verb == "QUIT":
                say("221 bye")
                return
            elif verb in ("HELO", "MAIL", "RCPT", "RSET", "NOOP"):
                say("250 ok")
            else:
                say("502 5.5.2 not implemented")

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

Server(("0.0.0.0", int(sys.argv[1])), Session).serve_forever()
"""


def step(text: str) -> float:
    print(f"==> {text}", flush=True)
    return time.monotonic()


def done(started: float, text: str = "ok") -> None:
    print(f"    {text} ({time.monotonic() - started:.1f} s)", flush=True)


class Failed(Exception):
    pass


def wait(what: str, check, timeout: float, every: float = 2.0):
    """Poll ``check`` until it returns something truthy; Failed after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")


# --- reading API objects (plain dicts) -------------------------------------------------------------------


def arrivals(log: str) -> dict[str, int]:
    """Message-ID -> how many times the sink received it."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if line.startswith(ARRIVED):
            message_id = line[len(ARRIVED) :].strip()
            counts[message_id] = counts.get(message_id, 0) + 1
    return counts


def replicas(deployment: dict) -> int:
    """Pods of a Deployment that exist now (what KEDA scaled it to, as far as they started)."""
    return (deployment.get("status") or {}).get("replicas") or 0


def gateway_url(service: dict, nodes: list[dict]) -> str | None:
    """http://<a node's InternalIP>:<nodePort> of the gateway Service, when it is a NodePort."""
    ports = [p for p in (service.get("spec") or {}).get("ports") or [] if p.get("nodePort")]
    for node in nodes:
        for address in (node.get("status") or {}).get("addresses") or []:
            if address.get("type") == "InternalIP" and ports:
                return f"http://{address['address']}:{ports[0]['nodePort']}"
    return None


def insecure_settings(config: dict) -> list[str]:
    """The settings a plaintext sink on a private address needs that the ConfigMap does not grant."""
    data = config.get("data") or {}
    return [
        name
        for name in ("SMTP_ALLOW_PRIVATE_HOSTS", "SMTP_ALLOW_INSECURE")
        if data.get(name, "false").strip().lower() not in ("1", "true", "yes", "on")
    ]


# --- talking to the cluster and the API ----------------------------------------------------------------


def call(base: str, method: str, path: str, body=None, token: str | None = None):
    request = urllib.request.Request(base + path, method=method)  # noqa: S310 - the operator's gateway
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, data, timeout=30) as response:  # noqa: S310 - the operator's gateway
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def sink_objects(namespace: str, image: str) -> tuple[dict, dict]:
    labels = {"app.kubernetes.io/name": "mailq", "app.kubernetes.io/component": SINK_NAME}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": SINK_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "sink",
                    "image": image,
                    "command": ["python", "-u", "-c", SINK, str(SINK_PORT)],
                    "ports": [{"name": "smtp", "containerPort": SINK_PORT}],
                    "readinessProbe": {"tcpSocket": {"port": SINK_PORT}, "periodSeconds": 2},
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SINK_NAME, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "smtp", "port": SINK_PORT, "targetPort": SINK_PORT}]},
    }
    return pod, service


def smoke(context: str | None, namespace: str, gateway: str | None) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from functions.cluster import connect

    api_client, name = connect(context)
    core, apps, custom = (
        client.CoreV1Api(api_client),
        client.AppsV1Api(api_client),
        client.CustomObjectsApi(api_client),
    )

    def plain(obj):
        return api_client.sanitize_for_serialization(obj)

    started = step(f"cluster: context {name}, namespace {namespace}")
    config = next(
        plain(c)
        for c in core.list_namespaced_config_map(namespace).items
        if c.metadata.name.startswith("mailq-config")
    )
    missing = insecure_settings(config)
    if missing:
        raise Failed(
            f"{', '.join(missing)} must be true for the in-cluster plaintext sink (a test cluster only): "
            "set them in deployment/base/config.env and `make apply`"
        )
    sender = plain(apps.read_namespaced_deployment("mailq-sender", namespace))
    scaled = custom.get_namespaced_custom_object(
        "keda.sh", "v1alpha1", namespace, "scaledobjects", "mailq-sender"
    )
    cooldown = (scaled.get("spec") or {}).get("cooldownPeriod", 300)
    image = sender["spec"]["template"]["spec"]["containers"][0]["image"]
    if gateway is None:
        service = plain(core.read_namespaced_service("mailq-gateway", namespace))
        gateway = gateway_url(service, [plain(n) for n in core.list_node().items])
        if gateway is None:
            raise Failed("the gateway Service has no NodePort: pass --gateway http://HOST:PORT")
    done(started, f"gateway {gateway}, senders now {replicas(sender)}, KEDA cooldown {cooldown} s")

    started = step(f"starting the SMTP sink {SINK_NAME} ({image})")
    pod, service = sink_objects(namespace, image)
    for kind, create, delete in (
        ("pod", core.create_namespaced_pod, core.delete_namespaced_pod),
        ("service", core.create_namespaced_service, core.delete_namespaced_service),
    ):
        try:
            delete(SINK_NAME, namespace)
            time.sleep(2)
        except ApiException:
            pass
        create(namespace, pod if kind == "pod" else service)
    try:

        def sink_ready():
            status = plain(core.read_namespaced_pod(SINK_NAME, namespace)).get("status") or {}
            return any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
            )

        wait("the sink to be Ready", sink_ready, 180)
        done(started)

        started = step("registering a throwaway account that sends to the sink")
        email = f"smoke-{uuid.uuid4().hex[:12]}@example.com"
        password = uuid.uuid4().hex
        status, user = call(
            gateway,
            "POST",
            "/api/v1/register",
            {
                "email": email,
                "password": password,
                "smtp_host": f"{SINK_NAME}.{namespace}.svc.cluster.local",
                "smtp_port": SINK_PORT,
                "smtp-username": "smoke",
                "smtp-password": "smoke",
                "smtp_security": "none",
            },
        )
        if status != 201:
            raise Failed(f"register answered {status}: {user}")
        status, session = call(gateway, "POST", "/api/v1/login", {"email": email, "password": password})
        if status != 200:
            raise Failed(f"login answered {status}: {session}")
        token = session["token"]
        done(started, f"user {user['id']} ({email})")

        started = step(f"enqueueing {MAILS} mails")
        ids = []
        for i in range(MAILS):
            mail = {
                "recipient_email": f"r{i}@example.org",
                "subject": f"smoke {i}",
                "body": f"smoke test {i}\n",
            }
            status, result = call(gateway, "POST", "/api/v1/task/enqueue", mail, token)
            if status != 202:
                raise Failed(f"enqueue {i} answered {status}: {result}")
            ids.append(result["task_id"])
        done(started, f"tasks {ids[0]}..{ids[-1]}")

        started = step("waiting for KEDA to scale the sender above zero")
        seen = wait(
            "a sender pod",
            lambda: replicas(plain(apps.read_namespaced_deployment("mailq-sender", namespace))),
            180,
        )
        done(started, f"{seen} sender(s)")

        started = step(f"waiting for the {MAILS} mails at the sink and `sent` in the API")

        def all_arrived():
            counts = arrivals(core.read_namespaced_pod_log(SINK_NAME, namespace))
            return counts if len(counts) >= MAILS else None

        counts = wait(f"{MAILS} mails at the sink", all_arrived, 300)
        twice = {m: n for m, n in counts.items() if n > 1}
        if twice:
            raise Failed(f"mails arrived more than once: {twice}")
        status, page = call(gateway, "GET", "/api/v1/task/queue?status=sent&limit=100", token=token)
        sent = {t["id"] for t in (page or {}).get("items", [])}
        if status != 200 or set(ids) - sent:
            raise Failed(f"not sent per the API: {sorted(set(ids) - sent)} (answer {status})")
        done(started, f"{len(counts)} distinct Message-IDs, each once; all {MAILS} tasks sent")

        started = step(f"waiting for KEDA to scale the sender back to zero (cooldown {cooldown} s)")
        wait(
            "the sender at zero",
            lambda: replicas(plain(apps.read_namespaced_deployment("mailq-sender", namespace))) == 0,
            cooldown + 300,
            every=5,
        )
        done(started)
    finally:
        started = step(f"removing {SINK_NAME}")
        for delete in (core.delete_namespaced_pod, core.delete_namespaced_service):
            try:
                delete(SINK_NAME, namespace)
            except ApiException as exc:
                print(f"    could not remove it: {exc.reason}")
        done(started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", default=None, help="kubeconfig context [default: the current one]")
    parser.add_argument("--namespace", default="mailq")
    parser.add_argument(
        "--gateway", default=None, help="the gateway's URL [default: a node's address and NodePort]"
    )
    args = parser.parse_args(argv)
    try:
        smoke(args.context, args.namespace, args.gateway)
    except Failed as exc:
        print(f"SMOKE FAILED: {exc}", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
