"""A private Debian Postfix instance that relays everything to one SMTP port: the reference client.

    with PostfixInstance(relay_port=proxy.port, concurrency=3) as postfix:
        postfix.inject(mails)          # over SMTP, pipelined, to its own smtpd on a loopback port
        ...                            # the relay behind relay_port receives them

Why: Postfix is the sender every relay operator has tuned against, and the server many of them run. How
many mails/s it gets through a relay RTT milliseconds away, with the same number of connections, is the
figure mailq's sender is compared with (`make bench`, tests/bench/relay.py); its smtpd is a real server
to pipeline against (tests/test_postfix_pipelining.py). ``second_smtpd`` adds a second smtpd listener
(``second_port``) with its own ``-o`` overrides, e.g. one that does not offer PIPELINING.

The instance lives entirely in one directory DIR (a fresh ``mkdtemp`` under /tmp unless given): DIR/etc
holds main.cf and master.cf (``postfix -c DIR/etc``; it must not contain the queue, or ``postfix check``
warns about every queue directory not owned by root), DIR/spool the queue and the master's pid file,
DIR/data the data directory, DIR/maillog the log (maillog_file, written by postlogd; nothing goes to
syslog; maillog_file_prefixes must allow the path). Its smtpd listens on 127.0.0.1 only; nothing is delivered
locally (no mydestination, local_transport = error); everything goes to relayhost [127.0.0.1]:relay_port
(brackets: no MX or DNS lookup). No service is chrooted (Debian's default master.cf chroots most, which
would need copies of /etc files in the queue directory). stop() runs ``postfix -c DIR stop``, waits for
every process whose working directory is in DIR (Postfix daemons chdir to their queue directory) to end,
kills any that do not, and deletes DIR if it made it. Runs as root (Postfix's master must), with the
Debian package's ``postfix`` user and ``postdrop`` group.

Scheduling that could distort a throughput figure is turned off or down: in_flow_delay = 0 (cleanup would
otherwise pause injection up to 1 s per mail when arrivals outrun deliveries), queue_run_delay and the
backoff times = 1 s (only deferred mail waits for them), initial_destination_concurrency = the limit
(no slow start), smtp_connection_cache_on_demand stays on (connections are reused when mail queues up).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from tests.relays.pipelining_client import Mail, PipeliningClient

POSTFIX = "/usr/sbin/postfix"

# Debian's master.cf.proto, minus chroot, minus what is never used here (tlsmgr, virtual, lmtp, pipes).
_MASTER_CF = """\
{smtpd_address} inet n - n - - smtpd{second_smtpd}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _main_cf(directory: Path, relay_port: int, concurrency: int, extra: Mapping[str, str]) -> str:
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(directory / "spool"),
        "data_directory": str(directory / "data"),
        "maillog_file": str(directory / "maillog"),
        "maillog_file_prefixes": str(directory),  # default: /var, /dev/stdout
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "postfix.mailq.test",  # must differ from the relay's greeting name (loop check)
        "mydomain": "mailq.test",
        "myorigin": "$myhostname",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "none",
        "smtpd_tls_security_level": "none",
        "default_destination_concurrency_limit": str(concurrency),
        "smtp_destination_concurrency_limit": str(concurrency),
        "initial_destination_concurrency": str(concurrency),
        "in_flow_delay": "0s",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtpd_peername_lookup": "no",
        **extra,
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


