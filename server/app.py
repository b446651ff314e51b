"""Builds the gRPC server (create_server) and runs it until SIGTERM/SIGINT (serve)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for_exit

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
    # Threads share one GIL: past a few, each SQLite call's GIL hand-off costs more CPU
    # than the extra thread gains (make bench --threads-check 4: read +56% calls/s,
    # mixed p99 42 -> 16 ms against 16 threads). More cores: serve more processes.
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
    max_message_bytes: int = 64 * 1024
    max_concurrent_rpcs: int = 1000
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    keepalive_min_ping_interval: float = 10.0
    max_connection_age: float = 1800.0
    max_connection_age_grace: float = 30.0
    metrics_address: str | None = None

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
        if self.grace_seconds < 0:
            raise StartupError("--grace must be 0 or more")


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what fixes it."""


class HealthMonitor:
    """Probes the database every interval on a connection of its own, and reports the
    server NOT_SERVING while the probe fails, SERVING again once it succeeds."""

    def __init__(self, servicer: health.HealthServicer, config: ServerConfig) -> None:
        self._servicer = servicer
        self._interval = config.health_interval
        # The probe gives up well within one interval or two, whatever the database does.
        self._probe = database.probe_database(
            config.database_url, timeout=min(config.database_timeout, max(1.0, self._interval))
        )
        self._stopped = threading.Event()
        self._serving = True
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._probe_until_stopped()
        finally:
            self._probe.close()  # the connection belongs to this thread: closed here

    def _probe_until_stopped(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                database.ping(self._probe)
                ok, reason = True, ""
            except Exception as exc:  # noqa: BLE001 - any failure means "not serving"
                ok, reason = False, str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if ok != self._serving and not self._stopped.is_set():
                self._serving = ok
                state = health_pb2.HealthCheckResponse.SERVING
                if not ok:
                    state = health_pb2.HealthCheckResponse.NOT_SERVING
                    database.discard_idle()
                    log.warning("database unreachable, health NOT_SERVING: %s", reason)
                else:
                    log.info("database reachable again, health SERVING")
                for name in ("", SERVICE_NAME):
                    self._servicer.set(name, state)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval + 5)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    monitor: HealthMonitor | None = None
    metrics_port: int | None = None
    metrics_server: object | None = None
    executor: futures.ThreadPoolExecutor | None = None

    def wait_idle(self) -> None:
        """After stop: wait until no handler thread runs any more. grpc stops answering
        at the end of the grace period, but a handler still inside its transaction runs
        on; the database is closed only after it has finished (or rolled back)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    def stop(self, grace: float | None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, and let in-flight ones finish within grace."""
        if self.monitor is not None:
            self.monitor.stop()
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


def open_database(config: ServerConfig) -> None:
    """Bind the models to this process's pool (each worker opens its own after the fork)."""
    database.connect(
        config.database_url,
        max_connections=config.connections,
        timeout=config.database_timeout,
        pool_timeout=config.pool_timeout,
        statement_timeout=config.database_timeout,
    )


def create_server(config: ServerConfig) -> RunningServer:
    """Open the database, check its schema, and start serving; returns the bound port."""
    config.check()
    open_database(config)
    try:
        return _start(config)
    except BaseException:
        database.close()
        raise


def _checked_schema() -> None:
    try:
        check_schema()
    except (pw.DatabaseError, pw.InterfaceError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"cannot read the database schema: {reason}") from exc


