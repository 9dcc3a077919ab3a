"""`mailq status`: the local figures from a real PostgreSQL and Redis, and the cluster view's reading of
API objects. No cluster exists here: the Knative and KEDA objects below validate against the CRD
schemas in tests/k8s-schemas (strict: no invented field passes), and the core objects (Pod, Job,
HPA) are built with the kubernetes client's own models and serialised the way the API server sends them."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from click.testing import CliRunner
from kubernetes import client as k8s

from functions import cluster
from functions.cli import main
from functions.status import NoStack, figures_from_exposition, local_source
from shared.observe import gauges
from shared.tasks import control
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_manifests import _crd_validator

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(os.environ.get("MAILQ_K8S_SCHEMAS") or ROOT / "tests" / "k8s-schemas")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
API = k8s.ApiClient()


def plain(model) -> dict:
    return API.sanitize_for_serialization(model)


def crd(doc: dict) -> dict:
    """``doc``, after checking it against its CRD's schema (so its fields are the API's, not ours)."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {SCHEMAS}")
    errors = [
        f"{e.message} at {list(e.absolute_path)}" for e in _crd_validator(SCHEMAS, doc).iter_errors(doc)
    ]
    assert not errors, errors
    return doc


def ours(path: str, name: str) -> dict:
    """One of the repository's own manifests (its spec is what the cluster holds)."""
    return next(
        d for d in yaml.safe_load_all((ROOT / path).read_text()) if d and d["metadata"]["name"] == name
    )


def conditions(**states) -> list[dict]:
    return [
        {"type": kind, "status": status, **({"reason": reason, "message": message} if reason else {})}
        for kind, (status, reason, message) in states.items()
    ]


def knative_service(name: str, ready=("True", None, None), revision: str | None = "00003") -> dict:
    status = {
        "observedGeneration": 3,
        "conditions": [
            {"type": "ConfigurationsReady", "status": ready[0], "lastTransitionTime": "2026-12-01T11:00:00Z"},
            {"type": "Ready", "status": ready[0], "lastTransitionTime": "2026-12-01T11:00:00Z"}
            | ({"reason": ready[1], "message": ready[2]} if ready[1] else {}),
            {"type": "RoutesReady", "status": ready[0], "lastTransitionTime": "2026-12-01T11:00:00Z"},
        ],
        "latestCreatedRevisionName": f"{name}-00003",
        "url": f"http://{name}.mailq.svc.cluster.local",
        "address": {"url": f"http://{name}.mailq.svc.cluster.local"},
        "traffic": [{"revisionName": f"{name}-00003", "latestRevision": True, "percent": 100}],
    }
    if revision:
        status["latestReadyRevisionName"] = f"{name}-{revision}"
    return crd(
        {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "mailq"},
            "status": status,
        }
    )


def pod(
    name: str, labels: dict, *, phase="Running", ready=True, waiting: str | None = None, restarts=0
) -> dict:
    state = k8s.V1ContainerState(
        waiting=k8s.V1ContainerStateWaiting(reason=waiting) if waiting else None,
        running=None if waiting else k8s.V1ContainerStateRunning(started_at=NOW),
    )
    return plain(
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=name, namespace="mailq", labels=labels),
            status=k8s.V1PodStatus(
                phase=phase,
                conditions=[
                    k8s.V1PodCondition(type="PodScheduled", status="True"),
                    k8s.V1PodCondition(
                        type="Ready",
                        status="True" if ready else "False",
                        reason=None if ready else "ContainersNotReady",
                    ),
                ],
                container_statuses=[
                    k8s.V1ContainerStatus(
                        name="sender",
                        image="dev.local/mailq:1",
                        image_id="",
                        ready=ready,
                        restart_count=restarts,
                        state=state,
                    )  # fmt: skip
                ],
            ),
        )
    )


def test_a_knative_service_row_reads_ready_revision_and_running_pods():
    pods = [
        pod("enqueue-1", {cluster.KNATIVE_SERVICE_LABEL: "mailq-fn-enqueue"}),
        pod("enqueue-2", {cluster.KNATIVE_SERVICE_LABEL: "mailq-fn-enqueue"}, phase="Pending", ready=False),
        pod("login-1", {cluster.KNATIVE_SERVICE_LABEL: "mailq-fn-login"}),
    ]
    row = cluster.service_row(knative_service("mailq-fn-enqueue"), pods)
    assert (row.ready, row.revision, row.pods, row.reason) == ("True", "mailq-fn-enqueue-00003", 1, "")
    idle = cluster.service_row(knative_service("mailq-fn-metrics"), pods)
    assert idle.pods == 0  # scaled to zero
    broken = knative_service(
        "mailq-fn-ping",
        ready=("False", "RevisionMissing", "Configuration is waiting for a Revision"),
        revision=None,
    )
    row = cluster.service_row(broken, pods)
    assert (row.ready, row.revision) == ("False", None)
    assert row.reason == "RevisionMissing: Configuration is waiting for a Revision"


