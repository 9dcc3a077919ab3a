"""Sizing the cluster from the manifests: PostgreSQL's connection budget, what one minikube node must
hold after `make apply`, and the workers' probes and grace periods against the settings they serve.

Every figure is recomputed from the rendered overlay and config.env, so an edit that raises a
max-scale, a thread count, a replica count or a request fails here before it fails on a cluster.
Figures of components we do not ship (control plane, Knative, Kourier, KEDA) are constants below,
each with its source.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time

import pytest

from shared import db
from tests.test_make_targets import _recipes, _stages
from tests.test_manifests import (
    K8S_MK,
    MAILQ_IMAGE,
    ROOT,
    Rendered,
    _containers,
    _env,
    _make_var,
    _pod_spec,
    _worker_role,
    render_overlay,
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    return render_overlay(tmp_path_factory.mktemp("render"))


# --- PostgreSQL's connection budget -----------------------------------------------------------------

# Connections one worker process can hold, by role. The sender's pool is 5 plus an overflow of 5
# (the new send path, ../notes/DESIGN-send-path.md); the consumer's is one per thread plus two, with an
# equal overflow (functions/cli.py). The sweep is one thread that uses one connection at a time; 2
# leaves room for one nested use.
WORKER_CONNECTIONS = {
    "sender": lambda config: 5 + 5,
    "consumer": lambda config: 2 * (int(config["QUEUE_CONSUMER_COUNT"]) + 2),
    "sweep": lambda config: 2,
    # functions/cli.py: WEBHOOK_POOL 5 and as many again as overflow, like the sender's.
    "webhooks": lambda config: 5 + 5,
}
MIGRATION_CONNECTIONS = 1  # shared/migrations/env.py: NullPool, one connection under the advisory lock
# KEDA's postgresql scaler opens its own connection; the ScaledJob loop and a metrics read can overlap.
KEDA_CONNECTIONS_PER_TRIGGER = 2
SUPERUSER_RESERVED = 3  # PostgreSQL's superuser_reserved_connections default: an operator's psql


def function_connections(threads: int, monkeypatch) -> int:
    """Pool plus overflow of one function pod, as functions/http.py and shared/db.py size them."""
    from functions import http

    monkeypatch.setenv("THREADS", str(threads))
    engine = db.make_engine("postgresql+pg8000://mailq:x@mailq-postgres:5432/mailq", **http.pool_sizing())
    try:
        return engine.pool.size() + engine.pool._max_overflow
    finally:
        engine.dispose()


def worst_case_connections(rendered: Rendered, monkeypatch) -> dict[str, int]:
    config = rendered.config
    budget: dict[str, int] = {}
    for ksvc in rendered.knative_services():
        template = ksvc["spec"]["template"]
        max_scale = int(template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"])
        (container,) = template["spec"]["containers"]
        threads = int(_env(container)["THREADS"]["value"])
        budget[ksvc["metadata"]["name"]] = max_scale * function_connections(threads, monkeypatch)
    scaled = {
        so["spec"]["scaleTargetRef"]["name"]: so["spec"]["maxReplicaCount"]
        for so in rendered.of_kind("ScaledObject")
    }
    for deployment in rendered.of_kind("Deployment"):
        if not deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith(MAILQ_IMAGE + ":"):
            continue
        name = deployment["metadata"]["name"]
        replicas = scaled.get(name, deployment["spec"].get("replicas", 1))
        budget[name] = replicas * WORKER_CONNECTIONS[_worker_role(deployment)](config)
    for job in rendered.of_kind("ScaledJob"):
        (container,) = _containers(job)
        budget[job["metadata"]["name"]] = job["spec"]["maxReplicaCount"] * WORKER_CONNECTIONS[
            container["command"][1]
        ](config)
        triggers = [t for t in job["spec"]["triggers"] if t["type"] == "postgresql"]
        budget["KEDA postgresql scaler"] = KEDA_CONNECTIONS_PER_TRIGGER * len(triggers)
    for job in rendered.of_kind("Job"):
        budget[job["metadata"]["name"]] = job["spec"].get("parallelism", 1) * MIGRATION_CONNECTIONS
    budget["superuser_reserved_connections"] = SUPERUSER_RESERVED
    return budget


def _postgres_setting(rendered: Rendered, name: str) -> int | None:
    (container,) = rendered.one("StatefulSet", "mailq-postgres")["spec"]["template"]["spec"]["containers"]
    args = container.get("command", []) + container.get("args", [])
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return int(values[-1]) if values else None


def test_postgresql_max_connections_covers_every_connection_the_manifests_allow_at_once(
    rendered, monkeypatch
):
    budget = worst_case_connections(rendered, monkeypatch)
    worst = sum(budget.values())
    max_connections = _postgres_setting(rendered, "max_connections") or 100  # PostgreSQL's default
    assert max_connections >= worst, (
        f"max_connections {max_connections} < worst case {worst}: {budget} -- PostgreSQL would refuse "
        "connections (53300) at full scale; raise it (and the memory limit) or lower a max-scale"
    )
    # The arithmetic written next to the manifest states this very total.
    text = (ROOT / "deployment" / "base" / "postgres.yaml").read_text()
    stated = re.search(r"worst case (\d+)", text)
    assert stated and int(stated.group(1)) == worst, (
        f"postgres.yaml states {stated and stated.group(1)}, not {worst}"
    )
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"max_connections={max_connections}" in text and f"worst case {worst}" in page


# --- what one minikube node must hold ---------------------------------------------------------------------

# (CPU millicores, memory MiB) requested by what `make cluster` installs, per pod. Sources, read
# from the projects' source repositories (default branch as stored, not the pinned release files,
# not a running cluster): knative/serving config/core/deployments/{activator,controller,webhook}.yaml;
# its autoscaler.yaml copy we could read was an older revision (30m/40Mi), so the 100m/100Mi of the
# current one is counted, the larger; knative-extensions/net-kourier config/300-controller.yaml and
# 300-gateway.yaml; kedacore/keda config/manager/manager.yaml, config/metrics-server/deployment.yaml
# and config/webhooks/webhooks.yaml. The control plane's are kubeadm's static-pod defaults and the
# CoreDNS Deployment's (one replica on minikube), not re-read here.
SYSTEM_REQUESTS = {
    "kube-apiserver": (250, 0),
    "kube-controller-manager": (200, 0),
    "kube-scheduler": (100, 0),
    "etcd": (100, 100),
    "coredns": (100, 70),
    "knative activator": (300, 60),
    "knative autoscaler": (100, 100),
    "knative controller": (100, 100),
    "knative webhook": (100, 100),
    "net-kourier-controller": (200, 200),
    "3scale-kourier-gateway": (200, 200),
    "keda-operator": (100, 100),
    "keda-metrics-apiserver": (100, 100),
    "keda-admission": (100, 100),
}
# Knative adds a queue-proxy to every function pod: config-deployment's queue-sidecar-cpu-request
# default ("25m"); no memory request by default.
QUEUE_PROXY = (25, 0)
SPARE_CPU = 1000  # room to scale a function or a worker out beyond one pod
SPARE_MEMORY = 1024  # the node's own OS, kubelet and container runtime


def _cpu(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity (or minikube's 8g, binary as well) in MiB."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|g)?", quantity).groups()
    return math.ceil(int(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "g": 1024, None: 1 / 1024**2}[unit])


def _pod_requests(doc: dict) -> tuple[int, int]:
    cpu = memory = 0
    for container in _containers(doc):
        requests = container.get("resources", {}).get("requests", {})
        cpu += _cpu(str(requests.get("cpu", "0")))
        memory += _mebibytes(str(requests.get("memory", "0")))
    return cpu, memory


def apply_requests(rendered: Rendered) -> dict[str, tuple[int, int]]:
    """What `make apply` starts, one entry per object: pods x (CPU, memory) requests."""
    applied = set(_stages(_recipes()["apply"]))
    started = {}
    for doc in rendered.docs:
        if doc["metadata"].get("labels", {}).get("mailq.dev/stage") not in applied or not _containers(doc):
            continue
        cpu, memory = _pod_requests(doc)
        if doc["apiVersion"].startswith("serving.knative.dev/"):
            pods = 1  # Knative starts one pod per new revision (initial scale), then scales to zero
            cpu, memory = cpu + QUEUE_PROXY[0], memory + QUEUE_PROXY[1]
        elif doc["kind"] == "ScaledJob":
            pods = doc["spec"]["maxReplicaCount"]  # a sweep Job whenever work is due
        elif doc["kind"] == "Job":
            pods = doc["spec"].get("parallelism", 1)
        else:
            pods = doc["spec"].get("replicas", 1)  # the workers run one pod each until `make hpa`
        started[f"{doc['kind']} {doc['metadata']['name']}"] = (pods * cpu, pods * memory)
    return started


def test_the_minikube_defaults_hold_everything_make_apply_starts_with_a_cpu_to_spare(rendered):
    ours = apply_requests(rendered)
    assert any(name.startswith("ScaledJob") for name in ours) and len(ours) >= 15, ours
    cpu = sum(c for c, _ in ours.values()) + sum(c for c, _ in SYSTEM_REQUESTS.values())
    memory = sum(m for _, m in ours.values()) + sum(m for _, m in SYSTEM_REQUESTS.values())
    cpus = int(_make_var("MINIKUBE_CPUS")) * 1000
    node_memory = _mebibytes(_make_var("MINIKUBE_MEMORY"))
    assert cpu + SPARE_CPU <= cpus, (
        f"{cpu}m requested + {SPARE_CPU}m to spare > MINIKUBE_CPUS ({cpus}m): {ours}"
    )
    assert memory + SPARE_MEMORY <= node_memory, (
        f"{memory} MiB requested > MINIKUBE_MEMORY ({node_memory} MiB)"
    )
    text = K8S_MK.read_text()
    stated = re.search(r"come to ~([\d.]+) CPUs", text)
    assert stated and abs(float(stated.group(1)) - cpu / 1000) < 0.05, (
        f"k8s.mk states {stated.group(1)}, sum {cpu}m"
    )


# --- workers: liveness and shutdown ------------------------------------------------------------------------


def _worker_deployments(rendered: Rendered) -> dict[str, dict]:
    return {
        _worker_role(d): d
        for d in rendered.of_kind("Deployment")
        if _pod_spec(d)["containers"][0].get("command", [""])[0] == "mailq"
    }


def _probe_passes(command: list[str], heartbeat, age: float | None, ttl: int) -> bool:
    if age is None:
        heartbeat.unlink(missing_ok=True)
    else:
        heartbeat.touch()
        os.utime(heartbeat, (time.time() - age, time.time() - age))
    env = {
        "PATH": os.environ["PATH"],
        "MAILQ_HEARTBEAT_FILE": str(heartbeat),
        "WORKER_HEARTBEAT_TTL": str(ttl),
    }
    return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode == 0


def test_worker_probes_fail_only_when_the_heartbeat_file_is_two_ttls_old(rendered, tmp_path):
    """The probe command itself, run by sh: a worker whose beats go on (Redis up or not) is alive;
    one whose file is older than 2 x WORKER_HEARTBEAT_TTL is wedged, whatever the TTL is set to."""
    heartbeat = tmp_path / "heartbeat"
    deployed_ttl = int(rendered.config["WORKER_HEARTBEAT_TTL"])
    for role, deployment in _worker_deployments(rendered).items():
        (container,) = _pod_spec(deployment)["containers"]
        for probe in ("startupProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            for ttl in (deployed_ttl, 100):  # 100: an operator who raised the TTL
                # A beat every ttl / 3 s; one delayed by a Redis call timing out is still well inside.
                assert _probe_passes(command, heartbeat, ttl / 3 + 11, ttl), f"{role} {probe} ttl {ttl}"
                assert _probe_passes(command, heartbeat, 2 * ttl - 5, ttl), f"{role} {probe} ttl {ttl}"
                assert not _probe_passes(command, heartbeat, 2 * ttl + 5, ttl), f"{role} {probe} ttl {ttl}"
            assert not _probe_passes(command, heartbeat, None, deployed_ttl), f"{role} {probe}: no file"
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 2 * deployed_ttl


def test_the_sender_grace_period_outlasts_a_conversation_and_the_whole_lease(rendered):
    """Scale-in or a rollout must never SIGKILL a conversation: its deadline is 0.8 x the lease after
    the claim, plus recording the outcome."""
    lease = int(rendered.config["TASK_LEASE_SECONDS"])
    sender = _worker_deployments(rendered)["sender"]
    grace = _pod_spec(sender)["terminationGracePeriodSeconds"]
    assert grace > lease and grace >= 0.8 * lease + 30, f"grace {grace} s, lease {lease} s"


def test_keda_asks_for_one_sender_per_ten_waiting_tenants(rendered):
    """listLength = tenants one sender can serve at their per-account cap: WORKER_COUNT conversations
    / SMTP_MAX_CONNECTIONS_PER_ACCOUNT each."""
    config = rendered.config
    if "SMTP_MAX_CONNECTIONS_PER_ACCOUNT" not in config:
        # TODO(lead): config.env gets WORKER_COUNT=32 and SMTP_MAX_CONNECTIONS_PER_ACCOUNT=3 with the
        # new send path (the config-keys test refuses a key shared/config.py does not read yet).
        pytest.skip("SMTP_MAX_CONNECTIONS_PER_ACCOUNT is not a setting yet (the new send path adds it)")
    (sender,) = [
        so
        for so in rendered.of_kind("ScaledObject")
        if so["spec"]["scaleTargetRef"]["name"] == "mailq-sender"
    ]
    (trigger,) = sender["spec"]["triggers"]
    per_replica = int(config["WORKER_COUNT"]) // int(config["SMTP_MAX_CONNECTIONS_PER_ACCOUNT"])
    assert int(trigger["metadata"]["listLength"]) == per_replica