class PostfixInstance:
    """A Postfix master with its own config and queue in ``directory``, relaying to relay_port."""

    def __init__(
        self,
        relay_port: int,
        *,
        concurrency: int = 3,
        directory: Path | None = None,
        smtpd_port: int = 0,
        extra: Mapping[str, str] | None = None,
        second_smtpd: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.relay_port = relay_port
        self.concurrency = concurrency
        self.directory = directory
        self.smtpd_port = smtpd_port
        self.extra = dict(extra or {})
        self.second_smtpd = None if second_smtpd is None else dict(second_smtpd)
        self.second_port = 0
        self.timeout = timeout
        self._made_directory = False
        self._running = False

    # --- life cycle ---

    def start(self) -> Self:
        """Write the configuration and start the master; return once its smtpd listens."""
        problems = preflight()
        if problems:
            raise RuntimeError("postfix cannot run here: " + "; ".join(problems))
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mailq-postfix-"))
            self._made_directory = True
        self.directory.mkdir(parents=True, exist_ok=True)
        _check_reachable(self.directory.resolve())
        for path in (self.directory, self.directory / "etc", self.directory / "spool"):
            # Root's, 0755: the postfix user must reach its queue, `postfix check` wants root as owner,
            # and the `postfix` command chdirs to the queue directory before it creates anything in it.
            path.mkdir(exist_ok=True)
            path.chmod(0o755)
        if not self.smtpd_port:
            self.smtpd_port = _free_port()
        etc = self.directory / "etc"
        (etc / "main.cf").write_text(_main_cf(self.directory, self.relay_port, self.concurrency, self.extra))
        second = ""
        if self.second_smtpd is not None:
            self.second_port = self.second_port or _free_port()
            overrides = "".join(f"\n  -o {key}={value}" for key, value in self.second_smtpd.items())
            second = f"\n127.0.0.1:{self.second_port} inet n - n - - smtpd{overrides}"
        (etc / "master.cf").write_text(
            _MASTER_CF.format(smtpd_address=f"127.0.0.1:{self.smtpd_port}", second_smtpd=second)
        )
        try:
            # start runs `postfix check` (creates the queue directories, fixes ownership) and then
            # `master -w`, which returns only once the master daemon is initialized and listening.
            self.postfix("start")
            self._running = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the master and its children, make sure none is left, and remove the directory if made."""
        if self.directory is None:
            return
        try:
            if self._running:
                self.postfix("stop")  # SIGTERM to the master; it waits up to 5 s, then kills the group
                self._running = False
            leftovers = _processes_in(self.directory)
            deadline = time.monotonic() + self.timeout
            while leftovers and time.monotonic() < deadline:
                time.sleep(0.05)  # children exiting after the master: no event to wait on from here
                leftovers = _processes_in(self.directory)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            if leftovers:
                raise RuntimeError(f"postfix processes outlived `postfix stop` and were killed: {leftovers}")
        finally:
            if self._made_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
                self._made_directory = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- using it ---

    def postfix(self, *args: str) -> str:
        """Run ``postfix -c DIR/etc args...`` and return its output (raising on failure)."""
        assert self.directory is not None
        return _run([POSTFIX, "-c", str(self.directory / "etc"), *args], self.timeout)

    def inject(self, mails: Sequence[Mail]) -> None:
        """Submit mails to the instance's smtpd over one pipelined connection (1 round trip per mail)."""
        with PipeliningClient("127.0.0.1", self.smtpd_port, timeout=self.timeout) as client:
            results = client.send_many(mails, chain=True)
        refused = [r for r in results if not r.ok]
        if refused:
            raise RuntimeError(f"postfix refused {len(refused)} of {len(mails)} mails: {refused[0]}")

    def queued(self) -> int:
        """Mails still in the queue (incoming, active, deferred, hold)."""
        assert self.directory is not None
        spool = self.directory / "spool"
        return sum(
            1
            for name in ("incoming", "active", "deferred", "hold")
            for p in (spool / name).rglob("*")
            if p.is_file()
        )

    def wait_for_empty_queue(self, timeout: float = 10.0) -> bool:
        """Whether the queue empties within timeout (a mail leaves it once its delivery agent reports
        back, RTT/2 after the relay's 250). Polls: Postfix offers no event to wait on."""
        deadline = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def log(self) -> str:
        assert self.directory is not None
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


def preflight() -> list[str]:
    """What would stop Postfix from running here (empty if nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (the master must start as root)")
    if not os.access(POSTFIX, os.X_OK):
        problems.append(f"{POSTFIX} is missing (apt-get install postfix)")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        problems.append("no 'postfix' user (mail_owner)")
    try:
        grp.getgrnam("postdrop")
    except KeyError:
        problems.append("no 'postdrop' group (setgid_group)")
    return problems


def _check_reachable(directory: Path) -> None:
    """The postfix user must be able to reach its queue: every directory above it must let others search
    it (pytest's tmp_path, under a 0700 directory, does not: Postfix's start then fails with a bare
    "mail system startup failed")."""
    for parent in directory.parents:
        if not parent.stat().st_mode & 0o001:
            raise RuntimeError(
                f"{parent} is not searchable by others: the postfix user cannot reach {directory}"
            )


def _run(argv: list[str], timeout: float) -> str:
    """Run a Postfix command under a pseudo-terminal: without one, it logs its errors (a fatal
    configuration error included) only to the maillog, which may not exist yet, and exits 1 in silence."""
    script = ["script", "--quiet", "--return", "--command", shlex.join(argv), "/dev/null"]
    done = subprocess.run(
        script, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is in directory (every Postfix daemon chdirs to its queue)."""
    pids = []
    root = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue  # gone, or a kernel thread
        if cwd == root or cwd.startswith(root + "/"):
            pids.append(int(entry.name))
    return pids


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
