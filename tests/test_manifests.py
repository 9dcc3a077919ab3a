"""The Kubernetes manifests, proved without a cluster.

Every YAML document parses; core kinds validate strictly against Kubernetes' own schemas
(kubernetes-validate); Knative's and KEDA's objects validate against the strict CRD schemas in
tests/k8s-schemas (copied in with their licence; see SOURCE.md there; or $MAILQ_K8S_SCHEMAS). Plain
`kubectl kustomize` (no load restrictor lifted, as `kubectl apply -k` runs it) renders the minikube
overlay, and the checks no schema can make run on that rendered output: each ScaledObject watches the list its
worker reads, every FUNCTION_TARGET is a function, the gateway routes exactly the route table, the
ScaledJob's query is the code's query and PostgreSQL answers it from the indexes, every reference
resolves, and no secret is written into a manifest.

Without kubectl the tests that need it skip, except under CI (env CI set),
where they fail: a green CI must mean the manifests were checked.
"""

from __future__ import annotations

import ast
import base64
import copy
import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import sqlalchemy as sa
import yaml

from shared import queue, routes
from shared.config import Settings
from shared.pending import pending_work_sql

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIRS = ("knative", "keda", "deployment")
OVERLAY = Path("deployment/overlays/minikube")
SECRETS_EXAMPLE = ROOT / "deployment" / "secrets.env.example"
SECRETS_FILE = Path("deployment/base/secrets.env")  # generated and git-ignored (gen_secrets.OUT)
K8S_MK = ROOT / "deployment" / "k8s.mk"
CRD_GROUPS = ("serving.knative.dev", "keda.sh")
# Env var / ConfigMap key names that hold secrets: never a literal `value:` in a manifest.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|AUTH|DATABASE_URL|REDIS_URL")
MAILQ_IMAGE = "dev.local/mailq"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Trigger metadata each KEDA scaler understands (KEDA 2.20 docs); anything else is a typo KEDA would
# silently ignore, e.g. `listname` for `listName`.
REDIS_TRIGGER_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "listName", "listLength", "activationListLength", "enableTLS", "unsafeSsl",
    "databaseIndex",
}  # fmt: skip
POSTGRES_TRIGGER_KEYS = {
    "connectionFromEnv", "host", "port", "userName", "passwordFromEnv", "dbName", "sslmode", "query",
    "targetQueryValue", "activationTargetQueryValue",
}  # fmt: skip
# Worker command -> the Redis list KEDA measures for it (shared/queue.py): the consumer's input list;
# for the sender the fair-share ring of tenants with mail waiting, for the webhook worker the ring of
# endpoints with deliveries waiting (docs: keda/scaledobjects.yaml).
WORKER_LIST = {"consumer": queue.TASK_LIST, "sender": queue.SEND_READY, "webhooks": queue.WEBHOOK_READY}


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _skip_or_fail(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen_gateway = _load_module("mailq_gen_gateway", ROOT / "deployment" / "gen_gateway.py")
gen_secrets = _load_module("mailq_gen_secrets", ROOT / "deployment" / "gen_secrets.py")


def _read_env_file(path: Path) -> dict[str, str]:
    return gen_secrets.read_env(path)


def _make_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\??=\s*(\S+)", K8S_MK.read_text(), re.M)
    assert match, f"{name} is not set in deployment/k8s.mk"
    return match.group(1)


# --- the rendered overlay --------------------------------------------------------------------------


@dataclass
class Rendered:
    docs: list[dict]
    example_secrets: dict[str, str]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        for d in self.docs:
            meta = d["metadata"]
            if d["kind"] == kind and meta["name"] == name and namespace in (None, meta.get("namespace")):
                return d
        return None

    def one(self, kind: str, name: str) -> dict:
        doc = self.get(kind, name)
        assert doc is not None, f"no {kind} {name} in the rendered overlay"
        return doc

    @property
    def namespace(self) -> str:
        (ns,) = self.of_kind("Namespace")
        return ns["metadata"]["name"]

    @property
    def config(self) -> dict[str, str]:
        (config,) = [
            c for c in self.of_kind("ConfigMap") if c["metadata"]["name"].startswith("mailq-config-")
        ]
        return config["data"]

    def knative_services(self) -> list[dict]:
        return [d for d in self.of_kind("Service") if d["apiVersion"].startswith("serving.knative.dev/")]

    def core_services(self) -> list[dict]:
        return [d for d in self.of_kind("Service") if d["apiVersion"] == "v1"]


def render_overlay(work: Path) -> Rendered:
    """Plain `kubectl kustomize` of the minikube overlay (the loader's default restrictions, as
    `kubectl apply -k` uses them), from a copy in ``work`` whose secrets file is the example."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _skip_or_fail("kubectl is not installed: cannot render the kustomize overlay")
    ignore = shutil.ignore_patterns("secrets.env", "__pycache__")
    for name in MANIFEST_DIRS:
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    # Never the operator's real secrets file: render with the example's placeholders, put where
    # deployment/gen_secrets.py writes the real one.
    shutil.copy(SECRETS_EXAMPLE, work / SECRETS_FILE)
    result = subprocess.run(
        [kubectl, "kustomize", str(work / OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return Rendered(docs, _read_env_file(SECRETS_EXAMPLE))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    return render_overlay(tmp_path_factory.mktemp("render"))


def _containers(doc: dict) -> list[dict]:
    """The containers (init containers too) of any object with a pod template."""
    spec = doc.get("spec", {})
    for path in (
        ("template", "spec"),
        ("jobTargetRef", "template", "spec"),
        ("jobTemplate", "spec", "template", "spec"),
    ):
        node = spec
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and "containers" in node:
            return node.get("initContainers", []) + node["containers"]
    return []


def _pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec["jobTargetRef"]["template"]["spec"] if "jobTargetRef" in spec else spec["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _walk(node, path=()):
    """Every (path, dict) in a document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


def _worker_role(deployment: dict) -> str:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:1] == ["mailq"] and len(command) == 2, f"{deployment['metadata']['name']}: {command}"
    return command[1]


