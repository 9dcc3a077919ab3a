"""Settings: built once per process from the environment and handed down.

This is the only module that reads ``os.environ``-style mappings; everything else receives a
``Settings``. Every field has a default and a one-line reason; docs/configuration.md's tables
mirror this file (a test keeps them in step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared import logs
from shared.errors import ConfigError

DEVELOPMENT = "development"
DEADLINE_SHARE_OF_LEASE = 0.8
PRODUCTION = "production"


def _bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _int(value: str, name: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


def _schedule(value: str, name: str) -> tuple[float, ...]:
    delays = tuple(_float(part.strip(), name) for part in value.split(",") if part.strip())
    if not delays:
        raise ConfigError(f"{name} must list at least one delay in seconds, got {value!r}")
    return delays


def _float(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{name} must not be negative, got {number}")
    return number


@dataclass(frozen=True)
class Settings:
    # --- where things live ---
    database_url: str = ""  # DATABASE_URL, postgresql+pg8000://user:pass@host:5432/db
    redis_url: str = ""  # REDIS_URL, redis://[:password@]host:6379/0 or unix:///path/redis.sock
    env: str = DEVELOPMENT  # MAILQ_ENV, development | production
    # DATABASE_SOCKET_TIMEOUT, seconds any one PostgreSQL socket operation may take: a connection gone
    # half-open (no reply, no reset) is given up after this; keep it well under 0.2 x TASK_LEASE_SECONDS
    database_socket_timeout: float = 60.0

    # --- auth ---
    jwt_secret: str = field(default="", repr=False)  # JWT_SECRET, HS256 key; >= 32 bytes outside development
    jwt_ttl_seconds: int = 3600  # JWT_TTL_SECONDS, lifetime of a login token
    bcrypt_rounds: int = 12  # BCRYPT_ROUNDS, cost of password hashing
    # MAILQ_ENCRYPTION_KEYS, comma-separated Fernet keys; the first encrypts, all decrypt (rotation)
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    rate_limit_per_email: int = 10  # RATE_LIMIT_PER_EMAIL, login/register attempts per minute per email
    rate_limit_per_client: int = 100  # RATE_LIMIT_PER_CLIENT, login/register attempts per minute per client
    smtp_check_rate_per_user: int = 6  # SMTP_CHECK_RATE_PER_USER, Test connection runs per minute per user
    trusted_proxy_hops: int = 0  # TRUSTED_PROXY_HOPS, X-Forwarded-For entries added by our own proxies
    # OPS_TOKEN, the operator's token for /ops (the queues and workers, read-only); unset: /ops is 404
    ops_token: str = field(default="", repr=False)

    # --- the pipeline ---
    max_try_count: int = 3  # MAX_TRY_COUNT, SMTP attempts before a task is cancelled
    queue_consumer_count: int = 4  # QUEUE_CONSUMER_COUNT, consumer threads in one consumer process
    worker_count: int = 32  # WORKER_COUNT, SMTP conversations (threads) one sender process holds at once
    retry_backoff_base: float = 30.0  # RETRY_BACKOFF_BASE, seconds before the first retry; doubles per try
    retry_backoff_max: float = 3600.0  # RETRY_BACKOFF_MAX, cap on the retry delay, seconds
    sweep_leak_window: int = 300  # SWEEP_LEAK_WINDOW, seconds a queued task may wait before re-enqueue
    # TASK_LEASE_SECONDS, how long a sender owns a claimed task; its SMTP conversation must end within
    # 0.8 of it (smtp_deadline), so a live sender's lease never runs out
    lease_seconds: int = 300
    heartbeat_ttl: int = 30  # WORKER_HEARTBEAT_TTL, seconds a silent worker is still considered alive
    heartbeat_file: str = "/tmp/mailq-heartbeat"  # MAILQ_HEARTBEAT_FILE, touched by a healthy worker  # noqa: S108
    sweep_batch: int = 1000  # SWEEP_BATCH, rows re-enqueued per statement of one sweep pass
    max_body_bytes: int = 1024 * 1024  # MAX_BODY_BYTES, largest mail body (text and HTML together) per mail
    # MAX_ATTACHMENT_BYTES, largest total of one mail's attachments, decoded
    max_attachment_bytes: int = 10 * 1024 * 1024
    max_batch: int = 500  # MAX_BATCH, most mails in one batch enqueue
    max_batch_bytes: int = 32 * 1024 * 1024  # MAX_BATCH_BYTES, largest batch enqueue request, bytes of JSON
    # SENDER_CONTENT_MEMORY, bytes one sender process lets large mails occupy at once (each weighs
    # shared.delivery.inflight.WEIGHT x its content); beyond it a large mail waits, small mails never do
    sender_content_memory: int = 160 * 1024 * 1024
    task_retention_days: int = (
        30  # TASK_RETENTION_DAYS, sent/cancelled tasks are deleted after this; 0 keeps all
    )

    # --- tenant bounds (shared/bounds.py; `mailq account limits` overrides them per account) ---
    max_pending_per_user: int = 100_000  # MAX_PENDING_PER_USER, a user's mails not yet sent or cancelled
    # MAX_PENDING_BYTES_PER_USER, content bytes (text, HTML, attachments) of those mails together
    max_pending_bytes_per_user: int = 1024**3
    enqueue_rate_per_user: float = 1000.0  # ENQUEUE_RATE_PER_USER, mails a user may enqueue per second
    enqueue_burst_per_user: int = 1000  # ENQUEUE_BURST_PER_USER, mails at once above the rate (>= MAX_BATCH)
    # PENDING_RECOUNT_SECONDS, how often at most a tenant at its pending limit is counted again exactly
    pending_recount_seconds: float = 10.0
    replay_rate_per_user: int = 60  # REPLAY_RATE_PER_USER, webhook replays a user may ask for per minute

    # --- SMTP ---
    smtp_timeout: float = 30.0  # SMTP_TIMEOUT, seconds for every SMTP socket operation
    smtp_idle_seconds: float = 30.0  # SMTP_IDLE_SECONDS, a reused SMTP connection is closed after this idle
    # SMTP_MAX_CONNECTIONS_PER_ACCOUNT, SMTP conversations at once per account across all senders, for
    # an account that declares no smtp_max_connections of its own
    smtp_max_connections_per_account: int = 3
    # SMTP_MAX_CONNECTIONS_PER_ACCOUNT_LIMIT, the most conversations an account may declare (the ceiling)
    smtp_max_connections_per_account_limit: int = 16
    # ACCOUNT_BACKOFF_BASE, seconds an account waits after the first thing its relay refused; doubles
    account_backoff_base: float = 1.0
    # ACCOUNT_BACKOFF_MAX, cap on an account's backoff, seconds (a quota reply waits for its window instead)
    account_backoff_max: float = 300.0
    # ACCOUNT_UNREACHABLE_BACKOFF_MAX, cap on the backoff of an account whose relay cannot be reached
    # (a refused or failed connection costs the relay nothing): a relay back from maintenance is found
    # within this many seconds, whatever the length of the outage
    account_unreachable_backoff_max: float = 60.0
    # MAX_QUEUE_LIFETIME, seconds a mail may wait from when it is due; then it is cancelled as expired
    max_queue_lifetime: int = 5 * 86400
    smtp_connection_max_age: float = 300.0  # SMTP_CONNECTION_MAX_AGE, seconds a pooled connection may live
    smtp_connection_max_messages: int = 100  # SMTP_CONNECTION_MAX_MESSAGES, mails over one connection at most
    smtp_allow_private_hosts: bool = True  # SMTP_ALLOW_PRIVATE_HOSTS, allow loopback/private SMTP hosts
    smtp_allow_insecure: bool = True  # SMTP_ALLOW_INSECURE, allow smtp_security=none (plaintext)

    # --- webhooks ---
    webhook_timeout: float = 10.0  # WEBHOOK_TIMEOUT, seconds one delivery request may take, on the whole
    # WEBHOOK_RETRY_SCHEDULE, seconds before each retry of a failed delivery (comma-separated); then failed
    webhook_retry_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    webhook_rotation_overlap: int = (
        86400  # WEBHOOK_ROTATION_OVERLAP, seconds a rotated-out secret still signs
    )
    webhook_allow_http: bool = True  # WEBHOOK_ALLOW_HTTP, allow http:// receiver URLs (not only https://)
    webhook_allow_private_hosts: bool = True  # WEBHOOK_ALLOW_PRIVATE_HOSTS, allow loopback/private receivers
    webhook_worker_count: int = 32  # WEBHOOK_WORKER_COUNT, requests one webhook worker has in flight at once
    # WEBHOOK_MAX_CONCURRENCY_PER_ENDPOINT, requests in flight at once to one endpoint across all workers
    webhook_max_concurrency_per_endpoint: int = 2
    # WEBHOOK_MAX_CONCURRENCY_PER_USER, requests in flight at once to all of one user's endpoints
    webhook_max_concurrency_per_user: int = 4

    log_level: str = "INFO"  # LOG_LEVEL, Python logging level name
    log_format: str = logs.TEXT  # LOG_FORMAT, json (one object per line) | text; json in production
    metrics_port: int = 9100  # METRICS_PORT, where a worker serves /metrics; 0 turns it off

    @property
    def is_production(self) -> bool:
        return self.env == PRODUCTION

    @property
    def smtp_deadline(self) -> float:
        """Seconds one whole SMTP conversation may take, from its claim: 0.8 of the lease, so the
        outcome is recorded before the lease runs out and the sweep never takes a live send back."""
        return self.lease_seconds * DEADLINE_SHARE_OF_LEASE

    @property
    def webhook_lease_seconds(self) -> int:
        """How long a webhook worker owns a delivery it is sending: twice the request's deadline plus
        room to record the outcome, so the sweep never hands a live request to a second worker."""
        return math.ceil(2 * self.webhook_timeout) + 5

    @property
    def webhook_max_attempts(self) -> int:
        """Attempts of one delivery: the first, then one per entry of the retry schedule."""
        return len(self.webhook_retry_schedule) + 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build and validate settings; raise ConfigError naming every problem found."""
        env = environ.get("MAILQ_ENV", DEVELOPMENT).strip().lower() or DEVELOPMENT
        if env not in (DEVELOPMENT, PRODUCTION):
            raise ConfigError(f"MAILQ_ENV must be {DEVELOPMENT} or {PRODUCTION}, got {env!r}")
        production = env == PRODUCTION

        def get(name: str, default: str) -> str:
            value = environ.get(name)
            return default if value is None or value == "" else value

        keys = tuple(k.strip() for k in get("MAILQ_ENCRYPTION_KEYS", "").split(",") if k.strip())
        settings = cls(
            database_url=get("DATABASE_URL", ""),
            redis_url=get("REDIS_URL", ""),
            env=env,
            database_socket_timeout=_float(get("DATABASE_SOCKET_TIMEOUT", "60"), "DATABASE_SOCKET_TIMEOUT"),
            jwt_secret=get("JWT_SECRET", ""),
            jwt_ttl_seconds=_int(get("JWT_TTL_SECONDS", "3600"), "JWT_TTL_SECONDS", 1),
            bcrypt_rounds=_int(get("BCRYPT_ROUNDS", "12"), "BCRYPT_ROUNDS", 4),
            encryption_keys=keys,
            rate_limit_per_email=_int(get("RATE_LIMIT_PER_EMAIL", "10"), "RATE_LIMIT_PER_EMAIL", 1),
            rate_limit_per_client=_int(get("RATE_LIMIT_PER_CLIENT", "100"), "RATE_LIMIT_PER_CLIENT", 1),
            smtp_check_rate_per_user=_int(
                get("SMTP_CHECK_RATE_PER_USER", "6"), "SMTP_CHECK_RATE_PER_USER", 1
            ),
            trusted_proxy_hops=_int(get("TRUSTED_PROXY_HOPS", "0"), "TRUSTED_PROXY_HOPS"),
            ops_token=get("OPS_TOKEN", ""),
            max_try_count=_int(get("MAX_TRY_COUNT", "3"), "MAX_TRY_COUNT", 1),
            queue_consumer_count=_int(get("QUEUE_CONSUMER_COUNT", "4"), "QUEUE_CONSUMER_COUNT", 1),
            worker_count=_int(get("WORKER_COUNT", "32"), "WORKER_COUNT", 1),
            retry_backoff_base=_float(get("RETRY_BACKOFF_BASE", "30"), "RETRY_BACKOFF_BASE"),
            retry_backoff_max=_float(get("RETRY_BACKOFF_MAX", "3600"), "RETRY_BACKOFF_MAX"),
            sweep_leak_window=_int(get("SWEEP_LEAK_WINDOW", "300"), "SWEEP_LEAK_WINDOW", 1),
            lease_seconds=_int(get("TASK_LEASE_SECONDS", "300"), "TASK_LEASE_SECONDS", 1),
            heartbeat_ttl=_int(get("WORKER_HEARTBEAT_TTL", "30"), "WORKER_HEARTBEAT_TTL", 2),
            heartbeat_file=get("MAILQ_HEARTBEAT_FILE", "/tmp/mailq-heartbeat"),  # noqa: S108
            sweep_batch=_int(get("SWEEP_BATCH", "1000"), "SWEEP_BATCH", 1),
            max_body_bytes=_int(get("MAX_BODY_BYTES", str(1024 * 1024)), "MAX_BODY_BYTES", 1),
            max_attachment_bytes=_int(
                get("MAX_ATTACHMENT_BYTES", str(10 * 1024 * 1024)), "MAX_ATTACHMENT_BYTES"
            ),
            max_batch=_int(get("MAX_BATCH", "500"), "MAX_BATCH", 1),
            max_batch_bytes=_int(get("MAX_BATCH_BYTES", str(32 * 1024 * 1024)), "MAX_BATCH_BYTES", 1024),
            sender_content_memory=_int(
                get("SENDER_CONTENT_MEMORY", str(160 * 1024 * 1024)), "SENDER_CONTENT_MEMORY", 1024 * 1024
            ),
            task_retention_days=_int(get("TASK_RETENTION_DAYS", "30"), "TASK_RETENTION_DAYS"),
            max_pending_per_user=_int(get("MAX_PENDING_PER_USER", "100000"), "MAX_PENDING_PER_USER"),
            max_pending_bytes_per_user=_int(
                get("MAX_PENDING_BYTES_PER_USER", str(1024**3)), "MAX_PENDING_BYTES_PER_USER"
            ),
            enqueue_rate_per_user=_float(get("ENQUEUE_RATE_PER_USER", "1000"), "ENQUEUE_RATE_PER_USER"),
            enqueue_burst_per_user=_int(get("ENQUEUE_BURST_PER_USER", "1000"), "ENQUEUE_BURST_PER_USER", 1),
            pending_recount_seconds=_float(get("PENDING_RECOUNT_SECONDS", "10"), "PENDING_RECOUNT_SECONDS"),
            replay_rate_per_user=_int(get("REPLAY_RATE_PER_USER", "60"), "REPLAY_RATE_PER_USER", 1),
            smtp_timeout=_float(get("SMTP_TIMEOUT", "30"), "SMTP_TIMEOUT"),
            smtp_idle_seconds=_float(get("SMTP_IDLE_SECONDS", "30"), "SMTP_IDLE_SECONDS"),
            smtp_max_connections_per_account=_int(
                get("SMTP_MAX_CONNECTIONS_PER_ACCOUNT", "3"), "SMTP_MAX_CONNECTIONS_PER_ACCOUNT", 1
            ),
            smtp_max_connections_per_account_limit=_int(
                get("SMTP_MAX_CONNECTIONS_PER_ACCOUNT_LIMIT", "16"),
                "SMTP_MAX_CONNECTIONS_PER_ACCOUNT_LIMIT",
                1,
            ),
            account_backoff_base=_float(get("ACCOUNT_BACKOFF_BASE", "1"), "ACCOUNT_BACKOFF_BASE"),
            account_backoff_max=_float(get("ACCOUNT_BACKOFF_MAX", "300"), "ACCOUNT_BACKOFF_MAX"),
            account_unreachable_backoff_max=_float(
                get("ACCOUNT_UNREACHABLE_BACKOFF_MAX", "60"), "ACCOUNT_UNREACHABLE_BACKOFF_MAX"
            ),
            max_queue_lifetime=_int(get("MAX_QUEUE_LIFETIME", str(5 * 86400)), "MAX_QUEUE_LIFETIME", 1),
            smtp_connection_max_age=_float(get("SMTP_CONNECTION_MAX_AGE", "300"), "SMTP_CONNECTION_MAX_AGE"),
            smtp_connection_max_messages=_int(
                get("SMTP_CONNECTION_MAX_MESSAGES", "100"), "SMTP_CONNECTION_MAX_MESSAGES", 1
            ),
            smtp_allow_private_hosts=_bool(
                get("SMTP_ALLOW_PRIVATE_HOSTS", "false" if production else "true"), "SMTP_ALLOW_PRIVATE_HOSTS"
            ),
            smtp_allow_insecure=_bool(
                get("SMTP_ALLOW_INSECURE", "false" if production else "true"), "SMTP_ALLOW_INSECURE"
            ),
            webhook_timeout=_float(get("WEBHOOK_TIMEOUT", "10"), "WEBHOOK_TIMEOUT"),
            webhook_retry_schedule=_schedule(
                get("WEBHOOK_RETRY_SCHEDULE", "5,300,1800,7200,18000,36000,36000"), "WEBHOOK_RETRY_SCHEDULE"
            ),
            webhook_rotation_overlap=_int(
                get("WEBHOOK_ROTATION_OVERLAP", "86400"), "WEBHOOK_ROTATION_OVERLAP"
            ),
            webhook_allow_http=_bool(
                get("WEBHOOK_ALLOW_HTTP", "false" if production else "true"), "WEBHOOK_ALLOW_HTTP"
            ),
            webhook_allow_private_hosts=_bool(
                get("WEBHOOK_ALLOW_PRIVATE_HOSTS", "false" if production else "true"),
                "WEBHOOK_ALLOW_PRIVATE_HOSTS",
            ),
            webhook_worker_count=_int(get("WEBHOOK_WORKER_COUNT", "32"), "WEBHOOK_WORKER_COUNT", 1),
            webhook_max_concurrency_per_endpoint=_int(
                get("WEBHOOK_MAX_CONCURRENCY_PER_ENDPOINT", "2"), "WEBHOOK_MAX_CONCURRENCY_PER_ENDPOINT", 1
            ),
            webhook_max_concurrency_per_user=_int(
                get("WEBHOOK_MAX_CONCURRENCY_PER_USER", "4"), "WEBHOOK_MAX_CONCURRENCY_PER_USER", 1
            ),
            log_level=get("LOG_LEVEL", "INFO").upper(),
            log_format=get("LOG_FORMAT", logs.JSON if production else logs.TEXT).strip().lower(),
            metrics_port=_int(get("METRICS_PORT", "9100"), "METRICS_PORT"),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings the service must not run with; the message names everything missing."""
        problems = []
        if self.retry_backoff_max < self.retry_backoff_base:
            problems.append("RETRY_BACKOFF_MAX must be at least RETRY_BACKOFF_BASE")
        if self.database_socket_timeout <= 0:
            problems.append("DATABASE_SOCKET_TIMEOUT must be more than 0 seconds")
        if self.smtp_timeout <= 0:
            problems.append("SMTP_TIMEOUT must be more than 0 seconds")
        if self.log_format not in logs.FORMATS:
            problems.append(f"LOG_FORMAT must be one of {', '.join(logs.FORMATS)}, got {self.log_format!r}")
        if self.metrics_port > 65535:
            problems.append(f"METRICS_PORT must be a port number (0 turns it off), got {self.metrics_port}")
        if self.webhook_timeout <= 0:
            problems.append("WEBHOOK_TIMEOUT must be more than 0 seconds")
        if self.smtp_connection_max_age <= 0:
            problems.append("SMTP_CONNECTION_MAX_AGE must be more than 0 seconds")
        if self.enqueue_rate_per_user <= 0:
            problems.append("ENQUEUE_RATE_PER_USER must be more than 0 mails per second")
        if self.enqueue_burst_per_user < self.max_batch:
            problems.append(
                "ENQUEUE_BURST_PER_USER must be at least MAX_BATCH (a full batch must fit a burst)"
            )
        if self.smtp_max_connections_per_account > self.smtp_max_connections_per_account_limit:
            problems.append(
                "SMTP_MAX_CONNECTIONS_PER_ACCOUNT must be at most SMTP_MAX_CONNECTIONS_PER_ACCOUNT_LIMIT"
            )
        if self.account_backoff_base <= 0 or self.account_backoff_max < self.account_backoff_base:
            problems.append("ACCOUNT_BACKOFF_BASE must be more than 0 and at most ACCOUNT_BACKOFF_MAX")
        if self.account_unreachable_backoff_max < self.account_backoff_base:
            problems.append("ACCOUNT_UNREACHABLE_BACKOFF_MAX must be at least ACCOUNT_BACKOFF_BASE")
        if self.is_production:
            if not self.jwt_secret:
                problems.append("JWT_SECRET is missing (at least 32 bytes are required in production)")
            elif len(self.jwt_secret.encode()) < 32:
                problems.append("JWT_SECRET is too short (at least 32 bytes are required in production)")
            if not self.encryption_keys:
                problems.append("MAILQ_ENCRYPTION_KEYS is missing (a Fernet key is required in production)")
            if self.ops_token and len(self.ops_token.encode()) < 32:
                problems.append("OPS_TOKEN is too short (at least 32 bytes in production, or leave it unset)")
            if not self.database_url:
                problems.append("DATABASE_URL is missing")
            if not self.redis_url:
                problems.append("REDIS_URL is missing")
        if problems:
            raise ConfigError("mailq refuses to start: " + "; ".join(problems))

    def replace(self, **changes) -> Settings:
        """A copy with some fields changed (tests and `mailq dev` use this)."""
        return dataclasses.replace(self, **changes)

    def require_runtime(self) -> None:
        """Raise ConfigError unless everything a serving process needs is present."""
        missing = [
            name
            for name, value in (
                ("DATABASE_URL", self.database_url),
                ("REDIS_URL", self.redis_url),
                ("JWT_SECRET", self.jwt_secret),
                ("MAILQ_ENCRYPTION_KEYS", self.encryption_keys),
            )
            if not value
        ]
        if missing:
            raise ConfigError("mailq refuses to start: missing " + ", ".join(missing))


def configure_logging(settings: Settings) -> None:
    """One log format for every mailq process (a no-op if logging is already configured)."""
    logs.configure(settings.log_level, settings.log_format)
