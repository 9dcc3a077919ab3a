"""Real SMTP servers (aiosmtpd) for tests, with scripted replies, and a throwaway certificate authority.

    with ScriptedSmtpServer(["451 4.3.0 try later", "250 OK"]) as server:
        ...  # connect to server.host:server.port
        assert server.connections == 1 and len(server.messages) == 1

Each DATA takes the next scripted reply; once the script is used up every DATA gets "250 OK".
The reply ``DROP`` records the message and then hangs up without answering: the lost final reply.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DROP = "DROP"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (aiosmtpd's Controller cannot be given port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage


class _Handler:
    def __init__(self, server: ScriptedSmtpServer):
        self.server = server

    async def handle_EHLO(self, smtp, session, envelope, hostname, responses):
        session.host_name = hostname  # aiosmtpd leaves this to a handler with this hook
        if not self.server.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]  # aiosmtpd reads pipelined input fine

    async def handle_MAIL(self, smtp, session, envelope, address, mail_options):
        refusal = self.server.refuse_senders.get(address)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RSET(self, smtp, session, envelope):
        with self.server._lock:
            self.server.resets += 1
        return "250 OK"

    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        refusal = self.server.refuse.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp, session, envelope):
        server = self.server
        with server._lock:
            server.data_attempts += 1
            server.in_data += 1
            server.max_in_data = max(server.max_in_data, server.in_data)
        try:
            # A slow server: DATA is answered only once the gate is open, and after the delay.
            while not server.gate.is_set():
                await asyncio.sleep(0.01)
            if server.delay:
                await asyncio.sleep(server.delay)
        finally:
            with server._lock:
                server.in_data -= 1
        with server._lock:
            reply = server._script.pop(0) if server._script else "250 OK"
        if reply == DROP or reply.startswith("2"):
            raw = envelope.original_content
            message = message_from_bytes(raw, policy=default_policy)
            with server._lock:
                server.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), raw, message))
        if reply == DROP:
            smtp.transport.close()
            await asyncio.sleep(3600)  # connection_lost cancels this; no reply ever goes out
        return reply


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP that tells its server when a client connects and disconnects."""

    def __init__(self, server: ScriptedSmtpServer, *args, **kwargs):
        self._scripted = server
        super().__init__(*args, **kwargs)

    def connection_made(self, transport):
        fresh = self._original_transport is None  # STARTTLS calls this again for the same client
        super().connection_made(transport)
        if fresh:
            with self._scripted._lock:
                self._scripted.connections += 1
                self._scripted._open.add(self)

    def connection_lost(self, error):
        with self._scripted._lock:
            self._scripted._open.discard(self)
        super().connection_lost(error)


class _Controller(Controller):
    def __init__(self, server: ScriptedSmtpServer, **kwargs):
        self._scripted = server
        super().__init__(_Handler(server), **kwargs)

    def factory(self):
        return _CountingSMTP(self._scripted, self.handler, **self.SMTP_kwargs)