# --- files in the repository -------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    files = []
    for name in MANIFEST_DIRS:
        files += sorted((ROOT / name).rglob("*.yaml")) + sorted((ROOT / name).rglob("*.yml"))
    return files


def test_every_committed_manifest_parses_and_the_overlay_deploys_it():
    """No orphan: a manifest no kustomization reaches would be neither deployed nor checked."""
    files = _manifest_files()
    assert files
    reached: set[Path] = set()
    configurations: set[Path] = set()
    pending = [(ROOT / OVERLAY / "kustomization.yaml").resolve()]
    while pending:
        path = pending.pop()
        reached.add(path)
        kustomization = yaml.safe_load(path.read_text())
        for entry in kustomization.get("resources", []):
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path.relative_to(ROOT)} lists missing {entry}"
            if target.is_dir():
                pending.append(target / "kustomization.yaml")
            else:
                reached.add(target)
        configurations |= {(path.parent / name).resolve() for name in kustomization.get("configurations", [])}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]  # raises on a YAML error
        assert docs, f"{path.relative_to(ROOT)} holds no document"
        if path.resolve() in configurations:
            continue
        for doc in docs:
            assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, path.relative_to(ROOT)
    orphans = [p.relative_to(ROOT) for p in files if p.resolve() not in reached | configurations]
    assert not orphans, f"manifests the minikube overlay never includes: {orphans}"


