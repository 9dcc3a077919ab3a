"""The path gateway's behaviour under a real nginx (knative/nginx.conf as generated): what happens
when Kourier closes a pooled keepalive connection, and how large a request passes.

A scripted stand-in listens where Kourier would; nginx is Debian's (`.ci/run` installs nginx-light).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

from shared.config import Settings
from shared.tasks import batch
from shared.tasks.enqueue import request_limit
from tests.conftest import auth_header
from tests.test_manifests import ROOT, _read_env_file, gen_gateway, parse_nginx

CONFIG_ENV = ROOT / "deployment" / "base" / "config.env"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gateway_to(upstream_port: int):
    """A real nginx serving the generated config, with Kourier replaced by 127.0.0.1:upstream_port."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        # As .ci/run promises: it installs nginx-light, and says so when it cannot.
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    # As root nginx's workers run as `nobody`: a prefix they can enter, outside pytest's 0700 tmp.
    prefix = Path(tempfile.mkdtemp(prefix="mailq-gateway-"))
    prefix.chmod(0o755)
    port = _free_port()
    text = (
        gen_gateway.render_nginx()
        .replace(gen_gateway.KOURIER_INTERNAL, f"127.0.0.1:{upstream_port}")
        .replace("/tmp/", f"{prefix}/")
        .replace("listen 8080 default_server;", f"listen 127.0.0.1:{port} default_server;")
        .replace("listen 8081;", f"listen 127.0.0.1:{_free_port()};")
    )
    (prefix / "nginx.conf").write_text(text)
    command = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.025)
        yield port
    finally:
        server.terminate()
        server.communicate(timeout=10)
        shutil.rmtree(prefix, ignore_errors=True)


class _ClosesItsKeepalive(socketserver.BaseRequestHandler):
    """Kourier closing an idle upstream connection at the moment nginx reuses it: the first request
    on a connection gets a keep-alive 200, the second is read and the connection closed unanswered."""

    seen: list[str]

    def handle(self):
        data = b""
        for answered in range(2):
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(data) < length:
                data += self.request.recv(65536)
            data = data[length:]
            self.seen.append(head.split(b" ")[0].decode())
            if answered:
                return  # socketserver closes the connection: no answer to the second request
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


def test_a_closed_keepalive_connection_is_retried_for_a_get_and_a_post_is_never_sent_twice():
    _ClosesItsKeepalive.seen = []
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ClosesItsKeepalive)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with gateway_to(upstream.server_address[1]) as port:
            # One client connection: the same nginx worker, so the same pool of upstream connections.
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            statuses = []
            for method in ("GET", "GET", "POST"):
                body = b"{}" if method == "POST" else None
                client.request(
                    method, "/api/v1/task/queue" if method == "GET" else "/api/v1/task/enqueue", body
                )
                response = client.getresponse()
                response.read()
                statuses.append(response.status)
    finally:
        upstream.shutdown()
        upstream.server_close()
    # The second GET finds its pooled connection closed and goes out again on a fresh one: 200, not
    # 502. The POST then takes that pooled connection, reaches the upstream once, finds it closed,
    # and nginx does not send it again: a 502 the client sees, never a second enqueue.
    assert statuses == [200, 200, 502], statuses
    assert _ClosesItsKeepalive.seen == ["GET", "GET", "GET", "POST"], _ClosesItsKeepalive.seen


def _cluster_ctx() -> types.SimpleNamespace:
    env = _read_env_file(CONFIG_ENV)
    sizes = {k: env[k] for k in ("MAX_BODY_BYTES", "MAX_ATTACHMENT_BYTES", "MAX_BATCH_BYTES")}
    return types.SimpleNamespace(settings=Settings.from_env(sizes))


def _app_limit() -> int:
    return request_limit(_cluster_ctx())


