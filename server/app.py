"""Builds the gRPC server (create_server) and runs it until SIGTERM/SIGINT (serve)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import peewee as pw
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from server import db as database
from server import limits, schema, tls
from server.auth import Authenticator, TokenFileError
from server.interceptors import RpcInterceptor
from server.metrics import RpcMetrics
from server.reflection import add_reflection
from server.servicer import EnrollmentServicer

log = logging.getLogger("enrollment.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    database_url: str = "sqlite:///enrollment.db"
    grace_seconds: float = 10.0
    max_workers: int = 16
    database_timeout: float = 5.0
    # Security, limits and operations (see README "Security" and "Operations").
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: str | None = None
    max_message_bytes: int = 64 * 1024
    max_concurrent_rpcs: int = 1000
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    keepalive_min_ping_interval: float = 10.0
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 30.0
    metrics_address: str | None = None


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what fixes it."""


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    metrics_port: int | None = None
    metrics_server: object | None = None

    def stop(self, grace: float | None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, and let in-flight ones finish within grace."""
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        return stopped


def check_schema() -> None:
    """Refuse a database whose schema is behind this code."""
    db = database.database.obj
    with db.connection_context():
        pending = schema.pending_migrations(db)
        unknown = schema.unknown_migrations(db)
    if pending:
        raise StartupError(
            f"database schema is behind this server ({len(pending)} pending migration(s), "
            f"first {pending[0]}); run `enrollment-server migrate` with the same "
            "--database-url (or `make migrate`), then start again"
        )
    if unknown:
        log.warning("database has migrations this server does not know: %s", ", ".join(unknown))


def create_server(config: ServerConfig) -> RunningServer:
    """Open the database, check its schema, and start serving; returns the bound port."""
    database.connect(
        config.database_url,
        max_connections=config.max_workers + 4,
        timeout=config.database_timeout,
    )
    try:
        return _start(config)
    except BaseException:
        database.close()
        raise


def _start(config: ServerConfig) -> RunningServer:
    try:
        check_schema()
    except pw.DatabaseError as exc:
        raise StartupError(f"cannot read the database schema: {exc}") from exc

    try:
        limits.check(config)
        credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        auth = Authenticator.from_file(config.auth_tokens) if config.auth_tokens else None
    except (limits.LimitsError, tls.TlsConfigError, TokenFileError) as exc:
        raise StartupError(str(exc)) from exc
    metrics = RpcMetrics(database.connections_in_use) if config.metrics_address else None

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        interceptors=[RpcInterceptor(authenticator=auth, metrics=metrics)],
        options=limits.grpc_options(config),
        # Beyond this many calls at once grpc answers RESOURCE_EXHAUSTED at once;
        # up to it, calls beyond max_workers wait in the executor's queue.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    pb_grpc.add_EnrollmentServiceServicer_to_server(EnrollmentServicer(), server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    add_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    try:
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise StartupError(f"cannot listen on {config.address}: in use or not a local address")
    if credentials is None and not tls.is_loopback(config.address):
        log.warning(
            "serving PLAINTEXT on %s, which is not a loopback address: anyone on the "
            "network can read and alter calls (and bearer tokens); use --tls-cert/--tls-key",
            config.address,
        )
    running = RunningServer(server, port, health_servicer)
    if metrics is not None:
        try:
            running.metrics_server, _ = metrics.serve(config.metrics_address)
        except (OSError, ValueError) as exc:
            server.stop(None)
            raise StartupError(f"cannot serve metrics on {config.metrics_address}: {exc}") from exc
        running.metrics_port = running.metrics_server.server_port
    server.start()
    return running


def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and close the database."""
    running = create_server(config)
    log.info("serving %s on port %d (%s)", SERVICE_NAME, running.port, config.address)

    def shutdown(signum, _frame):
        log.info(
            "%s: draining in-flight calls (grace %.1fs)",
            signal.Signals(signum).name,
            config.grace_seconds,
        )
        running.stop(config.grace_seconds)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    running.server.wait_for_termination()
    database.close()
    log.info("stopped")
