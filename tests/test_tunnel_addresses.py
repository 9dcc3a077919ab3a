"""IPv6 forms that wrap an IPv4 address or name a network of their own are judged by what they reach:
6to4 and NAT64 by the IPv4 address inside, Teredo, NAT64's local-use prefix and site-local refused. The same
rules hold for an SMTP host (register, PATCH, every send) and a webhook receiver (shared.hosts)."""

from __future__ import annotations

import pytest

from shared.errors import PermanentSmtpError
from shared.hosts import check_host_allowed, host_refusal_reason
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import GOOD, assert_problem, user_count

REFUSED = {
    "2002:7f00:1::": "6to4 address of a loopback",  # 6to4 of 127.0.0.1
    "2002:a00:1::": "6to4 address of a private",  # 6to4 of 10.0.0.1
    "2002:c0a8:101::1": "6to4 address of a private",  # 6to4 of 192.168.1.1
    "2002:a9fe:a9fe::": "6to4 address of a cloud metadata",  # 6to4 of 169.254.169.254
    "fec0::1": "site-local",
    "fec0:0:0:ffff::1": "site-local",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
    "2001:0:5ef5:79fb:0:59d:f5ff:f5ff": "Teredo",
    "64:ff9b::a00:1": "NAT64 address of a private",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1": "NAT64 address of a loopback",
    "64:ff9b:1::a00:1": "local-use NAT64",
}
# The same forms around a public IPv4 address (93.184.216.34) reach a public host: allowed.
ALLOWED = ["2002:5db8:d822::1", "64:ff9b::5db8:d822"]


@pytest.mark.parametrize(("address", "kind"), REFUSED.items(), ids=list(REFUSED))
def test_a_wrapped_private_or_tunnel_address_is_refused_as_an_smtp_host(address, kind):
    with pytest.raises(PermanentSmtpError, match="refused") as caught:
        check_host_allowed(address, 587, allow_private=False)
    assert kind in str(caught.value)
    assert kind in host_refusal_reason(address, 587, allow_private=False)
    check_host_allowed(address, 587, allow_private=True)  # local development allows private hosts


@pytest.mark.parametrize("address", ALLOWED)
def test_the_same_forms_around_a_public_address_are_allowed(address):
    check_host_allowed(address, 587, allow_private=False)


@pytest.fixture()
def production_hosts(monkeypatch):
    from functions import http

    monkeypatch.setenv("SMTP_ALLOW_PRIVATE_HOSTS", "false")
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE_HOSTS", "false")
    http.reset_context()


@pytest.mark.parametrize("address", ["2002:a00:1::", "fec0::1", "64:ff9b::7f00:1"])
def test_register_and_patch_refuse_a_wrapped_private_smtp_host(api, production_hosts, pg_url, address):
    body = assert_problem(api.post("/api/v1/register", json={**GOOD, "smtp_host": address}), 422)
    assert "refused" in body["errors"]["smtp_host"]
    assert user_count(pg_url) == 0
    user = register_user(api, smtp_host="93.184.216.34")
    headers = auth_header(login(api))
    answer = api.patch(
        f"/api/v1/user/{user['id']}",
        json={"smtp_host": address, "smtp-password": "smtp-secret-pw"},
        headers=headers,
    )
    assert "refused" in assert_problem(answer, 422)["errors"]["smtp_host"]
    assert api.get(f"/api/v1/user/{user['id']}", headers=headers).get_json()["smtp_host"] == "93.184.216.34"


@pytest.mark.parametrize("address", ["2002:a00:1::", "2002:7f00:1::", "fec0::1", "2001:0:4136:e378::1"])
def test_a_webhook_receiver_on_a_wrapped_private_address_is_refused(api, production_hosts, address):
    register_user(api, smtp_host="93.184.216.34")
    headers = auth_header(login(api))
    answer = api.post("/api/v1/webhooks", json={"url": f"https://[{address}]/hook"}, headers=headers)
    assert "refused" in assert_problem(answer, 422)["errors"]["url"]
    assert api.get("/api/v1/webhooks", headers=headers).get_json()["items"] == []