def test_a_scaled_object_row_reads_its_conditions_bounds_and_the_hpas_replicas():
    so = ours("keda/scaledobjects.yaml", "mailq-sender")
    so["status"] = {
        "scaleTargetKind": "apps/v1.Deployment",
        "scaleTargetGVKR": {
            "group": "apps",
            "kind": "Deployment",
            "resource": "deployments",
            "version": "v1",
        },
        "originalReplicaCount": 1,
        "lastActiveTime": "2026-12-01T11:59:00Z",
        "externalMetricNames": ["s0-redis-mailq:send:ready"],
        "hpaName": "keda-hpa-mailq-sender",
        "conditions": conditions(
            Ready=("True", "ScaledObjectReady", "ScaledObject is defined correctly and is ready for scaling"),
            Active=("True", "ScalerActive", "Scaling is performed because triggers are active"),
            Fallback=("False", "NoFallbackFound", "No fallbacks are active on this scaled object"),
        ),
    }
    hpa = plain(
        k8s.V2HorizontalPodAutoscaler(
            metadata=k8s.V1ObjectMeta(name="keda-hpa-mailq-sender"),
            spec=k8s.V2HorizontalPodAutoscalerSpec(
                max_replicas=10,
                scale_target_ref=k8s.V2CrossVersionObjectReference(kind="Deployment", name="mailq-sender"),
            ),
            status=k8s.V2HorizontalPodAutoscalerStatus(current_replicas=2, desired_replicas=3),
        )
    )
    row = cluster.scaled_object_row(crd(so), hpa)
    assert (row.target, row.ready, row.active, row.min, row.max, row.replicas) == (
        "mailq-sender", "True", "True", 0, 10, 2,
    )  # fmt: skip
    assert row.reason == ""
    fresh = ours("keda/scaledobjects.yaml", "mailq-consumer")  # just applied: no status yet
    row = cluster.scaled_object_row(crd(fresh), None)
    assert (row.ready, row.active, row.replicas, row.reason) == (
        "Unknown",
        "Unknown",
        None,
        "not reconciled yet",
    )


def job(name: str, started: datetime, *, complete: bool | None, active: int = 0) -> dict:
    conditions_ = None
    if complete is not None:
        kind, reason = ("Complete", None) if complete else ("Failed", "DeadlineExceeded")
        conditions_ = [k8s.V1JobCondition(type=kind, status="True", reason=reason)]
    return plain(
        k8s.V1Job(
            metadata=k8s.V1ObjectMeta(
                name=name, creation_timestamp=started, labels={cluster.SCALED_JOB_LABEL: "mailq-sweep"}
            ),
            status=k8s.V1JobStatus(start_time=started, conditions=conditions_, active=active or None),
        )
    )


def test_a_scaled_job_row_names_its_newest_job_and_how_it_ended():
    sj = ours("keda/sweep-scaledjob.yaml", "mailq-sweep")
    sj["status"] = {
        "lastActiveTime": "2026-12-01T11:59:30Z",
        "conditions": conditions(
            Ready=("True", "ScaledJobReady", "ScaledJob is defined correctly and is ready to scaling"),
            Active=("False", "ScalerNotActive", "Scaling is not performed because triggers are not active"),
        ),
    }
    jobs = [
        job("mailq-sweep-aaaaa", NOW - timedelta(minutes=5), complete=True),
        job("mailq-sweep-bbbbb", NOW - timedelta(minutes=1), complete=False),
        plain(k8s.V1Job(metadata=k8s.V1ObjectMeta(name="mailq-migrate", creation_timestamp=NOW))),
    ]
    row = cluster.scaled_job_row(crd(sj), jobs)
    assert (row.ready, row.active, row.min, row.max, row.replicas) == ("True", "False", 0, 1, 0)
    assert row.last_job.startswith("mailq-sweep-bbbbb Failed (DeadlineExceeded)")
    jobs.append(job("mailq-sweep-ccccc", NOW, complete=None, active=1))
    row = cluster.scaled_job_row(sj, jobs)
    assert row.replicas == 1 and row.last_job.startswith("mailq-sweep-ccccc running")


