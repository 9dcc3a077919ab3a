"""Wait until a Kubernetes Job has Completed or Failed; on failure print its pods' logs and exit 1.

    python deployment/wait_job.py --kubectl "kubectl --context mailq" -n mailq mailq-migrate [--timeout 420]

`kubectl wait --for=condition=Complete` waits out its whole timeout when the Job has Failed (one
condition per wait): a migration that fails would hold `make apply` for ten minutes and then say
nothing useful. This polls the Job's conditions instead and stops at whichever comes first.
Exit status: 0 Complete; 1 Failed or timed out (the logs printed either way); 2 kubectl unusable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

# Conditions that end a Job (Kubernetes 1.31+ sets SuccessCriteriaMet / FailureTarget first, then
# Complete / Failed once the pods are gone; either of each pair is the verdict).
DONE = ("Complete", "SuccessCriteriaMet")
FAILED = ("Failed", "FailureTarget")


def kubectl(base: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)


def verdict(job: dict) -> tuple[str, str] | None:
    """("complete" | "failed", reason) once the Job has ended, else None."""
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("status") != "True":
            continue
        reason = f"{condition.get('reason') or condition['type']}: {condition.get('message') or ''}".strip()
        if condition.get("type") in FAILED:
            return "failed", reason
        if condition.get("type") in DONE:
            return "complete", reason
    return None


def print_logs(base: list[str], namespace: str, name: str) -> None:
    """Every pod's log: with restartPolicy Never each try left a pod of its own."""
    selector = f"batch.kubernetes.io/job-name={name}"
    logs = kubectl(
        base, "-n", namespace, "logs", "-l", selector, "--all-containers", "--prefix", "--tail=200"
    )
    print(f"--- logs of job/{name}'s pods ---", file=sys.stderr)
    print((logs.stdout or logs.stderr or "(no log: no pod started)").rstrip(), file=sys.stderr)
    print("---", file=sys.stderr)


def wait(base: list[str], namespace: str, name: str, timeout: float, interval: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = kubectl(base, "-n", namespace, "get", "job", name, "-o", "json")
        if got.returncode != 0:
            print(f"kubectl get job/{name} failed: {got.stderr.strip()}", file=sys.stderr)
            return 2
        ended = verdict(json.loads(got.stdout))
        if ended is not None:
            state, reason = ended
            if state == "complete":
                print(f"job/{name} completed")
                return 0
            print(f"job/{name} failed ({reason})", file=sys.stderr)
            print_logs(base, namespace, name)
            return 1
        if time.monotonic() >= deadline:
            print(f"job/{name} neither completed nor failed within {timeout:g} s", file=sys.stderr)
            print_logs(base, namespace, name)
            return 1
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job")
    parser.add_argument("-n", "--namespace", required=True)
    parser.add_argument("--kubectl", default="kubectl", help="the kubectl command, e.g. with --context")
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--interval", type=float, default=2)
    args = parser.parse_args(argv)
    return wait(shlex.split(args.kubectl), args.namespace, args.job, args.timeout, args.interval)


if __name__ == "__main__":
    sys.exit(main())
