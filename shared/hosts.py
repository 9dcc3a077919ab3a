"""Which hosts we may connect to: resolve a name once and refuse loopback, private, link-local and
cloud metadata addresses (SSRF), unless the deployment allows private hosts (local development).

The caller connects to exactly the addresses vetted here, so a second DNS answer cannot slip past.
"""

from __future__ import annotations

import ipaddress
import socket

from shared.errors import PermanentSmtpError, SmtpError, TransientSmtpError

# Both are link-local or unique-local anyway; named so the refusal message says what they are.
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for what in ("unspecified", "loopback", "link-local", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + what.replace("-", "_")):
            return f"a {what} address"
    # Catches shared address space (100.64.0.0/10, where Alibaba's metadata service lives) and the like.
    return None if ip.is_global else "not a globally routable address"


def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[tuple[int, tuple]]:
    """Resolve once and vet every address; the caller connects to exactly these (no second lookup)."""
    if not host or not 0 < port < 65536:
        raise PermanentSmtpError(f"invalid SMTP host or port: {host!r}:{port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        # A resolver that is down says EAI_AGAIN; that is worth retrying, a name that does not exist is not.
        error = TransientSmtpError if getattr(exc, "errno", None) == socket.EAI_AGAIN else PermanentSmtpError
        raise error(f"SMTP host {host!r} cannot be resolved: {reason}") from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not allow_private:
        for _, sockaddr in addresses:
            reason = _refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
            if reason:
                raise PermanentSmtpError(f"SMTP host {host!r} resolves to {sockaddr[0]}, {reason}; refused")
    return addresses


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
