"""The server's configuration: every setting with its default, checked before anything starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    database_url: str = "sqlite:///enrollment.db"
    grace_seconds: float = 10.0
    # Threads share one GIL: past a few, each SQLite call's GIL hand-off costs more CPU
    # than the extra thread gains (figures: bench/PROFILE.md, "Figures behind code
    # comments"). More cores: serve more processes.
    max_workers: int = 4
    # Seconds a call waits for a lock or a new connection, and a statement may run.
    database_timeout: float = 5.0
    # Connections per process; None: as many as max_workers (never fewer).
    pool_size: int | None = None
    # Seconds a call waits for a free pooled connection before UNAVAILABLE.
    pool_timeout: float = 5.0
    # Server processes sharing the port (SO_REUSEPORT); 1 serves in this process.
    workers: int = 1
    # Seconds between the health probe's SELECT 1.
    health_interval: float = 1.0
    # Set in worker processes: share the port with the other workers.
    reuse_port: bool = False

    # Security, limits and operations (see README "Security" and "Operations").
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: str | None = None
    # Wrong tokens one peer address may send at once, then per second (a token bucket);
    # beyond it the address's calls are RESOURCE_EXHAUSTED until its bucket refills.
    auth_failure_burst: int = 20
    auth_failure_rate: float = 2.0
    max_message_bytes: int = 64 * 1024
    max_concurrent_rpcs: int = 1000
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    keepalive_min_ping_interval: float = 10.0
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 30.0
    metrics_address: str | None = None
    # What one client can hold (README "Operations"): seconds a call's request message
    # may take to arrive; streams at once per connection (HTTP/2 MAX_CONCURRENT_STREAMS);
    # seconds a new connection gets for its TLS handshake and HTTP/2 preface; seconds a
    # connection may stay open with no call; connections at once (None: what the
    # process's descriptor limit leaves after a reserve for the database and logs).
    request_timeout: float = 5.0
    max_streams_per_connection: int = 100
    handshake_timeout: float = 5.0
    max_connection_idle: float = 300.0
    max_connections: int | None = None
    # Seconds a successful call's request_id record is kept (AIP-155: at least 24 h).
    request_id_retention: float = 24 * 3600.0

    @property
    def connections(self) -> int:
        return self.pool_size or self.max_workers

    def check(self) -> None:
        """Raise StartupError for values no server can run with."""
        if self.max_workers < 1 or self.workers < 1:
            raise StartupError("--max-workers and --workers must be 1 or more")
        if self.pool_size is not None and self.pool_size < self.max_workers:
            raise StartupError(
                f"--pool-size {self.pool_size} is below --max-workers {self.max_workers}: "
                "every serving thread needs a connection"
            )
        if min(self.database_timeout, self.pool_timeout, self.health_interval) <= 0:
            raise StartupError(
                "--database-timeout, --pool-timeout and the health interval must be above 0"
            )
        if self.auth_failure_burst < 1 or self.auth_failure_rate <= 0:
            raise StartupError(
                "--auth-failure-burst must be 1 or more, --auth-failure-rate above 0"
            )
        if self.request_id_retention <= 0:
            raise StartupError("--request-id-retention must be above 0")
        if self.grace_seconds < 0:
            raise StartupError("--grace must be 0 or more")


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what fixes it."""
