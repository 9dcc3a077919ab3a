"""Which hosts we may connect to: resolve a name once and refuse loopback, private, link-local and
cloud metadata addresses (SSRF), unless the deployment allows private hosts (local development).

One set of rules for every host a user gives us: the SMTP server (shared.delivery.mailer, register and
PATCH /user) and the webhook receiver (shared.webhooks.endpoints at create, shared.webhooks.receiver at every
delivery). The caller connects to exactly the addresses vetted here, so a second DNS answer cannot
slip past.
"""

from __future__ import annotations

import ipaddress
import socket

from shared.errors import HostError, PermanentSmtpError, SmtpError, TransientSmtpError

# Both are link-local or unique-local anyway; named so the refusal message says what they are.
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}

# What a caller is told when its host resolves to an address we refuse: not which address, or the API
# would let anyone map our internal network.
PRIVATE_HOST_REFUSED = (
    "resolves to an address that is not public (private, loopback, link-local, metadata or reserved); "
    "refused on this deployment"
)


# IPv6 forms that carry an IPv4 address or name a network of their own, decided here rather than left
# to the ipaddress module, whose verdicts on them change between Python releases:
# - 6to4 (2002::/16) and NAT64's well-known prefix (64:ff9b::/96) are routed to the IPv4 address they
#   wrap, so they are judged by that address (a NAT64 address of a public host is how an IPv6-only
#   network with DNS64 reaches it, so it stays allowed);
# - Teredo (2001::/32) is a tunnel to a client behind NAT: its IPv4 parts are a relay and an obfuscated
#   client, never a server of ours to reach, so every Teredo address is refused;
# - NAT64's local-use prefix (64:ff9b:1::/48) has no fixed place for the IPv4 address: refused;
# - site-local (fec0::/10) is deprecated but still routed inside some networks: refused.
_TEREDO = ipaddress.ip_network("2001::/32")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _TEREDO:
            return "a Teredo tunnel address"
        elif ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        elif ip in _SITE_LOCAL:
            return "a site-local address"
        elif ip in _NAT64:
            inner = _refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"a NAT64 address of {inner}" if inner else None
        elif ip.sixtofour is not None:
            inner = _refusal(ip.sixtofour)
            if inner:
                return f"a 6to4 address of {inner}"
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for what in ("unspecified", "loopback", "link-local", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + what.replace("-", "_")):
            return f"a {what} address"
    # Catches shared address space (100.64.0.0/10, where Alibaba's metadata service lives) and the like.
    return None if ip.is_global else "not a globally routable address"


def vet(host: str, port: int, *, allow_private: bool, what: str = "host") -> list[tuple[int, tuple]]:
    """Resolve once and vet every address; the caller connects to exactly these (no second lookup).

    Raises HostError naming ``what`` (e.g. "SMTP host", "webhook host")."""
    if not host or not 0 < port < 65536:
        raise HostError(f"invalid {what} or port: {host!r}:{port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        # A resolver that is down says EAI_AGAIN; that is worth retrying, a name that does not exist is not.
        transient = getattr(exc, "errno", None) == socket.EAI_AGAIN
        raise HostError(f"{what} {host!r} cannot be resolved: {reason}", transient=transient) from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not allow_private:
        for _, sockaddr in addresses:
            reason = _refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
            if reason:
                raise HostError(f"{what} {host!r} resolves to {sockaddr[0]}, {reason}; refused", refused=True)
    return addresses


def refusal_for_caller(host: str, port: int, *, allow_private: bool, what: str = "host") -> str | None:
    """Why a user's host is refused, in words fit for a 422, or None when it is acceptable.

    A name that does not resolve is reported as such; one that resolves to a refused address is not
    told which address (PRIVATE_HOST_REFUSED). Allowed private hosts are not even resolved: local
    development accepts any well-formed name.
    """
    if allow_private:
        return None
    try:
        vet(host, port, allow_private=False, what=what)
    except HostError as exc:
        return PRIVATE_HOST_REFUSED if exc.refused else exc.message
    return None


# --- the SMTP flavour: the same rules, failures as SmtpErrors (the mailer classifies those) ---------


def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[tuple[int, tuple]]:
    """vet() for an SMTP host: TransientSmtpError when the resolver is down, else PermanentSmtpError."""
    try:
        return vet(host, port, allow_private=allow_private, what="SMTP host")
    except HostError as exc:
        raise (TransientSmtpError if exc.transient else PermanentSmtpError)(exc.message) from None


def check_host_allowed(host: str, port: int, *, allow_private: bool) -> None:
    """Raise PermanentSmtpError when the host does not resolve or points somewhere we must not connect."""
    resolve_checked(host, port, allow_private=allow_private)


def host_refusal_reason(host: str, port: int, *, allow_private: bool) -> str | None:
    """Why the host is refused, in words fit for a 422, or None when it is acceptable."""
    try:
        resolve_checked(host, port, allow_private=allow_private)
    except SmtpError as exc:
        return exc.message
    return None