def test_pods_not_ready_are_listed_with_the_most_telling_reason():
    fine = pod("mailq-consumer-1", {})
    crashing = pod("mailq-sender-1", {}, ready=False, waiting="CrashLoopBackOff", restarts=4)
    done = plain(
        k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="mailq-sweep-x"), status=k8s.V1PodStatus(phase="Succeeded"))
    )
    pending = plain(
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="mailq-fn-login-1"),
            status=k8s.V1PodStatus(
                phase="Pending",
                conditions=[
                    k8s.V1PodCondition(
                        type="PodScheduled",
                        status="False",
                        reason="Unschedulable",
                        message="0/1 nodes: Insufficient cpu.",
                    )
                ],
            ),
        )
    )
    assert cluster.unready_pod(fine) is None and cluster.unready_pod(done) is None
    assert cluster.unready_pod(crashing).reason == "sender: CrashLoopBackOff; sender: 4 restart(s)"
    assert cluster.unready_pod(pending).reason == "unschedulable: 0/1 nodes: Insufficient cpu."


def test_read_cluster_asks_for_each_kind_in_the_namespace_and_through_the_gateway(monkeypatch):
    """The calls themselves (argument order of the generic custom-object API), with the API answering
    from the objects above: nothing here can reach a cluster."""
    asked = []

    def answer(items):
        return lambda *args, **kwargs: asked.append(args) or {"items": items}

    monkeypatch.setattr(cluster, "connect", lambda context: (API, context or "test"))
    monkeypatch.setattr(k8s.CoreV1Api, "list_namespaced_pod", lambda self, ns: k8s.V1PodList(items=[]))
    monkeypatch.setattr(k8s.BatchV1Api, "list_namespaced_job", lambda self, ns: k8s.V1JobList(items=[]))
    monkeypatch.setattr(
        k8s.AutoscalingV2Api,
        "list_namespaced_horizontal_pod_autoscaler",
        lambda self, ns: k8s.V2HorizontalPodAutoscalerList(items=[]),
    )
    objects = {
        "services": [knative_service("mailq-fn-metrics")],
        "scaledobjects": [ours("keda/scaledobjects.yaml", "mailq-sender")],
        "scaledjobs": [ours("keda/sweep-scaledjob.yaml", "mailq-sweep")],
    }
    monkeypatch.setattr(
        k8s.CustomObjectsApi,
        "list_namespaced_custom_object",
        lambda self, group, version, ns, plural: (
            asked.append((group, version, ns, plural)) or {"items": objects[plural]}
        ),
    )
    proxied = []
    monkeypatch.setattr(
        k8s.CoreV1Api,
        "connect_get_namespaced_service_proxy_with_path",
        lambda self, name, ns, path: proxied.append((name, ns, path)) or 'mailq_tasks{status="queued"} 3.0\n',
    )
    view = cluster.read_cluster("minikube", "mailq")
    assert sorted(asked) == [
        ("keda.sh", "v1alpha1", "mailq", "scaledjobs"),
        ("keda.sh", "v1alpha1", "mailq", "scaledobjects"),
        ("serving.knative.dev", "v1", "mailq", "services"),
    ]
    assert proxied == [("mailq-gateway:http", "mailq", "metrics")]
    assert [s.name for s in view.services] == ["mailq-fn-metrics"] and len(view.scalers) == 2
    assert figures_from_exposition(view.metrics)["tasks"] == {"queued": 3}
    services = [
        d
        for d in yaml.safe_load_all((ROOT / "knative/gateway.yaml").read_text())
        if d and d["kind"] == "Service"
    ]
    assert any(
        d["metadata"]["name"] == cluster.GATEWAY and "http" in [p["name"] for p in d["spec"]["ports"]]
        for d in services
    )


# --- the local view ----------------------------------------------------------------------------------------


def test_the_figures_survive_the_exposition_format():
    figures = gauges.Gauges(
        tasks={"scheduled": 1, "queued": 2, "processing": 3, "failed": 4},
        estimated={"sent": 1000, "cancelled": 7},
        oldest_due_seconds=12.5,
        sweep_pending=5,
        lists={"tasks": 6, "send_ready": 2, "send_queues": 9, "processing": 3},
        paused_accounts=1,
        workers_alive={"consumer": 1, "sender": 2},
        finished={"sent": 12, "cancelled": 0},
        accounts_waiting={"paused:credentials": 1, "backing_off:throttled": 3},
    )
    from dataclasses import asdict

    assert figures_from_exposition(gauges.render(figures).decode()) == asdict(figures)


