"""The cluster make targets, proved without a cluster: what `make apply` applies, in which order,
how it waits for the migration, and that the overlay renders the way operators run kustomize.

No cluster exists here, so the one fake is kubectl itself (a script on PATH that reports what a
cluster would), to provoke a failed migration Job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_manifests import (
    K8S_MK,
    MAILQ_IMAGE,
    OVERLAY,
    ROOT,
    SECRETS_EXAMPLE,
    Rendered,
    _containers,
    _skip_or_fail,
    gen_secrets,
    render_overlay,
)

WAIT_JOB = ROOT / "deployment" / "wait_job.py"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    return render_overlay(tmp_path_factory.mktemp("render"))


def _recipes() -> dict[str, list[str]]:
    """Each target of deployment/k8s.mk with its recipe lines."""
    recipes: dict[str, list[str]] = {}
    current = None
    for line in K8S_MK.read_text().splitlines():
        if line.startswith("\t") and current:
            recipes[current].append(line.strip())
            continue
        match = re.match(r"^([a-z][\w-]*):(?!=)", line)
        current = match.group(1) if match else None
        if current:
            recipes[current] = []
    return recipes


def _stages(recipe: list[str]) -> list[str]:
    return re.findall(r"-l mailq\.dev/stage=([a-z]+)", "\n".join(recipe))


def test_make_apply_rolls_every_workload_that_runs_the_mailq_image_after_the_migration(rendered):
    """A workload left to another target keeps its old image and config after `make apply`: old
    sweep code against a freshly migrated schema."""
    applied = _stages(_recipes()["apply"])
    assert applied == ["base", "migrate", "app"], applied  # data stores, migration, what uses the schema
    for doc in rendered.docs:
        if not any(c["image"].startswith(MAILQ_IMAGE + ":") for c in _containers(doc)):
            continue
        what = f"{doc['kind']} {doc['metadata']['name']}"
        stage = doc["metadata"]["labels"].get("mailq.dev/stage")
        assert stage in applied, (
            f"{what} runs the mailq image but is in stage {stage!r}, which `make apply` never applies"
        )
        if doc["kind"] != "Job":  # the migration itself
            assert applied.index(stage) > applied.index("migrate"), f"{what} starts before the migration"
        for trigger in doc.get("spec", {}).get("triggers", []):
            auth = rendered.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
            auth_stage = auth["metadata"]["labels"]["mailq.dev/stage"]
            assert auth_stage in applied and applied.index(auth_stage) <= applied.index(stage), (
                f"{what}'s TriggerAuthentication is not applied with it"
            )


FAKE_KUBECTL = """\
#!{python}
# Stands in for kubectl against a cluster where job/mailq-migrate has the conditions in $FAKE_JOB.
import json, os, sys, time
args = sys.argv[1:]
conditions = json.loads(os.environ["FAKE_JOB"])
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if "get" in args and "job" in args:
    print(json.dumps({{"kind": "Job", "status": {{"conditions": conditions}}}}))
elif "logs" in args:
    print("[pod/mailq-migrate-x7k2p/migrate] alembic: relation \\"tasks\\" already exists")
elif "wait" in args:  # what kubectl wait does: return once the condition holds, else at its timeout
    wanted = next(a.split("=", 2)[2] for a in args if a.startswith("--for=condition="))
    timeout = next(float(a.split("=")[1].rstrip("s")) for a in args if a.startswith("--timeout="))
    if any(c["type"] == wanted and c["status"] == "True" for c in conditions):
        sys.exit(0)
    time.sleep(timeout)
    sys.exit("error: timed out waiting for the condition on jobs/mailq-migrate")
