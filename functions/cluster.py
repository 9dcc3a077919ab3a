"""The cluster view of `mailq status --cluster` and `make smoke`, read with the `kubernetes` client.

Reading and understanding are apart: ``read_cluster`` asks the API server (kubeconfig, or the
in-cluster service account when run in a pod) and turns every answer into plain JSON-shaped dicts,
exactly as the API returns them; the ``*_row`` functions read those dicts and nothing else, so
tests/test_status.py checks them with objects in the shape of the Knative and KEDA CRD schemas.

Needs the `ops` extra (kubernetes, rich): an operator's tool, left out of the cluster image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NAMESPACE = "mailq"
GATEWAY = "mailq-gateway"  # the path gateway's Service: the cluster's own /metrics is reached through it
KNATIVE = ("serving.knative.dev", "v1", "services")
SCALED_OBJECTS = ("keda.sh", "v1alpha1", "scaledobjects")
SCALED_JOBS = ("keda.sh", "v1alpha1", "scaledjobs")
KNATIVE_SERVICE_LABEL = "serving.knative.dev/service"  # on every pod of a Knative Service's revisions
SCALED_JOB_LABEL = "scaledjob.keda.sh/name"  # on every Job KEDA starts for a ScaledJob


@dataclass
class ServiceRow:
    name: str
    ready: str  # the Ready condition's status: True, False or Unknown
    revision: str | None  # status.latestReadyRevisionName
    pods: int  # running pods now; 0 = scaled to zero
    reason: str = ""


@dataclass
class ScalerRow:
    kind: str  # ScaledObject or ScaledJob
    name: str
    target: str
    ready: str
    active: str
    min: int
    max: int
    replicas: int | None  # the HPA's current replicas (ScaledObject), running Jobs (ScaledJob)
    last_job: str = ""  # ScaledJob: the newest Job, its result and when it started
    reason: str = ""


@dataclass
class PodRow:
    name: str
    phase: str
    reason: str


@dataclass
class ClusterView:
    context: str
    namespace: str
    services: list[ServiceRow] = field(default_factory=list)
    scalers: list[ScalerRow] = field(default_factory=list)
    unready_pods: list[PodRow] = field(default_factory=list)
    metrics: str | None = None  # the metrics function's answer (Prometheus text), or None
    metrics_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("metrics")
        return out


# --- reading API objects (plain dicts, as the API server returns them) --------------------------------


def condition(obj: dict, kind: str) -> dict:
    """The condition of type ``kind`` in status.conditions ({} when absent, as before reconciling)."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def _why(c: dict) -> str:
    if c.get("status") == "True":
        return ""
    return ": ".join(part for part in (c.get("reason"), c.get("message")) if part)


def service_row(ksvc: dict, pods: list[dict]) -> ServiceRow:
    name = ksvc["metadata"]["name"]
    ready = condition(ksvc, "Ready")
    running = [
        p
        for p in pods
        if (p["metadata"].get("labels") or {}).get(KNATIVE_SERVICE_LABEL) == name
        and (p.get("status") or {}).get("phase") == "Running"
    ]
    return ServiceRow(
        name=name,
        ready=ready.get("status", "Unknown"),
        revision=(ksvc.get("status") or {}).get("latestReadyRevisionName"),
        pods=len(running),
        reason=_why(ready) if ready else "not reconciled yet",
    )


def scaled_object_row(so: dict, hpa: dict | None) -> ScalerRow:
    spec = so.get("spec") or {}
    ready, active = condition(so, "Ready"), condition(so, "Active")
    replicas = None
    if hpa is not None:
        replicas = (hpa.get("status") or {}).get("currentReplicas", 0)
    return ScalerRow(
        kind="ScaledObject",
        name=so["metadata"]["name"],
        target=(spec.get("scaleTargetRef") or {}).get("name", ""),
        ready=ready.get("status", "Unknown"),
        active=active.get("status", "Unknown"),
        min=spec.get("minReplicaCount", 0),  # KEDA's defaults when the field is left out
        max=spec.get("maxReplicaCount", 100),
        replicas=replicas,
        reason=_why(ready) if ready else "not reconciled yet",
    )


def job_result(job: dict) -> str:
    """Complete, Failed (with its reason), or running, from a batch/v1 Job's status."""
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed", "SuccessCriteriaMet"):
            kind = "Complete" if c["type"] == "SuccessCriteriaMet" else c["type"]
            return kind if kind == "Complete" else f"Failed ({c.get('reason', '')})"
    return "running" if status.get("active") else "pending"