def test_the_generated_gateway_config_and_knative_services_are_current():
    for path, text in gen_gateway.outputs().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make manifests`"


def test_the_kubernetes_version_checked_is_the_one_minikube_runs():
    from kubernetes_validate import utils

    assert _k8s_minor() in {v.rsplit(".", 1)[0] for v in utils.all_versions()}


def _k8s_minor() -> str:
    return re.match(r"v?(\d+\.\d+)", _make_var("K8S_VERSION")).group(1)


def test_committed_files_hold_no_secret():
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"literal Secret in {path}"
            for _, node in _walk(doc):
                if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
                    pytest.fail(f"{path.relative_to(ROOT)}: {node['name']} has a literal value")
    config = _read_env_file(ROOT / "deployment" / "base" / "config.env")
    assert not [k for k in config if SECRET_NAME.search(k)], "a secret-looking key in config.env"
    # The operator's real secrets, if this machine has them, appear in no committed file.
    real = ROOT / SECRETS_FILE
    if real.exists():
        values = [v for v in _read_env_file(real).values() if len(v) >= 8]
        for path in [
            *_manifest_files(),
            *(ROOT / "deployment").glob("*.env*"),
            *(ROOT / "deployment").rglob("*.env"),
        ]:
            if path != real:
                text = path.read_text()
                assert not [v for v in values if v in text], f"a value of secrets.env is in {path}"
    if shutil.which("git") and (ROOT / ".git").exists():
        for path in (str(SECRETS_FILE), "deployment/secrets.env"):  # and where it used to be
            ignored = subprocess.run(
                ["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=30
            )
            assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_secrets_example_is_consistent_with_the_database_and_redis_it_points_at():
    example = _read_env_file(SECRETS_EXAMPLE)
    database = urlsplit(example["DATABASE_URL"])
    assert database.scheme == "postgresql+pg8000"
    assert database.password == example["POSTGRES_PASSWORD"], "gen_secrets.py replaces it by that password"
    redis_url = urlsplit(example["REDIS_URL"])
    assert redis_url.scheme == "redis" and redis_url.password == example["REDIS_PASSWORD"]
    assert len(example["JWT_SECRET"].encode()) >= 32


def test_gen_secrets_fills_in_random_values_and_never_changes_one(tmp_path):
    out = tmp_path / "secrets.env"
    assert gen_secrets.main(["--out", str(out)]) == 0
    first = _read_env_file(out)
    example = _read_env_file(SECRETS_EXAMPLE)
    assert list(first) == list(example)
    assert out.stat().st_mode & 0o777 == 0o600
    assert not set(first.values()) & set(example.values()), "a placeholder survived"
    assert urlsplit(first["DATABASE_URL"]).password == first["POSTGRES_PASSWORD"]
    assert urlsplit(first["REDIS_URL"]).password == first["REDIS_PASSWORD"]
    assert urlsplit(first["DATABASE_URL"]).hostname == urlsplit(example["DATABASE_URL"]).hostname
    from cryptography.fernet import Fernet

    Fernet(first["MAILQ_ENCRYPTION_KEYS"].encode())  # a valid key
    out.write_text("".join(f"{k}={v}\n" for k, v in first.items() if k != "JWT_SECRET"))
    assert gen_secrets.main(["--out", str(out)]) == 0
    second = _read_env_file(out)
    assert {k: v for k, v in second.items() if k != "JWT_SECRET"} == {
        k: v for k, v in first.items() if k != "JWT_SECRET"
    }
    assert second["JWT_SECRET"] and second["JWT_SECRET"] != first["JWT_SECRET"]


# --- schemas -----------------------------------------------------------------------------------------


def test_the_minikube_overlay_renders(rendered):
    kinds = {d["kind"] for d in rendered.docs}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Job", "Service"} <= kinds
    assert {"ScaledObject", "ScaledJob", "TriggerAuthentication"} <= kinds
    assert len(rendered.knative_services()) == len(routes.TARGETS)


def test_core_objects_validate_strictly_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    checked = 0
    for doc in rendered.docs:
        if doc["apiVersion"].rpartition("/")[0] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(doc, _k8s_minor(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}"
            )
        checked += 1
    assert checked >= 10


def test_core_validation_catches_a_misspelt_field(rendered):
    import kubernetes_validate

    doc = copy.deepcopy(rendered.one("Deployment", "mailq-sender"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, _k8s_minor(), strict=True)


@pytest.fixture(scope="module")
def crd_schemas() -> Path:
    folder = Path(os.environ.get("MAILQ_K8S_SCHEMAS") or ROOT / "tests" / "k8s-schemas")
    if not folder.is_dir():
        _skip_or_fail(f"no CRD schemas at {folder} (set MAILQ_K8S_SCHEMAS to the k8s-schemas folder)")
    return folder


def _crd_validator(folder: Path, doc: dict):
    group, _, version = doc["apiVersion"].rpartition("/")
    path = folder / group / f"{doc['kind'].lower()}_{version}.json"
    assert path.exists(), f"no schema for {doc['apiVersion']} {doc['kind']} at {path}"
    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)


def test_knative_and_keda_objects_validate_against_the_strict_crd_schemas(rendered, crd_schemas):
    crds = [d for d in rendered.docs if d["apiVersion"].rpartition("/")[0] in CRD_GROUPS]
    assert len(crds) == len(routes.TARGETS) + 6  # 3 ScaledObjects, 1 ScaledJob, 2 TriggerAuthentications
    for doc in crds:
        errors = sorted(
            _crd_validator(crd_schemas, doc).iter_errors(doc), key=lambda e: list(e.absolute_path)
        )
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
            f"{e.message} at {list(e.absolute_path)}" for e in errors
        )


def test_crd_validation_catches_a_misspelt_field(rendered, crd_schemas):
    doc = copy.deepcopy(rendered.one("ScaledObject", "mailq-sender"))
    doc["spec"]["minReplicaCont"] = doc["spec"].pop("minReplicaCount")
    assert list(_crd_validator(crd_schemas, doc).iter_errors(doc)), "the CRD schemas are not strict"


# --- KEDA ----------------------------------------------------------------------------------------------


def _service_address(rendered: Rendered, host: str, port: int) -> dict:
    """The core Service a cluster-wide DNS name and port point at (KEDA runs in another namespace)."""
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
    assert match, f"{host} is not a Service FQDN (KEDA's operator runs in its own namespace)"
    name, namespace = match.groups()
    service = rendered.get("Service", name, namespace)
    assert service is not None and service["apiVersion"] == "v1", f"{host}: no such Service in the overlay"
    assert port in [p["port"] for p in service["spec"]["ports"]], f"{host}: Service has no port {port}"
    return service


def _trigger_auth_secret(rendered: Rendered, owner: dict, trigger: dict, parameter: str) -> str:
    """The Secret key a trigger's authenticationRef gives `parameter`."""
    ref = trigger["authenticationRef"]
    assert ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    auth = rendered.get("TriggerAuthentication", ref["name"], owner["metadata"]["namespace"])
    assert auth is not None, f"{owner['metadata']['name']}: no TriggerAuthentication {ref['name']}"
    (entry,) = [e for e in auth["spec"].get("secretTargetRef", []) if e["parameter"] == parameter]
    return entry["key"]


def test_each_scaledobject_watches_the_list_its_worker_reads(rendered):
    scaled = rendered.of_kind("ScaledObject")
    roles = set()
    for so in scaled:
        target = so["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        deployment = rendered.get("Deployment", target["name"], so["metadata"]["namespace"])
        assert deployment is not None, f"{so['metadata']['name']} scales a missing Deployment"
        role = _worker_role(deployment)
        roles.add(role)
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"].get("listName") == WORKER_LIST[role], (
            f"{so['metadata']['name']} watches {trigger['metadata'].get('listName')!r} but `mailq {role}` "
            f"reads {WORKER_LIST[role]!r}"
        )
    assert roles == set(WORKER_LIST)


def test_scaledobjects_scale_to_zero_with_explained_bounds(rendered):
    for so in rendered.of_kind("ScaledObject"):
        spec = so["spec"]
        assert spec["minReplicaCount"] == 0
        assert 1 <= spec["maxReplicaCount"] <= 50
        assert 1 <= spec["pollingInterval"] <= 60 and spec["cooldownPeriod"] >= 30
        (trigger,) = spec["triggers"]
        metadata = trigger["metadata"]
        assert int(metadata["activationListLength"]) >= 0 and int(metadata["listLength"]) >= 1
        # The deployment leaves the replica count to KEDA.
        deployment = rendered.one("Deployment", spec["scaleTargetRef"]["name"])
        assert "replicas" not in deployment["spec"]


def test_redis_triggers_use_known_keys_and_reach_the_redis_service(rendered):
    redis_url = urlsplit(rendered.example_secrets["REDIS_URL"])
    for so in rendered.of_kind("ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            metadata = trigger["metadata"]
            unknown = set(metadata) - REDIS_TRIGGER_KEYS
            assert not unknown, f"{so['metadata']['name']}: unknown redis trigger metadata {unknown}"
            assert {"address", "listName", "listLength", "activationListLength"} <= set(metadata)
            host, _, port = metadata["address"].rpartition(":")
            service = _service_address(rendered, host, int(port))
            assert service["metadata"]["name"] == redis_url.hostname, "KEDA and the app see different Redis"
            assert metadata.get("databaseIndex", "0") == redis_url.path.lstrip("/")
            assert _trigger_auth_secret(rendered, so, trigger, "password") == "REDIS_PASSWORD"


def test_the_sweep_scaledjob_query_is_the_code_query_byte_for_byte(rendered):
    (job,) = rendered.of_kind("ScaledJob")
    (trigger,) = job["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    leak_window = int(rendered.config["SWEEP_LEAK_WINDOW"])
    retention = int(rendered.config["TASK_RETENTION_DAYS"])
    assert trigger["metadata"]["query"] == pending_work_sql(leak_window, retention)


def test_the_sweep_scaledjob_runs_one_bounded_sweep_at_a_time(rendered):
    (job,) = rendered.of_kind("ScaledJob")
    spec = job["spec"]
    assert spec["maxReplicaCount"] == 1
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert 0 < spec["jobTargetRef"]["activeDeadlineSeconds"] <= 3600
    assert spec["jobTargetRef"]["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = _containers(job)
    assert container["command"] == ["mailq", "sweep"]


def test_the_sweep_trigger_reaches_the_database_the_app_uses(rendered):
    (job,) = rendered.of_kind("ScaledJob")
    (trigger,) = job["spec"]["triggers"]
    metadata = trigger["metadata"]
    unknown = set(metadata) - POSTGRES_TRIGGER_KEYS
    assert not unknown, f"unknown postgresql trigger metadata {unknown}"
    assert {"host", "port", "userName", "dbName", "query", "targetQueryValue"} <= set(metadata)
    assert "password" not in metadata and "connection" not in metadata
    service = _service_address(rendered, metadata["host"], int(metadata["port"]))
    database = urlsplit(rendered.example_secrets["DATABASE_URL"])
    assert service["metadata"]["name"] == database.hostname and int(metadata["port"]) == database.port
    postgres = rendered.one("StatefulSet", "mailq-postgres")
    env = _env(postgres["spec"]["template"]["spec"]["containers"][0])
    assert metadata["userName"] == env["POSTGRES_USER"]["value"] == database.username
    assert metadata["dbName"] == env["POSTGRES_DB"]["value"] == database.path.lstrip("/")
    assert _trigger_auth_secret(rendered, job, trigger, "password") == "POSTGRES_PASSWORD"


EXPLAIN_USER = """
INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username, smtp_password_enc,
                   smtp_security)
VALUES ('explain@example.com', 'x', 'smtp.example.com', 587, 'u', 'x', 'starttls')
RETURNING id
"""
# Mostly finished mail, as in a live system; 1 % each of the statuses the sweep looks at, due or not.
EXPLAIN_TASKS = """
INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                   next_attempt_at, lease_until, message_id)
SELECT CAST(:user_id AS bigint), 'r@example.com', 's', 'b',
       (ARRAY['scheduled', 'failed', 'queued', 'processing', 'cancelled'])[mod(g, 100) + 1], 0,
       now() + (mod(g, 7) - 3) * interval '1 hour', now() + (mod(g, 7) - 3) * interval '1 hour',
       CASE WHEN mod(g, 100) = 3 THEN now() + (mod(g, 3) - 1) * interval '1 minute' END, 'm' || g
  FROM generate_series(1, 20000) AS g WHERE mod(g, 100) < 5
UNION ALL
SELECT CAST(:user_id AS bigint), 'r@example.com', 's', 'b', 'sent', 1, now() - interval '1 day',
       now() - interval '1 day', NULL, 'n' || g
  FROM generate_series(1, 19000) AS g
"""
# ... and some of it older than any retention period.
EXPLAIN_OLD = (
    "UPDATE tasks SET updated_at = now() - interval '400 days' WHERE status = 'sent' AND id % 500 = 0"
)


def test_the_sweep_query_runs_on_postgresql_from_the_indexes(rendered, pg_url):
    """EXPLAIN on the migrated schema with 20k rows: the sweep's indexes, no sequential scan."""
    (job,) = rendered.of_kind("ScaledJob")
    query = job["spec"]["triggers"][0]["metadata"]["query"]
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: ANALYZE's statistics and the rows vanish with it
            user_id = conn.execute(sa.text(EXPLAIN_USER)).scalar_one()
            conn.execute(sa.text(EXPLAIN_TASKS), {"user_id": user_id})
            conn.execute(sa.text(EXPLAIN_OLD))
            conn.execute(sa.text("ANALYZE tasks"))
            assert conn.execute(sa.text(query)).scalar_one() > 0
            plans = {}
            for seqscan in ("on", "off"):
                conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
                plans[seqscan] = conn.execute(sa.text("EXPLAIN (FORMAT JSON) " + query)).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    for seqscan, plan in plans.items():
        nodes = [node for _, node in _walk(plan) if "Node Type" in node]
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
        assert not seq, f"sequential scan on tasks (enable_seqscan={seqscan}): {json.dumps(plan)}"
        indexes = {n.get("Index Name") for n in nodes}
        expected = {"tasks_sweep_due", "tasks_sweep_queued", "tasks_sweep_lease", "tasks_sweep_expired"}
        assert expected | {"tasks_retention"} <= indexes, f"indexes used: {indexes}"


# --- Knative ------------------------------------------------------------------------------------------


def _main_functions() -> set[str] | None:
    """Names functions/main.py defines or imports at top level (read with ast, not imported)."""
    main = ROOT / "functions" / "main.py"
    if not main.exists():
        return None
    names = set()
    for node in ast.parse(main.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_every_function_target_names_a_registered_function(rendered):
    defined = _main_functions()
    served = {}
    for ksvc in rendered.knative_services():
        (container,) = ksvc["spec"]["template"]["spec"]["containers"]
        target = _env(container)["FUNCTION_TARGET"]["value"]
        assert target in routes.TARGETS, f"{ksvc['metadata']['name']} serves unknown target {target!r}"
        if defined is not None:
            assert target in defined, f"functions/main.py defines no {target!r}"
        assert ksvc["metadata"]["name"] == gen_gateway.service_name(target)
        assert target not in served, f"{target} is served twice"
        served[target] = ksvc
    assert set(served) == set(routes.TARGETS), "every route's function has a Knative Service"


def test_knative_services_scale_to_zero_and_match_their_server(rendered):
    for ksvc in rendered.knative_services():
        name = ksvc["metadata"]["name"]
        assert ksvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local", name
        template = ksvc["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["autoscaling.knative.dev/min-scale"] == "0", name
        assert int(annotations["autoscaling.knative.dev/max-scale"]) >= 1, name
        assert int(annotations["autoscaling.knative.dev/target"]) >= 1, name
        assert annotations["autoscaling.knative.dev/metric"] == "concurrency", name
        spec = template["spec"]
        (container,) = spec["containers"]
        env = _env(container)
        assert "PORT" not in env, "Knative sets PORT itself"
        threads, workers = int(env["THREADS"]["value"]), int(env["WORKERS"]["value"])
        assert spec["containerConcurrency"] == threads * workers, name
        assert 0 < spec["timeoutSeconds"] < gen_gateway.GATEWAY_READ_TIMEOUT, name
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz/live", f"{name} {probe}"
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


# --- the gateway ----------------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def arg(self, name: str) -> list[str] | None:
        found = self.all(name)
        return found[0].args if found else None


def parse_nginx(text: str) -> list[Directive]:
    """A small parser for nginx's syntax: directives, blocks, quotes and comments."""
    tokens = re.findall(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};'"]+""", text)
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            directive = Directive(words[0], words[1:], [])
            stack[-1].append(directive)
            stack.append(directive.block)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "'\"" else token)
    assert len(stack) == 1 and not words, "unbalanced nginx config"
    return stack[0]


@dataclass
class Gateway:
    server: Directive
    upstreams: dict[str, list[str]]
    locations: list[Directive] = field(default_factory=list)

    def locate(self, uri: str) -> Directive:
        """nginx's choice: exact match, else the first matching regex, else the longest prefix."""
        prefixes = []
        for loc in self.locations:
            modifier, *rest = loc.args
            if modifier == "=" and rest[0] == uri:
                return loc
            if not rest and uri.startswith(modifier) and not modifier.startswith("@"):
                prefixes.append(loc)
        longest = max(prefixes, key=lambda loc: len(loc.args[0]), default=None)
        for loc in self.locations:
            if loc.args[0] == "~" and re.search(loc.args[1], uri):
                return loc
        assert longest is not None, f"no location for {uri}"
        return longest

    def target_host(self, location: Directive, method: str = "GET") -> str | None:
        """The host a request with ``method`` is sent to: the location's default, or the one its
        ``if ($request_method = METHOD)`` block sets (one path served by several functions)."""
        host = None
        for directive in location.block or []:
            if directive.name == "set" and directive.args[0] == gen_gateway.HOST_VARIABLE:
                host = directive.args[1]
            elif directive.name == "if" and " ".join(directive.args) == f"($request_method = {method})":
                for inner in directive.all("set"):
                    if inner.args[0] == gen_gateway.HOST_VARIABLE:
                        host = inner.args[1]
        return host

    def allowed(self, location: Directive) -> set[str]:
        (guard,) = [d for d in location.all("if") if "!~" in d.args]
        match = re.fullmatch(r"\(\$request_method !~ (\S+)\)", " ".join(guard.args))
        assert match, f"unexpected method guard {guard.args}"
        return {m for m in HTTP_METHODS if re.search(match.group(1), m)}


@pytest.fixture(scope="module")
def gateway(rendered) -> Gateway:
    (config,) = [
        c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].startswith("mailq-gateway-nginx-")
    ]
    (http,) = [d for d in parse_nginx(config["data"]["nginx.conf"]) if d.name == "http"]
    upstreams = {u.args[0]: [s.args[0] for s in u.all("server")] for u in http.all("upstream")}
    (server,) = [s for s in http.all("server") if s.arg("listen") and s.arg("listen")[0] == "8080"]
    return Gateway(server, upstreams, server.all("location"))


def _sample_paths(route: routes.Route) -> list[str]:
    if "{" not in route.path:
        return [route.path]
    largest = str(getattr(routes, "MAX_ID", 2**63 - 1))
    return [re.sub(r"\{\w+\}", value, route.path) for value in ("1", "42", largest)]


def _near_misses() -> list[str]:
    """Paths close to the routes that the route table does not know."""
    misses = {
        "/",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/healthz",
        "/favicon.ico",
        "/api/v2/login",
        "/API/v1/login",
    }
    for route in routes.ROUTES:
        parent = route.path.rsplit("/", 1)[0] or "/"  # "/docs" -> "/", itself a route
        misses |= {route.path + "/", route.path + "x", parent, "/x" + route.path}
        if "{" in route.path:
            for value in ("0", "01", "-1", "abc", "1.5", "", "9" * 19, "9" * 20, "1/x"):
                misses.add(re.sub(r"\{\w+\}", value, route.path))
    return sorted(misses)


def _routed(method: str, path: str) -> bool:
    known = routes.match(method, path)
    return known is not None and known.route is not None


def _route_table_target(path: str) -> str | None:
    """The function whose path shape matches. (An id too large for a bigint has the shape: the
    gateway forwards it and the function answers 404, as it does for an id that does not exist.)"""
    return next((r.target for r in routes.ROUTES if r.pattern.match(path)), None)


def test_every_route_is_reachable_through_the_gateway_and_nothing_else_is(rendered, gateway):
    hosts = {
        _env(k["spec"]["template"]["spec"]["containers"][0])["FUNCTION_TARGET"]["value"]: (
            f"{k['metadata']['name']}.{k['metadata']['namespace']}.svc.cluster.local"
        )
        for k in rendered.knative_services()
    }
    used = set()
    for route in routes.ROUTES:
        for path in _sample_paths(route):
            location = gateway.locate(path)
            used.add(id(location))
            assert gateway.target_host(location, route.method) == hosts[route.target], (
                f"{route.method} {path}"
            )
            for method in HTTP_METHODS:
                known = routes.match(method, path)
                assert (method in gateway.allowed(location)) == (
                    known is not None and known.route is not None
                ), f"{method} {path}: the gateway and the route table disagree"
            assert location.arg("proxy_pass") == ["http://kourier_internal"]
    for path in _near_misses():
        location = gateway.locate(path)
        expected = _route_table_target(path)
        actual = gateway.target_host(location)
        assert actual == (hosts[expected] if expected else None), f"{path}: gateway sends it to {actual}"
    routed = [loc for loc in gateway.locations if loc.args[0] in ("=", "~")]
    assert all(id(loc) in used for loc in routed), "a gateway location no route needs"
    assert gateway.upstreams["kourier_internal"] == [gen_gateway.KOURIER_INTERNAL]


def test_unknown_paths_get_a_json_problem_from_nginx_itself(gateway):
    assert gateway.server.arg("default_type") == ["application/problem+json"]
    location = gateway.locate("/no/such/path")
    assert location.args == ["/"] and gateway.target_host(location) is None
    status, body = location.arg("return")
    problem = json.loads(body)
    assert status == "404" and problem["status"] == 404 and problem["title"]
    for named in ("@too_large", "@unreachable", "@timeout"):
        (loc,) = [loc for loc in gateway.locations if loc.args == [named]]
        status, body = loc.arg("return")
        assert json.loads(body)["status"] == int(status)


def test_the_gateway_replaces_x_forwarded_for_so_trusted_hops_cannot_be_spoofed(rendered, gateway):
    headers = {d.args[0].lower(): d.args[1] for d in gateway.server.all("proxy_set_header")}
    # Appending ($proxy_add_x_forwarded_for) would let a client choose the address the rate limiter sees.
    assert headers["x-forwarded-for"] == "$remote_addr"
    assert headers["host"] == gen_gateway.HOST_VARIABLE
    assert int(rendered.config["TRUSTED_PROXY_HOPS"]) >= 1
    for ksvc in rendered.knative_services():
        annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
        # The activator stays in the path at every scale, so the hop count never changes.
        assert annotations["autoscaling.knative.dev/target-burst-capacity"] == "-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo(http.server.BaseHTTPRequestHandler):
    """Stands in for Kourier: answers with the request line and headers it was given."""

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(
            {"path": self.path, "host": self.headers["Host"], "xff": self.headers["X-Forwarded-For"]}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def nginx_prefix():
    """A scratch directory nginx's workers can enter: as root they run as `nobody`, and pytest's
    tmp_path sits under a mode-0700 directory."""
    path = Path(tempfile.mkdtemp(prefix="mailq-nginx-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_nginx_serves_the_gateway_config_as_these_checks_read_it(rendered, nginx_prefix):
    """The real nginx, the rendered config, a fake Kourier: routing, headers and JSON problems."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed: the gateway config is checked by parsing only")
    tmp_path = nginx_prefix
    (config,) = [
        c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].startswith("mailq-gateway-nginx-")
    ]
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, health = _free_port(), _free_port()
    text = (
        config["data"]["nginx.conf"]
        .replace(gen_gateway.KOURIER_INTERNAL, f"127.0.0.1:{upstream.server_address[1]}")
        .replace("/tmp/", f"{tmp_path}/")
        .replace("listen 8080 default_server;", f"listen 127.0.0.1:{port} default_server;")
        .replace("listen 8081;", f"listen 127.0.0.1:{health};")
    )
    (tmp_path / "nginx.conf").write_text(text)
    command = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    server = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.PIPE)

    def request(method: str, path: str, body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path, body=body, headers={"X-Forwarded-For": "6.6.6.6"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        for route in routes.ROUTES:
            path = _sample_paths(route)[0]
            status, _, body = request(
                route.method, path, b"{}" if route.method in ("POST", "PATCH") else None
            )
            seen = json.loads(body)
            assert status == 200 and seen["path"] == path, (route, status, body)
            assert seen["host"] == gen_gateway.service_host(route.target, rendered.namespace)
            assert seen["xff"] == "127.0.0.1", "the client's own X-Forwarded-For must not pass"
            wrong = next(m for m in ("DELETE", "PUT", "PATCH") if not _routed(m, path))
            status, headers, body = request(wrong, path)
            assert status == 405 and json.loads(body)["status"] == 405 and route.method in headers["Allow"]
        for path, status_wanted in (("/no/such/path", 404), ("/api/v1/user/0", 404)):
            status, headers, body = request("GET", path)
            assert status == status_wanted and headers["Content-Type"] == "application/problem+json"
            assert json.loads(body)["status"] == status_wanted
        status, headers, body = request("POST", "/api/v1/task/enqueue", b"x" * (gen_gateway.body_limit() + 1))
        assert status == 413 and json.loads(body)["status"] == 413
        upstream.shutdown()
        upstream.server_close()
        status, headers, body = request("GET", "/healthz/live")
        assert status == 502 and json.loads(body)["status"] == 502
    finally:
        server.terminate()
        server.communicate(timeout=10)
        upstream.server_close()


# --- references, secrets, configuration -------------------------------------------------------------------


def test_every_reference_resolves_inside_the_rendered_output(rendered):
    ns = rendered.namespace
    secrets = {s["metadata"]["name"]: s for s in rendered.of_kind("Secret")}
    configmaps = {c["metadata"]["name"]: c for c in rendered.of_kind("ConfigMap")}
    namespaced = [d for d in rendered.docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {ns}, "everything in one namespace"
    assert gen_gateway.NAMESPACE == ns, "deployment/gen_gateway.py NAMESPACE differs from the overlay's"

    def has_key(objects, name, key, what):
        assert name in objects, f"{what}: no {name}"
        data = {**objects[name].get("data", {}), **objects[name].get("stringData", {})}
        assert key is None or key in data, f"{what}: {name} has no key {key}"

    for doc in rendered.docs:
        what = f"{doc['kind']} {doc['metadata']['name']}"
        for _, node in _walk(doc):
            if "secretKeyRef" in node:
                has_key(secrets, node["secretKeyRef"]["name"], node["secretKeyRef"]["key"], what)
            if "configMapKeyRef" in node:
                has_key(configmaps, node["configMapKeyRef"]["name"], node["configMapKeyRef"]["key"], what)
            if "secretRef" in node:
                has_key(secrets, node["secretRef"]["name"], None, what)
            if "configMapRef" in node:
                has_key(configmaps, node["configMapRef"]["name"], None, what)
            if "secretName" in node:
                has_key(secrets, node["secretName"], None, what)
            if isinstance(node.get("configMap"), dict):
                has_key(configmaps, node["configMap"]["name"], None, what)
        if doc["kind"] == "TriggerAuthentication":
            for entry in doc["spec"].get("secretTargetRef", []):
                has_key(secrets, entry["name"], entry["key"], what)
            for entry in doc["spec"].get("configMapTargetRef", []):
                has_key(configmaps, entry["name"], entry["key"], what)
        for trigger in (
            doc.get("spec", {}).get("triggers", []) if doc["kind"] in ("ScaledObject", "ScaledJob") else []
        ):
            ref = trigger.get("authenticationRef")
            assert ref and rendered.get("TriggerAuthentication", ref["name"], ns), (
                f"{what}: authenticationRef"
            )
        if doc["kind"] == "StatefulSet":
            assert rendered.get("Service", doc["spec"]["serviceName"], ns), f"{what}: serviceName"
    # Every core Service selects the pods of some workload.
    templates = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in rendered.docs
        if d["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in rendered.core_services():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), (
            f"Service {service['metadata']['name']}"
        )


def test_the_generated_secret_has_exactly_the_example_keys(rendered):
    (secret,) = rendered.of_kind("Secret")
    assert set(secret["data"]) == set(rendered.example_secrets)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == rendered.example_secrets  # rendered from the example, never the real file


def test_no_literal_secret_in_the_rendered_manifests(rendered):
    for doc in rendered.docs:
        if doc["kind"] == "Secret":
            continue
        what = f"{doc['kind']} {doc['metadata']['name']}"
        for container in _containers(doc):
            for entry in container.get("env", []):
                if SECRET_NAME.search(entry["name"]):
                    assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), (
                        f"{what}: {entry['name']} must come from a Secret"
                    )
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("mailq-config-"):
            assert not [k for k in doc["data"] if SECRET_NAME.search(k)], f"{what} holds a secret-like key"
        for trigger in (
            doc.get("spec", {}).get("triggers", []) if doc["kind"] in ("ScaledObject", "ScaledJob") else []
        ):
            assert not {"password", "connection", "username"} & set(trigger["metadata"]), what
        text = yaml.safe_dump(doc)
        for value in rendered.example_secrets.values():
            assert value not in text, f"{what} contains a secret's value"


def _settings_names() -> set[str]:
    """Every environment variable name shared/config.py reads."""
    source = (ROOT / "shared" / "config.py").read_text()
    return set(re.findall(r"""get\(\s*["']([A-Z][A-Z0-9_]*)["']""", source))


def test_the_configmap_holds_only_settings_the_app_reads_and_they_make_valid_production_settings(rendered):
    config = rendered.config
    unknown = set(config) - _settings_names()
    assert not unknown, f"ConfigMap keys shared/config.py never reads (typos?): {unknown}"
    settings = Settings.from_env({**config, **rendered.example_secrets})  # raises ConfigError if invalid
    assert settings.is_production
    assert not settings.smtp_allow_private_hosts and not settings.smtp_allow_insecure


def test_workers_have_heartbeat_probes_resources_and_a_grace_period_for_the_mail_in_hand(rendered):
    config = rendered.config
    by_role = {}
    for deployment in rendered.of_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        if container.get("command", [""])[0] != "mailq":
            continue
        role = _worker_role(deployment)
        by_role[role] = deployment
        env = _env(container)
        heartbeat = env["MAILQ_HEARTBEAT_FILE"]["value"]
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(heartbeat.startswith(m + "/") for m in mounts) or not container["securityContext"].get(
            "readOnlyRootFilesystem"
        ), f"{role}: the heartbeat file is not writable"
        for probe in ("startupProbe", "livenessProbe"):
            command = " ".join(container[probe]["exec"]["command"])
            assert "$MAILQ_HEARTBEAT_FILE" in command and "WORKER_HEARTBEAT_TTL" in command, f"{role} {probe}"
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert set(by_role) == set(WORKER_LIST)
    grace = by_role["sender"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # A send on a live connection is four SMTP operations, each bounded by SMTP_TIMEOUT.
    assert grace > 4 * float(config["SMTP_TIMEOUT"]) and grace > int(config["TASK_LEASE_SECONDS"])


def test_every_worker_pod_names_its_metrics_port_as_the_settings_serve_it(rendered):
    """Prometheus finds each worker's /metrics: by the named port (a PodMonitor) or by the annotations,
    both at the METRICS_PORT the ConfigMap gives the process."""
    port = int(rendered.config["METRICS_PORT"])
    workers = [
        doc
        for doc in rendered.docs
        if doc["kind"] in ("Deployment", "ScaledJob")
        and [c.get("command", [""])[:2] for c in _containers(doc)] in (
            [["mailq", "consumer"]], [["mailq", "sender"]], [["mailq", "sweep"]],
        )
    ]  # fmt: skip
    assert len(workers) == 3
    for doc in workers:
        (container,) = _containers(doc)
        template = (
            doc["spec"]["jobTargetRef"]["template"] if doc["kind"] == "ScaledJob" else doc["spec"]["template"]
        )
        annotations = template["metadata"]["annotations"]
        ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
        assert ("metrics", port) in ports, doc["metadata"]["name"]
        assert (
            annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
        )
        assert annotations["prometheus.io/path"] == "/metrics"


def test_every_mailq_container_runs_the_same_image_as_non_root(rendered):
    tags = set()
    for doc in rendered.docs:
        for container in _containers(doc):
            image = container["image"]
            if image.startswith(MAILQ_IMAGE + ":"):
                tags.add(image)
            pod = _pod_spec(doc)
            non_root = container.get("securityContext", {}).get("runAsNonRoot") or pod.get(
                "securityContext", {}
            ).get("runAsNonRoot")
            assert non_root, f"{doc['kind']} {doc['metadata']['name']}: {container['name']} may run as root"
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False
    assert len(tags) == 1, f"mailq containers disagree on the image: {tags}"


# --- the image and the Makefile ------------------------------------------------------------------------


def _docker_ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out)

    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_docker_build_context_holds_the_package_and_nothing_secret():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for path in ("pyproject.toml", "shared/config.py", "shared/migrations/env.py", "functions/main.py"):
        assert not _docker_ignored(patterns, path), f"{path} is left out of the image"
    for path in (
        "deployment/secrets.env", ".venv/bin/python", ".mailq/pg/PG_VERSION", "tests/test_manifests.py",
        ".git/HEAD", "tests/bench/results/run.json", "shared/__pycache__/config.cpython-311.pyc",
        "build/k8s/mailq.yaml",
    ):  # fmt: skip
        assert _docker_ignored(patterns, path), f"{path} would be sent into the image build"


def test_the_dockerfile_builds_a_slim_non_root_image_without_build_tools():
    text = (ROOT / "deployment" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage: the final image gets the venv, not the build"
    assert re.search(r"python:3\.11-slim", text)
    final = stages[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
        "final stage must run as a numeric non-root user"
    )
    assert not re.search(r"apt-get install|gcc|build-essential", final)
    assert all("--no-cache-dir" in line for line in re.findall(r"pip install[^\n]*", text))
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", text, re.M)
    assert "functions-framework" in final and "functions/main.py" in final


def test_every_rendered_object_is_applied_by_a_make_stage(rendered):
    """`make apply` / `make keda` apply the rendered file by stage label: an object without one
    would never reach the cluster. (Which stage each workload needs: tests/test_make_targets.py.)"""
    text = K8S_MK.read_text()
    stages = set(re.findall(r"-l mailq\.dev/stage=([a-z]+)", text))
    assert stages == {"base", "migrate", "app", "keda"}
    for doc in rendered.docs:
        stage = doc["metadata"].get("labels", {}).get("mailq.dev/stage")
        assert stage in stages, f"{doc['kind']} {doc['metadata']['name']} has no make stage"
        if doc["kind"] == "ScaledObject":
            assert stage == "keda", f"ScaledObject {doc['metadata']['name']} belongs to `make keda`"


def test_the_cluster_targets_live_in_k8s_mk_with_help_and_pinned_versions():
    text = K8S_MK.read_text()
    for target in ("cluster", "image", "apply", "hpa", "keda", "re", "delete", "clean", "all", "status"):
        assert re.search(rf"^{target}:[^\n]*## \S", text, re.M), f"k8s.mk: no `{target}: ... ## help`"
    assert _make_var("KNATIVE_VERSION").startswith("1.23.")
    assert _make_var("KOURIER_VERSION").startswith("1.23.")
    assert _make_var("KEDA_VERSION").startswith("2.20.")
    assert "--load-restrictor" not in text, "operators render with plain `kubectl apply -k`"
    assert "minikube" in text and "image build" in text
