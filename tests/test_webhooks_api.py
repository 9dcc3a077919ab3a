"""The webhook endpoints' API through every function (the dev dispatcher): create, list, delete, rotate,
the delivery log and replay; another user's endpoint or delivery is a 404; the receiver URL gets the SMTP
host's SSRF rules."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from shared.webhooks.worker import WebhookWorker
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem
from tests.test_security import REBINDING_HOST, ip_literals
from tests.webhook_receiver import WebhookReceiver

URL = "https://hooks.example.com/mailq"


@pytest.fixture()
def fake_dns(monkeypatch):
    """REBINDING_HOST resolves to whatever ``answer["addresses"]`` holds now; other names as usual."""
    answer = {"addresses": ["93.184.216.34"]}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != REBINDING_HOST:
            return real(host, port, *args, **kwargs)
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [
            (family[":" in a], socket.SOCK_STREAM, 6, "", (a, port, 0, 0) if ":" in a else (a, port))
            for a in answer["addresses"]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answer


@pytest.fixture()
def two_users(api):
    register_user(api)
    register_user(api, email="eve@example.com")
    return auth_header(login(api)), auth_header(login(api, "eve@example.com"))


def create(api, headers, **body):
    return api.post("/api/v1/webhooks", json={"url": URL, **body}, headers=headers)


def endpoint_count(pg_url) -> int:
    from shared.db import engine_for

    with engine_for(pg_url).connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM webhook_endpoints")).scalar_one()


def test_create_shows_the_secret_once_and_list_never(api, two_users):
    ada, _ = two_users
    response = create(api, ada, events=["task.cancelled", "task.sent", "task.sent"], secret="whsec_mine")
    assert response.status_code == 201 and response.headers["Cache-Control"] == "no-store"
    created = response.get_json()
    assert created["secret"].startswith("whsec_") and created["enabled"] is True
    assert created["secret"] != "whsec_mine"  # a member it does not know is ignored; the secret is ours
    assert created["events"] == ["task.sent", "task.cancelled"]  # each once, in a fixed order
    everything = create(api, ada).get_json()
    assert everything["events"] == [
        "task.sent",
        "task.deferred",
        "task.cancelled",
        "account.paused",
        "account.resumed",
        "account.backing_off",
    ]
    listed = api.get("/api/v1/webhooks", headers=ada)
    assert listed.status_code == 200
    items = listed.get_json()["items"]
    assert [i["id"] for i in items] == [created["id"], everything["id"]]
    assert "secret" not in listed.get_data(as_text=True) and created["secret"] not in listed.get_data(
        as_text=True
    )


def test_another_users_endpoint_and_deliveries_are_404(api, two_users, pg_url):
    ada, eve = two_users
    mine = create(api, ada).get_json()["id"]
    assert api.get("/api/v1/webhooks", headers=eve).get_json() == {"items": []}
    for method, path in (
        ("DELETE", f"/api/v1/webhooks/{mine}"),
        ("POST", f"/api/v1/webhooks/{mine}/rotate"),
        ("GET", f"/api/v1/webhooks/{mine}/deliveries"),
        ("POST", f"/api/v1/webhooks/{mine}/deliveries/1/replay"),
        ("DELETE", "/api/v1/webhooks/999999"),
    ):
        assert_problem(api.open(path, method=method, headers=eve), 404)
    assert endpoint_count(pg_url) == 1
    for path in ("/api/v1/webhooks", f"/api/v1/webhooks/{mine}/deliveries"):
        assert_problem(api.get(path), 401)


def test_delete_is_204_and_then_404(api, two_users, pg_url):
    ada, _ = two_users
    mine = create(api, ada).get_json()["id"]
    response = api.delete(f"/api/v1/webhooks/{mine}", headers=ada)
    assert response.status_code == 204 and response.get_data() == b""
    assert_problem(api.delete(f"/api/v1/webhooks/{mine}", headers=ada), 404)
    assert endpoint_count(pg_url) == 0


def test_rotate_answers_a_new_secret_and_when_the_old_one_stops_signing(api, two_users):
    ada, _ = two_users
    created = create(api, ada).get_json()
    response = api.post(f"/api/v1/webhooks/{created['id']}/rotate", headers=ada)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    rotated = response.get_json()
    assert rotated["secret"] != created["secret"] and rotated["secret"].startswith("whsec_")
    assert rotated["previous_secret_expires_at"] > rotated["created_at"]


def test_a_user_may_have_ten_endpoints(api, two_users, pg_url):
    ada, eve = two_users
    for _ in range(10):
        assert create(api, ada).status_code == 201
    assert_problem(create(api, ada), 409)
    assert create(api, eve).status_code == 201  # the limit is per user
    assert endpoint_count(pg_url) == 11


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": None}, "url"),
        ({"url": 42}, "url"),
        ({"url": "ftp://hooks.example.com/"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/"}, "url"),
        ({"url": "https://hooks.example.com/a b"}, "url"),
        ({"url": "https://hooks.example.com/\r\nX-Evil: 1"}, "url"),
        ({"url": "https://hooks.example.com/#frag"}, "url"),
        ({"url": "https://bad_host!/"}, "url"),
        ({"url": "https://hooks.example.com:99999/"}, "url"),
        ({"url": "https://hooks.example.com/" + "x" * 2100}, "url"),
        ({"events": []}, "events"),
        ({"events": "task.sent"}, "events"),
        ({"events": ["task.opened"]}, "events"),
        ({"events": [1]}, "events"),
    ],
)
def test_a_bad_endpoint_is_a_422_naming_the_field(api, two_users, pg_url, body, field):
    ada, _ = two_users
    problem = assert_problem(create(api, ada, **body), 422)
    assert field in problem["errors"], problem
    assert endpoint_count(pg_url) == 0


@pytest.fixture()
def production_rules(monkeypatch):
    from functions import http

    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE_HOSTS", "false")
    monkeypatch.setenv("WEBHOOK_ALLOW_HTTP", "false")
    http.reset_context()


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://0.0.0.0/hook",
    ],
)
def test_a_receiver_on_a_private_address_is_refused_without_saying_which(
    api, two_users, production_rules, pg_url, url
):
    ada, _ = two_users
    problem = assert_problem(create(api, ada, url=url), 422)
    assert "refused" in problem["errors"]["url"]
    assert endpoint_count(pg_url) == 0


@pytest.mark.parametrize("addresses", [["10.1.2.3"], ["93.184.216.34", "127.0.0.1"], ["fd00:ec2::254"]])
def test_a_name_resolving_to_a_private_address_is_refused_at_create(
    api, two_users, production_rules, fake_dns, addresses
):
    ada, _ = two_users
    fake_dns["addresses"] = addresses
    response = create(api, ada, url=f"https://{REBINDING_HOST}/hook")
    problem = assert_problem(response, 422)
    assert "refused" in problem["errors"]["url"]
    assert ip_literals(response.get_data(as_text=True)) == []  # our network is not mapped through the API


def test_http_is_refused_outside_development(api, two_users, production_rules):
    ada, _ = two_users
    problem = assert_problem(create(api, ada, url="http://hooks.example.com/"), 422)
    assert "https" in problem["errors"]["url"]


def test_dns_that_changes_after_create_is_checked_again_at_delivery(ctx, fake_dns):
    """Public at create; a private address at delivery: refused, nothing connects, retried later."""
    from shared.tasks import events
    from shared.webhooks.receiver import Receiver

    receiver = Receiver(timeout=1.0, allow_http=False, allow_private=False)
    try:
        for address in ("127.0.0.1", "10.0.0.7", "169.254.169.254", "::1"):
            fake_dns["addresses"] = [address]
            answer = receiver.post(
                f"https://{REBINDING_HOST}/hook", b"{}", events.headers("msg_1", 1, b"{}", [])
            )
            assert answer.status is None and "refused" in answer.error, answer
            assert address not in answer.error
    finally:
        receiver.close()


# --- the delivery log and replay ----------------------------------------------------------------------------


def test_the_delivery_log_pages_newest_first_and_a_replay_sends_the_same_webhook_id(api, two_users, ctx):
    from shared.delivery.sender import Sender
    from shared.tasks import events
    from tests.pipeline import Pipeline
    from tests.smtp_servers import ScriptedSmtpServer

    ada, _ = two_users
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[500]) as receiver:
        created = create(api, ada, url=receiver.url).get_json()
        with ctx.engine.begin() as conn:  # ada's SMTP account is this test's server
            conn.execute(sa.text("UPDATE users SET smtp_port = :p, smtp_username = ''"), {"p": smtp.port})
        pipe = Pipeline(ctx)
        hooks = WebhookWorker(
            ctx.settings.replace(webhook_retry_schedule=(0,)), ctx.engine, ctx.redis, ctx.box
        )
        try:
            for i in range(3):
                assert (
                    api.post(
                        "/api/v1/task/enqueue",
                        json={"recipient_email": "bob@example.org", "subject": f"s{i}", "body": "x"},
                        headers=ada,
                    ).status_code
                    == 202
                )
            pipe.pump()
            assert isinstance(pipe.sender, Sender)
            while hooks.step():
                pass
            base = f"/api/v1/webhooks/{created['id']}/deliveries"
            first = api.get(base + "?limit=2", headers=ada).get_json()
            rest = api.get(f"{base}?limit=2&cursor={first['next_cursor']}", headers=ada).get_json()
            log = first["items"] + rest["items"]
            assert rest["next_cursor"] is None and [d["id"] for d in log] == [3, 2, 1]
            oldest = log[-1]
            assert oldest["state"] == "delivered" and oldest["attempts"] == 2 and oldest["last_status"] == 200
            assert oldest["event_type"] == "task.sent" and oldest["next_attempt_at"] is None
            assert oldest["webhook_id"] == receiver.requests[0].headers["webhook-id"]
            assert_problem(api.get(base + "?cursor=nope", headers=ada), 422)

            replayed = api.post(f"{base}/{oldest['id']}/replay", headers=ada)
            assert replayed.status_code == 202
            again = replayed.get_json()
            assert again["state"] == "pending" and again["webhook_id"] == oldest["webhook_id"]
            assert_problem(api.post(f"{base}/{again['id']}/replay", headers=ada), 409)  # still pending
            assert_problem(api.post(f"{base}/999/replay", headers=ada), 404)
            while hooks.step():
                pass
            last = receiver.requests[-1]
            assert last.headers["webhook-id"] == oldest["webhook_id"]
            assert last.verified(created["secret"])["type"] == events.SENT
            assert api.get(base + "?limit=1", headers=ada).get_json()["items"][0]["state"] == "delivered"
        finally:
            hooks.close()
            pipe.close()


# --- PATCH: enable, disable, a new URL, other events ----------------------------------------------------


def test_patch_changes_only_the_members_given_and_answers_the_endpoint_without_its_secret(api, two_users):
    ada, _ = two_users
    created = create(api, ada).get_json()
    one = f"/api/v1/webhooks/{created['id']}"
    response = api.patch(one, json={"enabled": False}, headers=ada)
    assert response.status_code == 200
    disabled = response.get_json()
    assert disabled["enabled"] is False and disabled["disabled_reason"] == "disabled by the user"
    assert disabled["url"] == URL and "secret" not in disabled
    moved = api.patch(one, json={"url": URL + "/v2", "events": ["task.sent"]}, headers=ada).get_json()
    assert (moved["url"], moved["events"], moved["enabled"]) == (URL + "/v2", ["task.sent"], False)
    enabled = api.patch(one, json={"enabled": True}, headers=ada).get_json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None
    listed = api.get("/api/v1/webhooks", headers=ada).get_json()["items"]
    assert listed == [enabled]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "enabled"),
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": None}, "enabled"),
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "https://hooks.example.com/x#fragment"}, "url"),
        ({"url": None}, "url"),
        ({"events": []}, "events"),
        ({"events": None}, "events"),
        ({"events": ["task.opened"]}, "events"),
        ({"enabled": True, "url": 5}, "url"),
    ],
)
def test_a_bad_patch_is_a_422_naming_the_member_and_changes_nothing(api, two_users, body, field):
    ada, _ = two_users
    created = create(api, ada).get_json()
    problem = assert_problem(api.patch(f"/api/v1/webhooks/{created['id']}", json=body, headers=ada), 422)
    assert field in problem["errors"], problem
    unchanged = {k: v for k, v in created.items() if k != "secret"}
    assert api.get("/api/v1/webhooks", headers=ada).get_json()["items"] == [unchanged]


def test_another_users_endpoint_cannot_be_patched(api, two_users):
    ada, eve = two_users
    created = create(api, ada).get_json()
    assert_problem(api.patch(f"/api/v1/webhooks/{created['id']}", json={"enabled": False}, headers=eve), 404)
    assert_problem(api.patch(f"/api/v1/webhooks/{created['id']}", json={"enabled": False}), 401)
    assert api.get("/api/v1/webhooks", headers=ada).get_json()["items"][0]["enabled"] is True