def scaled_job_row(sj: dict, jobs: list[dict]) -> ScalerRow:
    spec = sj.get("spec") or {}
    name = sj["metadata"]["name"]
    ours = [j for j in jobs if (j["metadata"].get("labels") or {}).get(SCALED_JOB_LABEL) == name]
    ours.sort(key=lambda j: j["metadata"].get("creationTimestamp") or "")
    last = ""
    if ours:
        newest = ours[-1]
        started = (newest.get("status") or {}).get("startTime") or newest["metadata"].get("creationTimestamp")
        last = f"{newest['metadata']['name']} {job_result(newest)} (started {started})"
    ready, active = condition(sj, "Ready"), condition(sj, "Active")
    return ScalerRow(
        kind="ScaledJob",
        name=name,
        target="Job",
        ready=ready.get("status", "Unknown"),
        active=active.get("status", "Unknown"),
        min=spec.get("minReplicaCount", 0),
        max=spec.get("maxReplicaCount", 100),
        replicas=sum(1 for j in ours if (j.get("status") or {}).get("active")),
        last_job=last or "none yet",
        reason=_why(ready) if ready else "not reconciled yet",
    )


def unready_pod(pod: dict) -> PodRow | None:
    """A pod that should be serving and is not, with the most telling reason; None when it is fine."""
    status = pod.get("status") or {}
    phase = status.get("phase", "Unknown")
    if phase == "Succeeded":
        return None  # a finished Job's pod
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    if ready.get("status") == "True":
        return None
    reasons = []
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        for key in ("waiting", "terminated"):
            if state.get(key) and state[key].get("reason"):
                reasons.append(f"{cs.get('name')}: {state[key]['reason']}")
        if cs.get("restartCount"):
            reasons.append(f"{cs.get('name')}: {cs['restartCount']} restart(s)")
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
    if scheduled.get("status") == "False":
        reasons.append(f"unschedulable: {scheduled.get('message', scheduled.get('reason', ''))}")
    if not reasons:
        reasons.append(status.get("reason") or ready.get("reason") or phase)
    return PodRow(pod["metadata"]["name"], phase, "; ".join(reasons))


# --- asking the API server ------------------------------------------------------------------------------


def connect(context: str | None):
    """An ApiClient from the kubeconfig (``context`` or its current one), or the pod's service account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
        name = context or config.list_kube_config_contexts()[1]["name"]
    except config.ConfigException:
        if context:
            raise
        config.load_incluster_config()
        name = "in-cluster"
    return client.ApiClient(), name


def _plain(api_client, obj) -> Any:
    return api_client.sanitize_for_serialization(obj)


def read_cluster(context: str | None, namespace: str = NAMESPACE, *, metrics: bool = True) -> ClusterView:
    """Everything `mailq status --cluster` shows, read once."""
    from kubernetes import client

    api_client, name = connect(context)
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    batch, autoscaling = client.BatchV1Api(api_client), client.AutoscalingV2Api(api_client)
    view = ClusterView(name, namespace)
    pods = _plain(api_client, core.list_namespaced_pod(namespace))["items"]
    for ksvc in custom.list_namespaced_custom_object(*KNATIVE[:2], namespace, KNATIVE[2])["items"]:
        view.services.append(service_row(ksvc, pods))
    hpas = {
        h["metadata"]["name"]: h
        for h in _plain(api_client, autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace))["items"]
    }
    for so in custom.list_namespaced_custom_object(*SCALED_OBJECTS[:2], namespace, SCALED_OBJECTS[2])[
        "items"
    ]:
        hpa_name = (so.get("status") or {}).get("hpaName") or f"keda-hpa-{so['metadata']['name']}"
        view.scalers.append(scaled_object_row(so, hpas.get(hpa_name)))
    jobs = _plain(api_client, batch.list_namespaced_job(namespace))["items"]
    for sj in custom.list_namespaced_custom_object(*SCALED_JOBS[:2], namespace, SCALED_JOBS[2])["items"]:
        view.scalers.append(scaled_job_row(sj, jobs))
    view.unready_pods = [row for row in map(unready_pod, pods) if row is not None]
    if metrics:
        try:
            view.metrics = cluster_metrics(core, namespace)
        except Exception as exc:  # noqa: BLE001 - the rest of the view is still worth printing
            view.metrics_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return view


def cluster_metrics(core, namespace: str = NAMESPACE) -> str:
    """GET /metrics through the API server's proxy to the gateway Service (no NodePort needed)."""
    return core.connect_get_namespaced_service_proxy_with_path(f"{GATEWAY}:http", namespace, "metrics")