def _start(config: ServerConfig) -> RunningServer:
    _checked_schema()

    try:
        limits.check(config)
        credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        auth = Authenticator.from_file(config.auth_tokens) if config.auth_tokens else None
    except (limits.LimitsError, tls.TlsConfigError, TokenFileError) as exc:
        raise StartupError(str(exc)) from exc
    metrics = RpcMetrics(database.connections_in_use) if config.metrics_address else None

    executor = futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc")
    server = grpc.server(
        executor,
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
    running = RunningServer(server, port, health_servicer, executor=executor)
    if metrics is not None:
        try:
            running.metrics_server, _ = metrics.serve(config.metrics_address)
        except (OSError, ValueError) as exc:
            server.stop(None)
            raise StartupError(f"cannot serve metrics on {config.metrics_address}: {exc}") from exc
        running.metrics_port = running.metrics_server.server_port
    server.start()
    running.monitor = HealthMonitor(health_servicer, config)
    running.monitor.start()
    return running


def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and close the database."""
    config.check()
    if config.workers > 1:
        sys.exit(serve_workers(config))
    running = create_server(config)
    log.info("serving %s on port %d (%s)", SERVICE_NAME, running.port, config.address)
    _serve_until_signalled(running, config)


def _serve_until_signalled(running: RunningServer, config: ServerConfig) -> None:
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
    running.wait_idle()
    database.close()
    log.info("stopped")


# --------------------------------------------------------------------------- workers
# As in grpc's examples/python/multiprocessing: the parent forks before any gRPC
# object exists, and each worker builds its own server, thread pool and database pool.


def serve_workers(config: ServerConfig) -> int:
    """Run config.workers server processes on one port; returns the exit status.

    SIGTERM/SIGINT to the parent drains and stops every worker (exit 0). A worker
    that dies on its own is reported, the others are stopped, and the parent exits 1:
    the supervisor (systemd, Docker, Kubernetes) restarts the whole server, rather
    than this process hiding a crash loop.
    """
    # The schema is checked once, here, so a database behind the code is one clear error.
    open_database(config)
    try:
        _checked_schema()
    finally:
        database.close()
    host, port, reserved = _reserve_port(config.address)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    worker_config = replace(config, address=address, workers=1, reuse_port=True)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_worker_main,
            args=(_for_worker(worker_config, n), n),
            name=f"worker-{n}",
        )
        for n in range(1, config.workers + 1)
    ]
    stopping = threading.Event()

    def shutdown(signum, _frame):
        log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
        stopping.set()
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    for worker in workers:
        worker.start()
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("serving %s on port %d with %d workers", SERVICE_NAME, port, len(workers))
    status = 0
    try:
        running = {worker.sentinel: worker for worker in workers}
        while running:
            for sentinel in wait_for_exit(list(running), timeout=1.0):
                worker = running.pop(sentinel)
                worker.join()
                if not stopping.is_set() or worker.exitcode != 0:
                    log.error(
                        "worker %s (pid %d) exited with %s; stopping the others",
                        worker.name,
                        worker.pid,
                        _describe_exit(worker.exitcode),
                    )
                    status = 1
                    if not stopping.is_set():
                        shutdown(signal.SIGTERM, None)
    finally:
        reserved.close()
    log.info("stopped")
    return status


def _for_worker(config: ServerConfig, number: int) -> ServerConfig:
    """Worker n serves its own metrics on the metrics port + n - 1: each process counts
    only its own calls, so each is scraped as a target of its own."""
    if not config.metrics_address:
        return config
    host, _, port = config.metrics_address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return config
    return replace(config, metrics_address=f"{host}:{int(port) + number - 1}")


def _worker_main(config: ServerConfig, number: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        running = create_server(config)
    except StartupError as exc:
        log.error("worker %d cannot start: %s", number, exc)
        sys.exit(2)
    log.info("worker %d (pid %d) serving on %s", number, os.getpid(), config.address)
    _serve_until_signalled(running, config)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _reserve_port(address: str) -> tuple[str, int, socket.socket]:
    """Check that the port is free, then hold it with SO_REUSEPORT so that only this
    server's workers (same user, same option) can bind it while it runs."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (ValueError, OSError) as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as exclusive:
            exclusive.bind(sockaddr)  # no SO_REUSEPORT: fails when anyone holds the port
            port = exclusive.getsockname()[1]
        held = socket.socket(family, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((sockaddr[0], port, *sockaddr[2:]))
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return host, port, held
