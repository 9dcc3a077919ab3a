"""The security rules (docs/architecture.md, "Secrets and access") that the API tests do not already
cover: no secret in a database dump, in the logs of a full `mailq dev` run or in Redis; SSRF refused at
send time too (DNS may change after register); SMTP smuggling through the body; rate limits across
separate API processes.

Tokens (alg none, wrong key, expired, tampered, deleted user), user A vs B and SSRF at register for IP
literals live in tests/test_accounts_api.py and tests/test_tasks_api.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis
import sqlalchemy as sa

from shared import queue
from shared.local.embedded import free_port
from shared.local.sink import count_message_ids
from tests.chaos.audit import secrets_found
from tests.conftest import auth_header, login
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import GOOD, assert_problem, user_count

# --- a full `mailq dev` run: register, login, enqueue, deliver — with every output captured -------

USERS = [
    {
        "email": "alice@example.com",
        "password": "alice-Login-Pw-7311",
        "smtp-username": "alice-smtp",
        "smtp-password": "alice-SMTP-Pw-9140",
    },
    {
        "email": "bob@example.com",
        "password": "bob-Login-Pw-5528",
        "smtp-username": "bob-smtp",
        "smtp-password": "bob-SMTP-Pw-3377",
    },
]
WRONG_PASSWORD = "wrong-Login-Pw-0042"
REJECTED_PASSWORD = "rejected-Login-Pw-8861"  # sent with a register that fails validation


def call(base: str, method: str, path: str, body=None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def scan_redis(client: redis.Redis) -> dict[str, object]:
    """Every key with its value, whatever its type."""
    found: dict[str, object] = {}
    for key in client.scan_iter("*"):
        name = key.decode()
        kind = client.type(key).decode()
        if kind == "list":
            found[name] = client.lrange(key, 0, -1)
        elif kind == "zset":
            found[name] = ("zset", client.zrange(key, 0, -1))
        elif kind == "set":
            found[name] = ("set", sorted(client.smembers(key)))
        elif kind == "hash":
            found[name] = client.hgetall(key)
        elif kind == "string":
            found[name] = client.get(key)
        else:
            found[name] = f"<{kind}>"
    return found


@pytest.fixture(scope="module")
def dev_run(tmp_path_factory):
    """`mailq dev` at LOG_LEVEL=DEBUG doing a whole day's work; what it left behind, for the tests below."""
    import tempfile

    # Not under pytest's tmp dir (mode 0700): pgserver runs postgres as another user when we are root.
    data_dir = Path(tempfile.mkdtemp(prefix="mailq-security-")) / "data"
    data_dir.parent.chmod(0o755)
    output = data_dir.parent / "dev-output.log"
    port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "MAILQ_", "JWT_"))}
    env.update(BCRYPT_ROUNDS="4", LOG_LEVEL="DEBUG", MAILQ_HEARTBEAT_FILE=str(data_dir.parent / "beat"))
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "functions.cli",
                "dev",
                "--port",
                str(port),
                "--smtp-port",
                str(smtp_port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    found: dict = {"base": base, "data_dir": data_dir}
    try:
        wait_for(
            lambda: b"mailq is ready" in output.read_bytes() or process.poll() is not None, 120, "mailq dev"
        )
        assert process.poll() is None, output.read_text()[-3000:]
        children = psutil.Process(process.pid).children(recursive=True)
        # redis-server rewrites its title to "redis-server 127.0.0.1:<port>"
        title = next(" ".join(c.cmdline()) for c in children if "redis-server" in c.name())
        redis_port = int(re.search(r":(\d+)", title).group(1))
        consumer = next(c for c in children if c.cmdline()[-1:] == ["consumer"])
        found["redis"] = redis.Redis(port=redis_port)

        tokens = []
        for user in USERS:
            body = {**user, "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_security": "none"}
            status, created = call(base, "POST", "/api/v1/register", body)
            assert status == 201, created
            assert call(base, "POST", "/api/v1/register", body)[0] == 409  # the same again: a conflict
            assert (
                call(base, "POST", "/api/v1/login", {"email": user["email"], "password": WRONG_PASSWORD})[0]
                == 401
            )
            status, session = call(
                base, "POST", "/api/v1/login", {"email": user["email"], "password": user["password"]}
            )
            assert status == 200
            tokens.append(session["token"])
        bad = {**USERS[0], "email": "carol@example.com", "password": REJECTED_PASSWORD, "smtp_port": 0}
        assert call(base, "POST", "/api/v1/register", bad)[0] == 422
        found["tokens"] = tokens

        def enqueue(token, n, tag):
            for i in range(n):
                mail = {
                    "recipient_email": f"r{i}.{tag}@example.org",
                    "subject": f"{tag} {i}",
                    "body": f"body {i}",
                }
                assert call(base, "POST", "/api/v1/task/enqueue", mail, token)[0] == 202

        enqueue(tokens[0], 10, "a")
        enqueue(tokens[1], 10, "b")
        assert call(base, "GET", "/api/v1/task/1", token=tokens[1])[0] == 404  # alice's task, bob's token
        assert call(base, "GET", "/api/v1/task/queue", token=tokens[0] + "x")[0] == 401
        wait_for(lambda: sum(count_message_ids(data_dir).values()) >= 20, 60, "20 mails at the sink")

        consumer.send_signal(signal.SIGSTOP)  # envelopes pile up in Redis while we look at them
        try:
            enqueue(tokens[0], 5, "held")
            found["redis_mid_run"] = scan_redis(found["redis"])
        finally:
            consumer.send_signal(signal.SIGCONT)
        wait_for(lambda: sum(count_message_ids(data_dir).values()) >= 25, 60, "25 mails at the sink")
        time.sleep(1.5)  # let the last outcomes and heartbeats land
        found["redis_after"] = scan_redis(found["redis"])

        pid_lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
        found["pg_socket_dir"] = pid_lines[4]
        found["dump"] = pg_dump(pid_lines[4])
        secrets = json.loads((data_dir / "dev-secrets.json").read_text())
        found["secrets"] = secrets
    finally:
        if "redis" in found:
            found["redis"].close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    found["exit_code"] = process.returncode
    logs = [output.read_text(errors="replace")]
    for extra in (data_dir / "postgres" / "log", data_dir / "redis" / "redis.log"):
        if extra.exists():
            logs.append(extra.read_text(errors="replace"))
    found["logs"] = "\n".join(logs)
    yield found
    import shutil

    shutil.rmtree(data_dir.parent, ignore_errors=True)


def pg_dump(socket_dir: str) -> str:
    """A plain-text dump of the whole database with pgserver's own pg_dump."""
    import importlib.util

    # The binary only: importing pgserver would make platformdirs warn (and warnings are errors here).
    binary = Path(importlib.util.find_spec("pgserver").origin).parent / "pginstall" / "bin" / "pg_dump"
    result = subprocess.run(
        [str(binary), "-h", socket_dir, "-U", "postgres", "--no-owner", "postgres"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def secrets_of_the_run(run) -> dict[str, str]:
    named = {"JWT secret": run["secrets"]["jwt_secret"], "encryption key": run["secrets"]["encryption_key"]}
    for user, token in zip(USERS, run["tokens"], strict=True):
        named[f"password of {user['email']}"] = user["password"]
        named[f"SMTP password of {user['email']}"] = user["smtp-password"]
        named[f"token of {user['email']}"] = token
        # SMTP AUTH PLAIN carries "\0username\0password" in base64; LOGIN carries the password alone.
        plain = f"\0{user['smtp-username']}\0{user['smtp-password']}"
        named[f"AUTH PLAIN of {user['email']}"] = base64.b64encode(plain.encode()).decode()
    named["a wrong login password"] = WRONG_PASSWORD
    named["the password of a refused register"] = REJECTED_PASSWORD
    return named


def test_the_dev_run_went_through_and_stopped_cleanly(dev_run):
    assert dev_run["exit_code"] == 0
    assert "POST /api/v1/task/enqueue -> 202" in dev_run["logs"]  # the logs are the real thing
    assert "Traceback" not in dev_run["logs"]


def test_a_database_dump_holds_no_password_in_clear(dev_run):
    dump = dev_run["dump"]
    assert "alice@example.com" in dump and "gAAAAA" in dump  # a real dump, with Fernet tokens in it
    leaked = secrets_found(dump, {k: v for k, v in secrets_of_the_run(dev_run).items() if "AUTH" not in k})
    assert leaked == []
    assert "$2b$" in dump  # login passwords are bcrypt hashes


def test_the_logs_of_a_full_run_hold_no_password_token_or_key(dev_run):
    logs = dev_run["logs"]
    assert "DEBUG" in logs  # everything a process can say was said
    assert secrets_found(logs, secrets_of_the_run(dev_run)) == []


ENVELOPE = re.compile(rb'^\{"v":1,"task_id":[1-9][0-9]*\}$')
KNOWN_KEYS = re.compile(
    r"^mailq:(tasks|send:ready|send:bell(:.+)?|send:q:\d+|slots:\d+|paused|workers|processing:.+|heartbeat:.+"
    r"|webhooks:(ready|bell|returned|q:\d+|slots:\d+)"
    r"|tenant:\d+|tenant:\d+:inflight"
    r"|ratelimit:(login|register):(client|email):[^:]+:\d+|ratelimit:replay:user:\d+:\d+"
    r"|account:\d+(:ok)?|send:hold|limit:\d+:\d+:[mrl])$"
)
WORKER_ID = rb"(consumer|sender|webhooks):[^:]+:\d+:[0-9a-f]{8}"


def envelopes_in(snapshot: dict[str, object]) -> list[bytes]:
    """Every envelope Redis holds: in the task list, tenants' queues and processing lists."""
    found = []
    for key, value in snapshot.items():
        if key in (queue.TASK_LIST,) or key.startswith("mailq:processing:"):
            found += value
        elif key.startswith(queue.SEND_QUEUE_PREFIX):
            found += value[1]
    return found


@pytest.mark.parametrize("moment", ["redis_mid_run", "redis_after"])
def test_redis_holds_only_envelopes_and_mailqs_own_bookkeeping(dev_run, moment):
    snapshot = dev_run[moment]
    assert set(snapshot) <= {k for k in snapshot if KNOWN_KEYS.match(k)}, sorted(snapshot)
    envelopes = envelopes_in(snapshot)
    assert all(ENVELOPE.match(e) for e in envelopes), envelopes[:5]
    if moment == "redis_mid_run":
        assert len(envelopes) >= 5  # the held mails were there, as envelopes and nothing else
    for key, value in snapshot.items():
        if key == queue.WORKERS:
            assert set(value.values()) <= {queue.TASK_LIST.encode(), queue.WEBHOOK_RETURNED.encode()}
        elif key in (queue.SEND_READY, queue.PAUSED):  # tenants are user ids, never an address
            assert all(v.isdigit() for v in (value if key == queue.SEND_READY else value[1]))
        elif key.startswith(queue.SEND_BELL):  # the senders' bell, and each sender's own
            assert set(value) <= {b"1"}
        elif key.startswith(queue.SLOTS_PREFIX):
            # holders: a worker id and the envelope it holds, or "~", a worker id and the number of an
            # idle connection in its pool
            holder = WORKER_ID + rb":" + ENVELOPE.pattern[1:-1]
            idle = rb"~" + WORKER_ID + rb":[1-9][0-9]*"
            assert all(re.fullmatch(holder, v) or re.fullmatch(idle, v) for v in value[1])
        elif key.startswith("mailq:heartbeat:"):
            assert value == b"1"
        elif key.startswith("mailq:ratelimit:"):
            assert value.isdigit()
            assert "@" not in key  # emails are hashed in rate-limit keys
        elif key.startswith("mailq:tenant:") and key.endswith(":inflight"):  # "count:bytes:id" per admission
            assert all(re.fullmatch(rb"\d+:\d+:[0-9a-f]{32}", v) for v in value[1])
        elif key.startswith("mailq:tenant:"):  # the enqueue bounds: numbers only (shared/bounds.py)
            assert all(re.fullmatch(rb"-?[0-9.e+]*", v) for v in value.values()), value
        elif key.startswith(queue.ACCOUNT_PREFIX) and key.endswith(":ok"):  # answers per 100 ms
            assert all(k.isdigit() and v.isdigit() for k, v in value.items())
        elif key.startswith(queue.ACCOUNT_PREFIX):  # an account's pace: small numbers and words
            assert all(
                re.fullmatch(rb"[a-z_]+", k) and re.fullmatch(rb"[a-z0-9:,_]*", v) for k, v in value.items()
            )
        elif key == queue.SEND_HOLD:
            assert all(v.isdigit() for v in value[1])
    everything = repr(snapshot)
    secrets = {k: v for k, v in secrets_of_the_run(dev_run).items() if "AUTH" not in k}
    assert secrets_found(everything, secrets) == []
    assert "example.org" not in everything and "body " not in everything  # no recipient, no body


# --- SSRF: checked again when the mail goes out ---------------------------------------------------


@pytest.fixture()
def production_send(ctx):
    """The pipeline harness with the SMTP rules of production: no private hosts, no plaintext."""
    ctx.settings = ctx.settings.replace(smtp_allow_private_hosts=False, smtp_allow_insecure=False)
    p = Pipeline(ctx)
    yield p
    p.close()


def test_a_loopback_host_accepted_in_development_is_refused_by_a_production_sender(ctx, base_env, tmp_path):
    pipe = Pipeline(ctx)  # development rules at register: private hosts allowed
    try:
        with ScriptedSmtpServer() as smtp:
            user = pipe.user(
                smtp, smtp_security="starttls"
            )  # plaintext would be refused first, for another reason
            task_id = pipe.enqueue(user)
            assert pipe.consumer.step(0.1)
            env = {
                **os.environ,
                **base_env,
                "MAILQ_ENV": "production",
                "LOG_LEVEL": "WARNING",
                "MAILQ_HEARTBEAT_FILE": str(tmp_path / "beat"),
            }
            sender = subprocess.Popen(
                [sys.executable, "-m", "functions.cli", "sender"],
                env=env,
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                # The account cannot send as configured on this deployment: it pauses, its mail waits.
                wait_for(lambda: paused_reason(pipe, user.id), 30, "the account to be paused")
            finally:
                sender.send_signal(signal.SIGTERM)
                out, _ = sender.communicate(timeout=30)
            reason = paused_reason(pipe, user.id)
            assert "loopback" in reason and "refused" in reason, reason
            row = pipe.task(task_id)
            assert row.status == "queued" and row.try_count == 0  # nothing claimed, no try spent
            assert smtp.connections == 0 and smtp.received == []
            assert sender.returncode == 0, out
    finally:
        pipe.close()


def paused_reason(pipe, user_id: int) -> str | None:
    with pipe.ctx.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT smtp_paused_reason FROM users WHERE id = :id"), {"id": user_id}
        ).scalar_one()


REBINDING_HOST = "smtp.rebinding.test"
PUBLIC_ADDRESS = "93.184.216.34"


@pytest.fixture()
def fake_dns(monkeypatch):
    """REBINDING_HOST resolves to whatever ``answer`` holds now; every other name resolves as usual.
    Any attempt to connect to an SMTP server is recorded and refused, so a failing check sends nothing."""
    answer = {"addresses": [PUBLIC_ADDRESS]}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != REBINDING_HOST:
            return real(host, port, *args, **kwargs)
        out = []
        for address in answer["addresses"]:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out

    connects: list = []

    def no_connect(self, host, port, timeout):
        connects.append((host, port, list(self.addresses)))
        raise OSError("this test connects nowhere")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr("shared.delivery.smtp.PinnedSMTP._get_socket", no_connect)
    answer["connects"] = connects
    return answer


REFUSED_AT_SEND = {
    "127.0.0.1": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",
    "10.0.0.7": "private",
    "192.168.1.20": "private",
    "172.16.5.4": "private",
    "169.254.169.254": "metadata",
    "fd00:ec2::254": "metadata",
    "169.254.10.10": "link-local",
    "100.100.100.200": "not a globally routable",
    "0.0.0.0": "unspecified",
}


def test_dns_that_changes_after_register_is_checked_again_at_send(
    api, monkeypatch, fake_dns, production_send
):
    from functions import http

    monkeypatch.setenv("SMTP_ALLOW_PRIVATE_HOSTS", "false")
    monkeypatch.setenv("SMTP_ALLOW_INSECURE", "false")
    http.reset_context()
    body = {**GOOD, "email": "rebind@example.com", "smtp_host": REBINDING_HOST, "smtp_port": 587}
    response = api.post("/api/v1/register", json=body)
    assert response.status_code == 201, response.get_json()  # public at register time
    headers = auth_header(login(api, "rebind@example.com", GOOD["password"]))
    pipe = production_send
    user_id = response.get_json()["id"]
    for address, kind in REFUSED_AT_SEND.items():
        fake_dns["addresses"] = [PUBLIC_ADDRESS]  # the user saves the settings again: resumed
        resumed = api.patch(f"/api/v1/user/{user_id}", json={"smtp_host": REBINDING_HOST}, headers=headers)
        assert resumed.status_code == 200 and resumed.get_json()["smtp_state"]["state"] == "active"
        fake_dns["addresses"] = [address]
        mail = {"recipient_email": "bob@example.org", "subject": address, "body": "x"}
        task_id = api.post("/api/v1/task/enqueue", json=mail, headers=headers).get_json()["task_id"]
        pipe.pump()
        row = pipe.task(task_id)
        assert row.status == "queued" and row.try_count == 0, (address, row.status, row.last_error)
        reason = paused_reason(pipe, user_id)  # the account waits for settings it may use
        assert kind in reason and "refused" in reason, (address, reason)
        shown = api.get(f"/api/v1/task/{task_id}", headers=headers).get_json()
        assert shown["last_error"] == row.last_error  # the user sees why
    assert fake_dns["connects"] == []


@pytest.mark.parametrize(
    "addresses",
    [
        ["169.254.169.254"],
        ["10.1.2.3"],
        ["fe80::1"],
        ["fc00::5"],
        [PUBLIC_ADDRESS, "127.0.0.1"],
        ["::ffff:10.0.0.1"],
    ],
    ids=["metadata", "private", "link-local-v6", "unique-local-v6", "mixed-answer", "ipv4-mapped"],
)
def test_a_name_resolving_to_a_private_address_is_refused_at_register(
    api, monkeypatch, fake_dns, pg_url, addresses
):
    from functions import http

    monkeypatch.setenv("SMTP_ALLOW_PRIVATE_HOSTS", "false")
    http.reset_context()
    fake_dns["addresses"] = addresses
    response = api.post("/api/v1/register", json={**GOOD, "smtp_host": REBINDING_HOST})
    body = assert_problem(response, 422)
    assert "smtp_host" in body["errors"] and "refused" in body["errors"]["smtp_host"]
    # The address the name resolved to is ours to know: a caller could map the internal network with it.
    assert ip_literals(response.get_data(as_text=True)) == []
    assert user_count(pg_url) == 0


def ip_literals(text: str) -> list[str]:
    """Every IPv4 or IPv6 address written in ``text``."""
    found = []
    for candidate in re.findall(r"[0-9A-Fa-f:.]{2,}", text):
        for form in (candidate, candidate.rstrip(".:")):  # "… 10.0.0.1." ends a sentence
            try:
                ipaddress.ip_address(form)
            except ValueError:
                continue
            found.append(form)
            break
    return found


# --- SMTP smuggling through the body --------------------------------------------------------------

SMUGGLING_BODIES = [
    "Hi\r\n.\r\nMAIL FROM:<eve@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    "Subject: smuggled\r\n\r\nx\r\n.\r\n",
    "Hi\n.\nMAIL FROM:<eve@example.org>\nRCPT TO:<victim@example.org>\nDATA\nsmuggled\n.\n",
    "Hi\r.\rMAIL FROM:<eve@example.org>\rRCPT TO:<victim@example.org>\rDATA\rsmuggled\r.\r",
    "Hi\n.\r\nMAIL FROM:<eve@example.org>\r\n",
    ".\r\n",
    "..\r\n.\r\n..",
]


def test_a_body_with_a_lone_dot_line_arrives_whole_as_one_message(ctx):
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer() as smtp:
            user = pipe.user(smtp)
            ids = [
                pipe.enqueue(user, body=body, subject=f"smuggle {i}")
                for i, body in enumerate(SMUGGLING_BODIES)
            ]
            pipe.pump()
            assert all(pipe.task(i).status == "sent" for i in ids)
            assert smtp.data_attempts == len(SMUGGLING_BODIES)
            assert len(smtp.received) == len(SMUGGLING_BODIES)
            assert all(r.rcpt_tos == ["bob@example.org"] for r in smtp.received)
            for received, body in zip(smtp.received, SMUGGLING_BODIES, strict=True):
                text = received.message.get_content()
                # Line ends become CRLF on the wire (and \n here); the words all arrive, in the body.
                assert re.sub(r"\r\n|\r|\n", "\n", body).rstrip("\n") in text.replace("\r\n", "\n"), (
                    body,
                    text,
                )
    finally:
        pipe.close()


# --- rate limits across separate API processes ----------------------------------------------------


def _serve(env: dict, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "functions.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--threads",
            "2",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def test_rate_limits_hold_across_two_api_processes_with_two_workers_each(base_env, clean):
    env = {
        **os.environ,
        **base_env,
        "RATE_LIMIT_PER_EMAIL": "4",
        "RATE_LIMIT_PER_CLIENT": "6",
        "LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    servers = [_serve(env, p) for p in ports]
    try:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for base in bases:
            wait_for(lambda b=base: _alive(b), 60, f"{base} to answer")
        if time.time() % 60 > 50:  # both phases must fall in one fixed one-minute window
            time.sleep(61 - time.time() % 60)

        # per email: login attempts for one address, spread over both processes (and their workers)
        statuses = []
        for i in range(8):
            body = {"email": "target@example.com", "password": "wrong-password"}
            statuses.append(call(bases[i % 2], "POST", "/api/v1/login", body)[0])
        assert statuses == [401] * 4 + [429] * 4, statuses

        # per client: registrations of different addresses, each claiming another X-Forwarded-For
        statuses = []
        for i in range(9):
            request = urllib.request.Request(
                bases[i % 2] + "/api/v1/register",
                data=json.dumps({**GOOD, "email": f"user{i}@example.com"}).encode(),
                headers={"Content-Type": "application/json", "X-Forwarded-For": f"203.0.113.{i}"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
                    statuses.append(response.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
                if err.code == 429:
                    assert 1 <= int(err.headers["Retry-After"]) <= 61
        assert statuses == [201] * 6 + [429] * 3, statuses
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            server.wait(30)


def _alive(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz/live", timeout=2):  # noqa: S310 - loopback only
            return True
    except OSError:
        return False