def test_the_source_is_the_environment_or_a_running_mailq_dev(tmp_path):
    env = {"DATABASE_URL": "postgresql+pg8000://x@/db", "REDIS_URL": "redis://127.0.0.1:1/0"}
    assert local_source(tmp_path, env)["origin"] == "DATABASE_URL and REDIS_URL"
    with pytest.raises(NoStack, match="no running `mailq dev`"):
        local_source(tmp_path, {})
    state = {"pid": os.getpid(), "api": "http://127.0.0.1:8080", **{k.lower(): v for k, v in env.items()}}
    (tmp_path / "dev.json").write_text(
        json.dumps({**state, "metrics": {"sender": "http://127.0.0.1:9101/metrics"}})
    )
    found = local_source(tmp_path, {})
    assert found["redis_url"] == env["REDIS_URL"] and found["metrics"] == {
        "sender": "http://127.0.0.1:9101/metrics"
    }
    (tmp_path / "dev.json").write_text(json.dumps({**state, "pid": 2**22 + 12345}))  # beyond pid_max
    with pytest.raises(NoStack, match="no longer running"):
        local_source(tmp_path, {})


def test_mailq_status_prints_the_figures_as_tables_and_as_json(ctx, base_env, tmp_path):
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer() as smtp:
            user = pipe.user(smtp)
            for _ in range(2):
                pipe.enqueue(user)
        pipe.consumer.register()
        env = {**base_env, "MAILQ_DATA_DIR": str(tmp_path)}
        runner = CliRunner()
        shown = runner.invoke(main, ["status", "--data-dir", str(tmp_path)], env=env)
        assert shown.exit_code == 0, shown.output
        assert "Tasks" in shown.output and "queued" in shown.output and "consumer" in shown.output
        as_json = runner.invoke(main, ["status", "--json"], env=env)
        assert as_json.exit_code == 0, as_json.output
        figures = json.loads(as_json.output)["figures"]
        assert figures["tasks"]["queued"] == 2 and figures["lists"]["tasks"] == 2
        assert figures["workers_alive"] == {"consumer": 1, "sender": 0}
        assert figures["accounts_waiting"] == {}
        assert "postgresql" not in as_json.output  # the URLs (a password, in production) stay out
        with pipe.ctx.engine.begin() as conn:  # one account paused, two backing off (their relays' words)
            conn.execute(
                sa.text(
                    "INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username,"
                    " smtp_password_enc, smtp_security, smtp_paused_at, smtp_paused_code, smtp_backoff_since,"
                    " smtp_backoff_code) SELECT 'w' || g || '@example.com', 'x', 'h', 25, '', 'x', 'none',"
                    " CASE WHEN g = 1 THEN now() END, CASE WHEN g = 1 THEN 'key' END,"
                    " CASE WHEN g > 1 THEN now() END, CASE WHEN g > 1 THEN 'unreachable' END"
                    " FROM generate_series(1, 3) AS g"
                )
            )
        waiting = json.loads(runner.invoke(main, ["status", "--json"], env=env).output)["figures"]
        assert waiting["accounts_waiting"] == {"paused:key": 1, "backing_off:unreachable": 2}
        shown = runner.invoke(main, ["status", "--data-dir", str(tmp_path)], env=env)
        assert "Accounts waiting" in shown.output and "unreachable" in shown.output
        missing = runner.invoke(
            main, ["status", "--data-dir", str(tmp_path)], env={"DATABASE_URL": "", "REDIS_URL": ""}
        )
        assert missing.exit_code != 0 and "no running `mailq dev`" in missing.output
    finally:
        pipe.close()


def test_mailq_status_shows_how_much_was_sent_and_cancelled_right_after_it_happened(ctx, base_env, tmp_path):
    """Issue 22: after 5 mails `mailq status` said `"estimated": {}` (no ANALYZE had run yet); up to
    gauges.FINISHED_CAP finished tasks are counted exactly."""
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer() as smtp:
            user = pipe.user(smtp)
            for _ in range(5):
                pipe.enqueue(user)
            later = pipe.enqueue(user, scheduled_at="2999-01-01T00:00:00Z")
            pipe.pump()
        control.cancel(ctx, user.id, later)
        env = {**base_env, "MAILQ_DATA_DIR": str(tmp_path)}
        runner = CliRunner()
        as_json = runner.invoke(main, ["status", "--json"], env=env)
        assert as_json.exit_code == 0, as_json.output
        assert json.loads(as_json.output)["figures"]["finished"] == {"sent": 5, "cancelled": 1}
        shown = runner.invoke(main, ["status"], env=env)
        assert shown.exit_code == 0, shown.output
        rows = {
            line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") >= 3
        }
        assert "5" in rows["sent"] and "exact" in rows["sent"], shown.output
        assert "1" in rows["cancelled"] and "exact" in rows["cancelled"], shown.output
    finally:
        pipe.close()