def _full_size_bodies(max_body: int) -> dict[str, bytes]:
    """Enqueue requests whose body is exactly MAX_BODY_BYTES of UTF-8, spelt with \\uXXXX escapes."""

    def request(escaped: str) -> bytes:
        return b'{"recipient_email": "bob@example.org", "subject": "x", "body": "' + escaped.encode() + b'"}'

    return {
        "non-ASCII (2 bytes each, 3x)": request("\\u00e9" * (max_body // 2)),
        "ASCII (1 byte each, 6x)": request("\\u0041" * max_body),
    }


def test_the_gateway_limit_is_the_apps_request_limit_and_holds_a_full_size_escaped_body():
    (http_block,) = [d for d in parse_nginx(gen_gateway.render_nginx()) if d.name == "http"]
    (server,) = [s for s in http_block.all("server") if s.arg("listen") == ["8080", "default_server"]]
    assert server.arg("client_max_body_size") == [str(_app_limit())]
    max_body = int(_read_env_file(CONFIG_ENV)["MAX_BODY_BYTES"])
    for name, body in _full_size_bodies(max_body).items():
        assert len(json.loads(body)["body"].encode()) == max_body, name
        assert len(body) <= _app_limit(), f"{name}: {len(body)} bytes over the app's limit"


class _Accepts(socketserver.StreamRequestHandler):
    """Stands in for the enqueue function: reads the whole body, answers 202 with its length."""

    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        length = next(
            int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
        )
        received = len(self.rfile.read(length))
        body = json.dumps({"received": received}).encode()
        self.wfile.write(
            b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )


def test_a_full_size_body_in_unicode_escapes_passes_the_gateway_to_the_function():
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Accepts)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    max_body = int(_read_env_file(CONFIG_ENV)["MAX_BODY_BYTES"])
    try:
        with gateway_to(upstream.server_address[1]) as port:
            for name, body in _full_size_bodies(max_body).items():
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                client.request("POST", "/api/v1/task/enqueue", body, {"Content-Type": "application/json"})
                response = client.getresponse()
                answer = response.read()
                client.close()
                assert response.status == 202, f"{name} ({len(body)} bytes): {response.status} {answer[:200]}"
                assert json.loads(answer)["received"] == len(body)
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_the_enqueue_function_accepts_a_full_size_body_spelt_in_unicode_escapes(api, user_token):
    """The other side of the agreement: what the gateway lets through, the function takes (202)."""
    _, token = user_token
    settings = Settings.from_env({})
    for name, body in _full_size_bodies(settings.max_body_bytes).items():
        response = api.post(
            "/api/v1/task/enqueue", data=body, content_type="application/json", headers=auth_header(token)
        )
        assert response.status_code == 202, f"{name}: {response.status_code} {response.get_data()[:200]}"


def test_the_batch_path_has_the_batch_functions_own_limit():
    (http_block,) = [d for d in parse_nginx(gen_gateway.render_nginx()) if d.name == "http"]
    (server,) = [s for s in http_block.all("server") if s.arg("listen") == ["8080", "default_server"]]
    (location,) = [d for d in server.all("location") if d.args == ["=", "/api/v1/task/enqueue/batch"]]
    assert location.arg("client_max_body_size") == [str(batch.request_limit(_cluster_ctx()))]
    assert batch.request_limit(_cluster_ctx()) > _app_limit()  # else it would need no location of its own


def test_a_batch_larger_than_a_single_enqueue_passes_the_gateway_and_one_over_its_limit_does_not():
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Accepts)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    body = b'{"tasks": []' + b" " * (_app_limit() + 1024) + b"}"
    over = b"{" + b" " * batch.request_limit(_cluster_ctx()) + b"}"
    statuses = {}
    try:
        with gateway_to(upstream.server_address[1]) as port:
            for name, path, data in [
                ("batch", "/api/v1/task/enqueue/batch", body),
                ("single", "/api/v1/task/enqueue", body),
                ("batch over", "/api/v1/task/enqueue/batch", over),
            ]:
                client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                client.request("POST", path, data, {"Content-Type": "application/json"})
                response = client.getresponse()
                statuses[name] = (response.status, response.getheader("Content-Type"))
                response.read()
                client.close()
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert statuses == {
        "batch": (202, None),
        "single": (413, "application/problem+json"),
        "batch over": (413, "application/problem+json"),
    }
