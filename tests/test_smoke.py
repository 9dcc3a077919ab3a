"""`make smoke` (deployment/smoke.py) cannot run without a cluster; what can be checked here is: its
SMTP sink really receives mail and reports each Message-ID, the objects it creates are valid Kubernetes
objects, and it reads the API's objects (built with the kubernetes client's models) correctly."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage

import kubernetes_validate
from kubernetes import client as k8s

from shared.local.embedded import free_port
from tests.test_manifests import ROOT, _k8s_minor, _load_module

smoke = _load_module("mailq_smoke", ROOT / "deployment" / "smoke.py")
API = k8s.ApiClient()


def test_the_sink_receives_every_message_and_logs_each_message_id():
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-u", "-c", smoke.SINK, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                connection = smtplib.SMTP("127.0.0.1", port, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the sink did not start"
                time.sleep(0.05)
        with connection:
            for n, message_id in enumerate(("<a@smoke>", "<b@smoke>", "<a@smoke>")):
                mail = EmailMessage()
                mail["From"], mail["To"], mail["Subject"] = "s@example.com", f"r{n}@example.org", "smoke"
                mail["Message-ID"] = message_id
                mail.set_content("one line\n.\nstarts with a dot\n")
                connection.send_message(mail)
    finally:
        sink.terminate()
        output, _ = sink.communicate(timeout=10)
    assert smoke.arrivals(output) == {"<a@smoke>": 2, "<b@smoke>": 1}


def test_the_sink_pod_and_service_are_valid_restricted_kubernetes_objects():
    pod, service = smoke.sink_objects("mailq", "dev.local/mailq:abc")
    for doc in (pod, service):
        kubernetes_validate.validate(doc, _k8s_minor(), strict=True)
    assert (
        pod["spec"]["securityContext"]["runAsNonRoot"]
        and service["spec"]["selector"] == pod["metadata"]["labels"]
    )


def test_the_gateway_address_replicas_and_settings_are_read_from_api_objects():
    service = API.sanitize_for_serialization(
        k8s.V1Service(
            metadata=k8s.V1ObjectMeta(name="mailq-gateway"),
            spec=k8s.V1ServiceSpec(
                type="NodePort",
                ports=[k8s.V1ServicePort(name="http", port=80, node_port=30080, target_port="http")],
            ),
        )
    )
    node = API.sanitize_for_serialization(
        k8s.V1Node(
            metadata=k8s.V1ObjectMeta(name="mailq"),
            status=k8s.V1NodeStatus(
                addresses=[
                    k8s.V1NodeAddress(type="Hostname", address="mailq"),
                    k8s.V1NodeAddress(type="InternalIP", address="192.168.49.2"),
                ]
            ),
        )
    )
    assert smoke.gateway_url(service, [node]) == "http://192.168.49.2:30080"
    service["spec"]["ports"][0].pop("nodePort")
    assert smoke.gateway_url(service, [node]) is None
    spec = k8s.V1DeploymentSpec(
        selector=k8s.V1LabelSelector(match_labels={"app": "x"}),
        template=k8s.V1PodTemplateSpec(spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="sender")])),
    )
    idle = API.sanitize_for_serialization(k8s.V1Deployment(spec=spec, status=k8s.V1DeploymentStatus()))
    busy = API.sanitize_for_serialization(
        k8s.V1Deployment(spec=spec, status=k8s.V1DeploymentStatus(replicas=2, ready_replicas=1))
    )
    assert (smoke.replicas(idle), smoke.replicas(busy)) == (0, 2)
    production = API.sanitize_for_serialization(
        k8s.V1ConfigMap(data=dict(line.split("=", 1) for line in _config_lines()))
    )
    assert smoke.insecure_settings(production) == ["SMTP_ALLOW_PRIVATE_HOSTS", "SMTP_ALLOW_INSECURE"]
    production["data"].update(SMTP_ALLOW_PRIVATE_HOSTS="true", SMTP_ALLOW_INSECURE="true")
    assert smoke.insecure_settings(production) == []


def _config_lines() -> list[str]:
    text = (ROOT / "deployment" / "base" / "config.env").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]