class ScriptedSmtpServer:
    """An aiosmtpd server on 127.0.0.1 answering DATA from a script and counting connections.

    tls_context offers STARTTLS with that server context; with implicit_tls=True it speaks TLS from the
    first byte instead. auth(username, password) -> bool turns AUTH on (also without TLS).
    smtputf8=False hides SMTPUTF8 (aiosmtpd offers it by default); refuse maps a recipient address to
    the reply its RCPT TO gets instead of 250, refuse_senders a sender address to its MAIL FROM's.
    pipelining=True offers PIPELINING (aiosmtpd answers pipelined commands in order, but does not say
    so by itself); like any careful server it answers DATA with 503 when no recipient was accepted.
    """

    def __init__(
        self,
        replies: Iterable[str] = (),
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        auth: Callable[[str, str], bool] | None = None,
        smtputf8: bool = True,
        refuse: dict[str, str] | None = None,
        refuse_senders: dict[str, str] | None = None,
        pipelining: bool = False,
    ):
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0  # TCP connections accepted since start()
        self.data_attempts = 0  # DATA commands answered, whatever the reply
        self.received: list[Received] = []  # messages answered with 2xx (or DROP)
        self.logins: list[tuple[str, bool]] = []  # (username, accepted)
        self.gate = threading.Event()  # DATA waits until this is set (it is, unless a test clears it)
        self.gate.set()
        self.delay = 0.0  # seconds every DATA waits before it is answered
        self.in_data = 0  # DATA commands being answered right now
        self.max_in_data = 0  # the most DATA commands answered at once
        self._script = list(replies)
        self._lock = threading.Lock()
        self._open: set[_CountingSMTP] = set()
        self._tls_context = tls_context
        self._implicit_tls = implicit_tls
        self._auth = auth
        self._smtputf8 = smtputf8
        self.refuse = dict(refuse or {})
        self.refuse_senders = dict(refuse_senders or {})
        self.pipelining = pipelining
        self.resets = 0  # RSET commands answered
        self._controller: _Controller | None = None

    @property
    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [r.message for r in self.received]

    @property
    def open_connections(self) -> int:
        """Clients connected right now."""
        with self._lock:
            return len(self._open)

    def script(self, *replies: str) -> None:
        """Append replies for the next DATA commands."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> ScriptedSmtpServer:
        kwargs: dict = {"server_hostname": "mx.test", "ready_timeout": 5.0}
        if self._implicit_tls:
            kwargs["ssl_context"] = self._tls_context
        elif self._tls_context is not None:
            kwargs["tls_context"] = self._tls_context
        if self._auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        kwargs["enable_SMTPUTF8"] = self._smtputf8
        self.port = free_port(self.host)
        self._controller = _Controller(self, hostname=self.host, port=self.port, **kwargs)
        self._controller.start()
        with self._lock:
            self.connections = 0  # start() itself connects once to check the server is up
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> ScriptedSmtpServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def drop_connections(self, timeout: float = 2.0) -> None:
        """Hang up on every connected client (as a server's idle timeout does) and wait until it is done."""
        assert self._controller is not None
        with self._lock:
            protocols = list(self._open)
        for protocol in protocols:
            if protocol.transport is not None:
                self._controller.loop.call_soon_threadsafe(protocol.transport.close)
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self._open, "the server did not close its connections"

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        username, password = auth_data.login.decode(), auth_data.password.decode()
        accepted = bool(self._auth(username, password))
        with self._lock:
            self.logins.append((username, accepted))
        # handled=False makes aiosmtpd send its standard "535 5.7.8 Authentication credentials invalid".
        return AuthResult(success=accepted, handled=False)


@dataclass
class CertificateAuthority:
    """A certificate authority made for one test run, and server contexts with certificates it signed."""

    ca_path: Path
    _key: ec.EllipticCurvePrivateKey
    _cert: x509.Certificate
    _directory: Path

    def server_context(self, names: Iterable[str] = ("localhost", "127.0.0.1")) -> ssl.SSLContext:
        """A server-side SSLContext whose certificate (signed by this CA) is valid for names."""
        names = list(names)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(names[0], key, self._cert.subject, self._key, names=names, ca=False)
        return _server_context(self._directory, cert, key, f"server-{cert.serial_number:x}")


def make_test_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """Write a fresh CA to directory/ca.pem; return its path and a server context for localhost/127.0.0.1."""
    ca = make_ca(directory)
    return ca.ca_path, ca.server_context()


def make_ca(directory: Path) -> CertificateAuthority:
    """A fresh CA whose certificate is at ca.ca_path (for ssl.create_default_context(cafile=...))."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailq test CA")])
    cert = _certificate("mailq test CA", key, name, key, names=[], ca=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(ca_path, key, cert, directory)


def make_self_signed_context(
    directory: Path, names: Iterable[str] = ("localhost", "127.0.0.1")
) -> ssl.SSLContext:
    """A server context with a self-signed certificate: no client trusts it by default."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(names)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = _certificate(names[0], key, subject, key, names=names, ca=False)
    return _server_context(directory, cert, key, "self-signed")


def _certificate(common_name, key, issuer, issuer_key, *, names, ca) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        alt = [_alt_name(n) for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False).add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _server_context(directory: Path, cert, key, stem: str) -> ssl.SSLContext:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context