"""


def _fake_kubectl(tmp_path: Path, conditions: list[dict]) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_JOB": json.dumps(conditions),
        "FAKE_CALLS": str(tmp_path / "calls"),
    }


FAILED = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "3 tries"}]


def test_a_failed_migration_stops_make_apply_at_once_with_the_jobs_log(tmp_path):
    """The recipe line `make apply` runs after starting the migration, against a Job that Failed."""
    if shutil.which("make") is None:
        _skip_or_fail("make is not installed")
    printed = subprocess.run(
        ["make", "-n", "apply"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    (line,) = [cmd for cmd in printed if "mailq-migrate" in cmd and "wait" in cmd and " delete " not in cmd]
    env = _fake_kubectl(tmp_path, FAILED)
    started = time.monotonic()
    shell = subprocess.Popen(
        ["sh", "-c", line], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = shell.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # the recipe's kubectl too
        shell.communicate()
        pytest.fail(f"`make apply` still waiting 20 s after the migration Job had Failed: {line}")
    assert shell.returncode != 0, "a failed migration must fail `make apply`"
    assert "BackoffLimitExceeded" in stderr and 'relation "tasks" already exists' in stderr
    assert time.monotonic() - started < 10


def test_wait_job_returns_as_soon_as_the_job_completes_and_times_out_with_the_log(tmp_path):
    env = _fake_kubectl(tmp_path, [{"type": "Complete", "status": "True"}])
    base = [sys.executable, str(WAIT_JOB), "-n", "mailq", "mailq-migrate", "--interval", "0.05"]
    done = subprocess.run([*base, "--timeout", "5"], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "completed" in done.stdout
    # Still running (a condition that does not end it): the timeout ends the wait, log printed.
    env["FAKE_JOB"] = json.dumps([{"type": "Suspended", "status": "False"}])
    hung = subprocess.run([*base, "--timeout", "0.3"], env=env, capture_output=True, text=True, timeout=20)
    assert hung.returncode == 1 and "neither completed nor failed" in hung.stderr
    assert "alembic" in hung.stderr


def test_kubectl_apply_k_renders_the_overlay_once_the_secrets_file_is_generated(tmp_path):
    """Plain `kubectl kustomize` (what `kubectl apply -k` runs): no load restrictor lifted, so every
    file a kustomization loads, the generated secrets file too, must sit inside its directory."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _skip_or_fail("kubectl is not installed: cannot render the kustomize overlay")
    out = Path(gen_secrets.OUT).resolve()
    assert out.is_relative_to(ROOT), out
    for name in ("deployment", "knative", "keda"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("secrets.env"))
    copy = tmp_path / out.relative_to(ROOT)
    assert gen_secrets.main(["--example", str(SECRETS_EXAMPLE), "--out", str(copy)]) == 0
    result = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    (secret,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Secret"]
    assert set(secret["data"]) == set(gen_secrets.read_env(SECRETS_EXAMPLE))


def test_gen_secrets_moves_an_older_secrets_file_instead_of_generating_new_passwords(tmp_path):
    legacy, out = tmp_path / "secrets.env", tmp_path / "base" / "secrets.env"
    out.parent.mkdir()
    legacy.write_text("POSTGRES_PASSWORD=live-one\n")
    assert gen_secrets.main(["--out", str(out), "--legacy", str(legacy)]) == 0
    assert not legacy.exists() and gen_secrets.read_env(out)["POSTGRES_PASSWORD"] == "live-one"


def test_make_cluster_refuses_a_minikube_too_old_for_kubernetes_1_34_and_asks_for_the_disk(tmp_path):
    if shutil.which("make") is None:
        _skip_or_fail("make is not installed")
    fake = tmp_path / "minikube"
    printed = subprocess.run(
        ["make", "-n", "cluster", f"MINIKUBE={fake}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert "--disk-size=30g" in printed, "Knative's install guide asks for 30 GB of disk"
    check = re.search(r"^have=.*?fi$", printed, re.M | re.S).group(0)
    for version, ok in (("v1.36.0", False), ("v1.37.0", True), ("v1.38.1", True)):
        fake.write_text(f"#!/bin/sh\necho {version}\n")
        fake.chmod(0o755)
        result = subprocess.run(["sh", "-c", check], capture_output=True, text=True, timeout=10)
        assert (result.returncode == 0) == ok, (version, result.stderr)


def _mailq_dev_options(*make_args: str, env: dict[str, str] | None = None) -> dict:
    """The options `make run` starts `mailq dev` with, as `mailq dev` itself parses them."""
    from functions.dev import dev

    printed = subprocess.run(
        ["make", "-n", "run", *make_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    ).stdout
    (line,) = [cmd for cmd in printed.splitlines() if "mailq dev" in cmd]
    words = shlex.split(line)
    with dev.make_context("dev", words[words.index("dev") + 1 :]) as context:
        return context.params


def test_make_run_port_and_smtp_port_reach_mailq_dev_and_nothing_else_changes_them():
    if shutil.which("make") is None:
        _skip_or_fail("make is not installed")
    moved = _mailq_dev_options("PORT=8081", "SMTP_PORT=2525")
    assert (moved["port"], moved["smtp_port"]) == (8081, 2525)
    plain = _mailq_dev_options()
    assert (plain["port"], plain["smtp_port"]) == (8080, 1025)  # `mailq dev`'s own defaults
    # Only make's command line moves them: a PORT exported for something else does not.
    exported = _mailq_dev_options(env={**os.environ, "PORT": "9999", "SMTP_PORT": "9998"})
    assert (exported["port"], exported["smtp_port"]) == (8080, 1025)
