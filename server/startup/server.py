"""Builds the gRPC server (create_server) and runs it until SIGTERM/SIGINT (serve).

The transport is grpc.aio on an event loop of its own thread, and the database work
runs in a bounded pool of --max-workers threads (peewee is synchronous). A call waiting
for its request message, for a thread, or (later) for an event to watch is a coroutine
on the loop, holding no thread and no database connection: so a client that opens
calls and never sends their body cannot take the threads every other caller needs
(the sync server's handler threads blocked reading the body, unbounded). How long a
request may take to arrive, how many calls one connection may carry and how long an
unfinished or idle connection is kept are bounded in transport/options.py and
transport/interceptors.py. The process's other threads (health probe, metrics, the
main thread waiting for a signal) talk to the loop only through RunningServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
import peewee as pw
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from enrollment.server import addresses
from enrollment.server.domain.events import purge_oldest as purge_old_events
from enrollment.server.domain.retries import purge_expired as purge_old_request_records
from enrollment.server.operations import tracing
from enrollment.server.operations.health import HealthMonitor
from enrollment.server.operations.metrics import RpcMetrics
from enrollment.server.persistence import engine, migrator, notify, outbox, prepared, unit_of_work
from enrollment.server.persistence.checkpoint import Checkpointer
from enrollment.server.persistence.loop_reads import LoopReads
from enrollment.server.persistence.models import proxy
from enrollment.server.persistence.notify import CommitListener, Looks
from enrollment.server.startup.config import (
    PROMISED_REQUEST_ID_RETENTION,
    ServerConfig,
    StartupError,
)
from enrollment.server.startup.purging import Purger
from enrollment.server.startup.quiet import quiet_bind
from enrollment.server.transport import options, tls
from enrollment.server.transport.auth import (
    Authenticator,
    FailureBuckets,
    TokenFileError,
    load_tokens,
)
from enrollment.server.transport.interceptors import RpcInterceptor
from enrollment.server.transport.pool import WorkerPool
from enrollment.server.transport.reflection import add_reflection
from enrollment.server.transport.servicer import READS, EnrollmentServicer
from enrollment.server.transport.watch import WatchHub
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

T = TypeVar("T")
log = logging.getLogger("enrollment.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name

# Calls grpc lets in beyond --max-concurrent-rpcs and --max-watchers together: those
# on their way to being refused by one of them, or answered UNIMPLEMENTED.
_REFUSING = 64

# On a local SQLite file these reads (an indexed lookup, a page of at most
# 1000 rows) cost less CPU than handing them to a pool thread and back, and
# never wait for a lock (WAL readers do not): they run on the event loop, with a
# connection of their own (bench/PROFILE.md). On PostgreSQL the loop drives them too,
# on asynchronous connections (below). Everything else runs in the pool.
READS_ON_LOOP = frozenset({"GetStudent", "GetCourse", "ListStudents", "ListCourses"})


def _reads_on_loop(config: ServerConfig) -> frozenset[str]:
    return READS_ON_LOOP if _sqlite(config) else frozenset()


# On PostgreSQL the same reads run on the event loop too, driven there on connections
# of its own in asynchronous mode (persistence/loop_reads.py says why and what they
# keep of a unit of work); --pool-size counts them. Not with tracing on: there every
# read's unit of work has its span (db.transaction), which only the pool's path has.
def _loop_read_connections(config: ServerConfig) -> int:
    return 0 if tracing.requested() else config.loop_read_connections


# On a local SQLite file these writes (a few rows each) run on the event loop too when
# they can start without waiting for a lock, and otherwise in the writer thread below
# (transport/interceptors.py, LoopWrites, says why and what bounds their time there).
# Deletes (a student's or a course's entries go with them) and batches stay in the
# writer thread.
WRITES_ON_LOOP = frozenset(
    {
        "EnrollStudent",
        "DropCourse",
        "CreateStudent",
        "UpdateStudent",
        "CreateCourse",
        "UpdateCourse",
    }
)


def _writes_on_loop(config: ServerConfig) -> frozenset[str]:
    return WRITES_ON_LOOP if _sqlite(config) else frozenset()


def _sqlite(config: ServerConfig) -> bool:
    return engine.url_kind(config.database_url) == "sqlite"


# SQLite has one writer at a time: writes spread over the pool's threads each hold a
# connection and queue for the write lock, and every turn is a hand-over between
# threads (and of the GIL) that costs CPU (bench/PROFILE.md, "Issue 15"). On SQLite
# every method that may write runs on one thread of its own, in arrival order; the
# reads keep the pool. PostgreSQL and MariaDB lock rows: they write from every thread.
def _writer_pool(config: ServerConfig) -> WorkerPool | None:
    if not _sqlite(config):
        return None
    return WorkerPool(1, name="writer", scope=unit_of_work.connection_kept)


# On PostgreSQL and MariaDB the pool's threads keep their connection from one call to
# the next: checking one out and in per call was two pool locks and, on checkout, a
# round trip to test it (peewee's pool sends SELECT 1 on PostgreSQL and a ping on
# MariaDB), ~15% of PostgreSQL's mixed mix (bench/PROFILE.md, "eighth session"). A kept
# connection found dead (the database restarted, an idle timeout) costs its call one
# failed statement and a new connection (unit_of_work._KeptConnection). These threads
# then hold up to --threads connections between calls, so the background purges run
# their batches on them too (WorkerPool.call) instead of needing a connection of their
# own. On SQLite the pool's threads do not keep theirs: the reads and writes that
# matter run on the loop's and the writer's, which do.
def _pool_scope(config: ServerConfig) -> Callable[[], contextlib.AbstractContextManager[None]]:
    return contextlib.nullcontext if _sqlite(config) else unit_of_work.connection_kept


def _shut(*pools: WorkerPool | None) -> None:
    """Let each pool's queued work finish, then end its threads."""
    for pool in pools:
        if pool is not None:
            pool.shutdown()


class EventLoopThread:
    """An asyncio event loop running in a thread of its own, for the grpc.aio server.
    scope: what the loop runs inside, from its start to its end."""

    def __init__(
        self, scope: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._scope = scope
        self._thread = threading.Thread(target=self._run, name="grpc-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        with self._scope():
            self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run coroutine on the loop and wait for its result (from another thread)."""
        return self.submit(coroutine).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.submit(_finish_tasks()).result(timeout=_FINISH_SECONDS * 2 + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


_FINISH_SECONDS = 1.0


async def _finish_tasks() -> None:
    """What asyncio.run does before it closes its loop: the tasks still pending are
    given a moment, then cancelled, and async generators left suspended are closed.
    A WatchEvents stream grpc dropped at the end of the grace leaves its generator's
    close() as such a task; with the loop simply stopped, each was logged as
    "Task was destroyed but it is pending!"."""
    loop = asyncio.get_running_loop()
    for _ in range(2):
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=_FINISH_SECONDS)
            for task in late:
                task.cancel()
        await loop.shutdown_asyncgens()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    events: EventLoopThread
    monitor: HealthMonitor | None = None
    purger: Purger | None = None
    request_purger: Purger | None = None
    hub: WatchHub | None = None
    listener: CommitListener | Looks | None = None
    checkpointer: Checkpointer | None = None  # SQLite's WAL checkpoints, off the write path
    metrics_port: int | None = None
    metrics_server: WSGIServer | None = None
    pool: WorkerPool | None = None
    writer: WorkerPool | None = None  # SQLite's one writer thread
    loop_reads: LoopReads | None = None  # PostgreSQL's reads on the loop
    traces: tracing.Tracing | None = None  # None: tracing off
    terminated: threading.Event = field(default_factory=threading.Event)
    # What stopping waits for now, for the log when a stop is overdue.
    waiting_for: str = "the calls in flight to finish"

    def wait_idle(self) -> None:
        """After stop: wait until no pool thread runs any more, then end the loop. grpc
        stops answering at the end of the grace period, but a call still inside its
        transaction runs on; the database is closed only after it has finished (or
        rolled back)."""
        self.waiting_for = "the calls inside the database to finish"
        _shut(self.pool, self.writer)
        self.waiting_for = "the event loop to end"
        self.events.close()
        if self.traces is not None:
            self.waiting_for = "the last spans to be exported"
            self.traces.shutdown()
        self.waiting_for = "the database to close"

    def stop(self, grace: float | None) -> threading.Event:
        """Report NOT_SERVING, stop taking calls, and let in-flight ones finish within
        grace; the event returned is set once the server has stopped."""
        stopped = threading.Event()
        if self.events.loop.is_closed():
            stopped.set()
        else:

            def done(_future: futures.Future[None]) -> None:
                stopped.set()
                self.terminated.set()

            # First: NOT_SERVING and the drain begin at once. The threads below may take
            # a while to end (a purge waiting its turn for a pool thread behind queued
            # calls), and load balancers must not send calls meanwhile.
            self.events.submit(self._stop(grace)).add_done_callback(done)
        background = [
            each
            for each in (
                self.monitor,
                self.purger,
                self.request_purger,
                self.listener,
                self.checkpointer,
            )
            if each is not None
        ]
        # All told at once, then waited for together: one by one, a database that does
        # not answer held each of them for its own timeout in turn.
        for each in background:
            each.stop_soon()
        self.waiting_for = "the health probe, purgers and feed listener to end"
        deadline = time.monotonic() + BACKGROUND_STOP_SECONDS
        for each in background:
            each.join(deadline - time.monotonic())
        self.waiting_for = "the calls in flight to finish"
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        return stopped

    async def _stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        if self.hub is not None:
            # Watch streams never finish by themselves: end them now, UNAVAILABLE
            # SHUTTING_DOWN, so their clients resume elsewhere within the grace period.
            await self.hub.stop()
        await self.server.stop(grace)
        if self.loop_reads is not None:
            self.loop_reads.close()

    def wait_for_termination(self) -> None:
        # Woken now and then, so that signal handlers run promptly in the main thread.
        while not self.terminated.is_set():
            self.terminated.wait(0.5)

    def report(self, serving: bool) -> None:
        """From any thread: health SERVING or NOT_SERVING for the server and the service."""
        state = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            state = health_pb2.HealthCheckResponse.NOT_SERVING

        async def set_all() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, state)

        if not self.events.loop.is_closed():
            self.events.submit(set_all())


def check_schema() -> None:
    """Refuse a database whose schema is behind this code."""
    db = proxy.obj
    with db.connection_context():
        pending = migrator.pending_migrations(db)
        unknown = migrator.unknown_migrations(db)
    if pending:
        raise StartupError(
            f"database schema is behind this server ({len(pending)} pending migration(s), "
            f"first {pending[0]}); run `enrollment-server migrate` with the same "
            "database URL (--database-url or ENROLLMENT_DATABASE_URL; or `make migrate`), "
            "then start again"
        )
    if unknown:
        log.warning("database has migrations this server does not know: %s", ", ".join(unknown))


def open_database(config: ServerConfig) -> None:
    """Bind the models to this process's pool (each worker opens its own after the fork)."""
    engine.open_pool(
        config.database_url,
        # SQLite: the loop thread's own, when reads run on it, and the writer thread's.
        # PostgreSQL: less the event loop's own, for its reads.
        max_connections=config.connections
        + (2 if _sqlite(config) else 0)
        - _loop_read_connections(config),
        timeout=config.database_timeout,
        pool_timeout=config.pool_timeout,
        statement_timeout=config.database_timeout,
    )


def create_server(config: ServerConfig, *, schema_checked: bool = False) -> RunningServer:
    """Open the database, check its schema (unless the caller has: the supervisor checks
    it once for all its workers), and start serving; returns the bound port."""
    config.check()
    open_database(config)
    try:
        if not schema_checked:
            checked_schema()
        prepare_statements()
        return _start(config)
    except BaseException:
        engine.close_pool()
        raise


def prepare_statements() -> None:
    """Have the pool prepare the hot statements on its connections, where it can
    (PostgreSQL's: engine.PooledPostgresDatabase); after the schema check, which
    they need."""
    register = getattr(proxy.obj, "prepare_statements", None)
    if register is not None:
        register([*prepared.to_prepare(), *outbox.to_prepare()])


def checked_schema() -> None:
    try:
        check_schema()
    except (pw.DatabaseError, pw.InterfaceError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"cannot read the database schema: {reason}") from exc


def _start(config: ServerConfig) -> RunningServer:
    try:
        credentials = tls.server_credentials(
            config.tls_cert,
            config.tls_key,
            config.tls_client_ca,
            named=(
                config.label("tls_cert"),
                config.label("tls_key"),
                config.label("tls_client_ca"),
            ),
        )
        auth = None
        if config.auth_tokens:
            buckets = FailureBuckets(config.auth_failure_burst, config.auth_failure_rate)
            auth = Authenticator(load_tokens(config.auth_tokens), buckets)
    except (tls.TlsConfigError, TokenFileError) as exc:
        raise StartupError(str(exc)) from exc
    metrics = RpcMetrics(engine.connections_in_use) if config.metrics_address else None
    traced = start_tracing()
    try:
        running = _serving(config, credentials, auth, metrics, traced)
    except BaseException:
        if traced is not None:
            traced.shutdown()
        raise
    running.traces = traced
    return running


def start_tracing() -> tracing.Tracing | None:
    """This process's tracing when the OTEL_* environment asks for it; None when off
    (then nothing of OpenTelemetry is imported)."""
    if not tracing.requested():
        return None
    try:
        return tracing.start()
    except tracing.TracingError as exc:
        raise StartupError(str(exc)) from None


def check_tracing() -> None:
    """Refuse to start (before any worker forks) when the environment asks for tracing
    that this installation cannot do, say without the tracing extra."""
    try:
        tracing.check()
    except tracing.TracingError as exc:
        raise StartupError(str(exc)) from None


def _serving(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    auth: Authenticator | None,
    metrics: RpcMetrics | None,
    traced: tracing.Tracing | None,
) -> RunningServer:
    # The database work of at most config.threads calls at once; calls beyond wait for a
    # thread as coroutines, up to --max-concurrent-rpcs.
    pool = WorkerPool(config.threads, scope=_pool_scope(config))
    writer = _writer_pool(config)
    # The reads on the loop (SQLite) keep the loop thread's connection between calls.
    events = EventLoopThread(
        unit_of_work.connection_kept if _reads_on_loop(config) else contextlib.nullcontext
    )
    try:
        server, health_servicer, port, hub, loop_reads = events.run(
            _build(config, credentials, auth, metrics, (pool, writer), traced)
        )
    except BaseException:
        events.close()
        _shut(pool, writer)
        raise
    if credentials is None and not tls.is_loopback(config.address):
        log.warning(
            "serving PLAINTEXT on %s, which is not a loopback address: anyone on the "
            "network can read and alter calls (and bearer tokens); use --tls-cert/--tls-key",
            config.address,
        )
    running = RunningServer(
        server,
        port,
        health_servicer,
        events,
        pool=pool,
        writer=writer,
        hub=hub,
        loop_reads=loop_reads,
    )
    if metrics is not None and config.metrics_address is not None:
        try:
            running.metrics_server, _ = metrics.serve(config.metrics_address)
        except (OSError, ValueError) as exc:
            events.run(server.stop(None))
            events.run(hub.stop())
            events.close()
            _shut(pool, writer)
            raise StartupError(f"cannot serve metrics on {config.metrics_address}: {exc}") from exc
        running.metrics_port = running.metrics_server.server_port
    events.run(server.start())
    # Other processes' commits wake this one's watchers at once, or within tens of
    # milliseconds where the database has no notifications (persistence/notify.py).
    running.listener = notify.listener(
        config.database_url, hub.wake, timeout=config.database_timeout
    )
    # It listens while the process has watchers; one may have come already.
    hub.on_demand = running.listener.want
    running.listener.want(hub.watchers > 0)
    running.listener.start()
    if _sqlite(config):
        path = engine.parse(config.database_url).name
        running.checkpointer = Checkpointer(path, timeout=config.database_timeout)
        running.checkpointer.start()
    running.monitor = HealthMonitor(
        running.report,
        database_url=config.database_url,
        interval=config.health_interval,
        database_timeout=config.database_timeout,
    )
    running.monitor.start()
    # Each batch runs on a thread of the pool, in line with the calls (_pool_scope).
    if config.event_retention is not None:
        running.purger = Purger(
            "events", config.event_retention, functools.partial(pool.call, purge_old_events)
        )
        running.purger.start()
    running.request_purger = Purger(
        "request records",
        config.request_id_retention,
        functools.partial(pool.call, purge_old_request_records),
    )
    running.request_purger.start()
    return running


async def _build(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    auth: Authenticator | None,
    metrics: RpcMetrics | None,
    pools: tuple[WorkerPool, WorkerPool | None],
    traced: tracing.Tracing | None,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int, WatchHub, LoopReads | None]:
    """On the loop (grpc.aio binds its objects to the running loop): the server, its
    services and its port, not started; and the loop's PostgreSQL reads, if any (they
    open their connections when first needed)."""
    pool, writer = pools
    writes_on_loop = _writes_on_loop(config)
    loop_reads = None
    driver: LoopReads | None
    if _loop_read_connections(config):
        driver = LoopReads(proxy.obj, _loop_read_connections(config), wait=config.pool_timeout)
        loop_reads = (driver, {name: READS[name] for name in READS_ON_LOOP})
    else:
        driver = None
    interceptors: list[grpc.aio.ServerInterceptor] = [
        RpcInterceptor(
            pool=pool,
            writer=writer,
            request_timeout=config.request_timeout,
            authenticator=auth,
            metrics=metrics,
            on_loop=_reads_on_loop(config),
            writes_on_loop=writes_on_loop,
            loop_turn=unit_of_work.LoopTurn() if writes_on_loop else None,
            loop_reads=loop_reads,
            max_calls=config.max_concurrent_rpcs,
            max_streams=config.max_open_streams,
            max_message_bytes=config.max_message_bytes,
        )
    ]
    if traced is not None:
        # Imported only when on; outermost, so its span is current for the whole call.
        from enrollment.server.transport.tracing import TracingInterceptor

        interceptors.insert(0, TracingInterceptor(traced.tracer))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=options.grpc_options(config),
        # The interceptor holds the calls to --max-concurrent-rpcs and the health Watch
        # and reflection streams to --max-open-streams, the hub holds WatchEvents streams
        # to --max-watchers (interceptors.CallSlots); grpc's own limit, above all three,
        # bounds what neither counts: calls on their way to being
        # refused, or to a method that does not exist. Up to the limits, calls beyond
        # config.threads wait for a thread of the pool.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs
        + config.max_open_streams
        + config.max_watchers
        + _REFUSING,
    )
    # WatchEvents: one poller for every watcher of this process (transport/watch.py).
    hub = WatchHub(
        pool.run,
        max_watchers=config.max_watchers,
        max_queued=config.watch_queue,
        interval=config.watch_poll_interval,
    )
    await hub.start()
    try:
        return (*await _services(config, credentials, server, hub), driver)
    except BaseException:
        await hub.stop()
        raise


async def _services(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    server: grpc.aio.Server,
    hub: WatchHub,
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int, WatchHub]:
    pb_grpc.add_EnrollmentServiceServicer_to_server(EnrollmentServicer(hub), server)

    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    add_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    port = _listen(server, config.address, credentials)
    return server, health_servicer, port, hub


def _listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind every address the flag's HOST:PORT stands for (addresses.bind_targets), all
    on one port; its number, or StartupError when any one cannot be bound."""
    port = 0
    for target in addresses.bind_targets(address):
        if port:  # port 0 asked for: the rest on the port the first was given
            host, _ = addresses.split(target)
            target = addresses.join(host, port)
        try:
            # grpc's core logs a failed bind itself (E... add_port.cc); the StartupError
            # below says it once, in our words.
            with quiet_bind():
                if credentials is None:
                    bound = server.add_insecure_port(target)
                else:
                    bound = server.add_secure_port(target, credentials)
        except RuntimeError:
            bound = 0
        if not bound or (port and bound != port):
            why = "in use or not a local address"
            if target != address:
                why = f"{target} is in use or not a local address"
            raise StartupError(f"cannot listen on {address}: {why}")
        port = bound
    return port


def security_summary(config: ServerConfig) -> str:
    """Whether TLS, mutual TLS and tokens are on: a client with other settings gets only
    "Socket closed" or a handshake error, so the log says what the server expects."""
    return (
        f"TLS {'on' if config.tls_cert else 'off'}, "
        f"mutual TLS {'on' if config.tls_cert and config.tls_client_ca else 'off'}, "
        f"tokens {'on' if config.auth_tokens else 'off'}"
    )


def close_database() -> None:
    engine.close_pool()


def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and close the database."""
    config.check()
    check_tracing()
    if config.request_id_retention < PROMISED_REQUEST_ID_RETENTION:
        log.warning(
            "--request-id-retention is %g s, below the 24 hours the API promises: a retry "
            "after that runs again instead of getting the first answer",
            config.request_id_retention,
        )
    if config.workers > 1:
        from enrollment.server.startup.supervisor import serve_workers

        sys.exit(serve_workers(config))
    running = create_server(config)
    log.info(
        "serving %s on port %d (%s); security: %s",
        SERVICE_NAME,
        running.port,
        config.address,
        security_summary(config),
    )
    serve_until_signalled(running, config)


def serve_until_signalled(
    running: RunningServer, config: ServerConfig, pending: Sequence[int] = ()
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; pending: such signals that came while
    the server was being built (a worker of --workers), answered at once."""
    signalled: list[int] = []

    def shutdown(signum: int, _frame: FrameType | None) -> None:
        if signalled:
            # Already draining. A worker of `serve --workers N` gets its parent's SIGTERM
            # besides its own signal when the whole process group is signalled (Ctrl-C,
            # `timeout`, systemd); run again, this handler ran inside the first one's
            # stop() (in a join of a thread) and stopping took seconds longer.
            return
        signalled.append(signum)
        log.info(
            "%s: draining in-flight calls (grace %.1fs)",
            signal.Signals(signum).name,
            config.grace_seconds,
        )
        _exit_when_overdue(running, config)
        running.stop(config.grace_seconds)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if pending:
        shutdown(pending[0], None)
    running.wait_for_termination()
    running.wait_idle()
    engine.close_pool()
    stopped()


# Seconds a stop waits for its background threads (the health probe, the purgers, the
# feed listener, the WAL checkpointer) to end their rounds: a purge may wait its turn for
# a pool thread behind the calls queued there.
BACKGROUND_STOP_SECONDS = 10.0

# Seconds past --grace + --database-timeout (what the README tells operators to expect)
# before a stop that has not finished is ended anyway: within compose's
# stop_grace_period of 20 s at the defaults, so the supervisor's SIGKILL is not needed.
OVERDUE_MARGIN = 3.0


def _exit_when_overdue(running: RunningServer, config: ServerConfig) -> None:
    """From the first stop signal on: a stop not finished by --grace + --database-timeout
    + OVERDUE_MARGIN exits the process with code 1, saying what it still waited for.
    Only a database that keeps its connections open but never answers (a hung server,
    pooler or proxy) gets there: its statement timeouts are its own, and the driver
    waits for it without end. Whatever it held uncommitted is rolled back when the
    connections close with the process."""
    limit = config.grace_seconds + config.database_timeout + OVERDUE_MARGIN

    def overdue() -> None:
        log.error(
            "stop overdue: still waiting for %s %.0f s after the signal (--grace %g + "
            "--database-timeout %g + %g); exiting with 1",
            running.waiting_for,
            limit,
            config.grace_seconds,
            config.database_timeout,
            OVERDUE_MARGIN,
        )
        logging.shutdown()  # flushes the log
        os._exit(1)

    timer = threading.Timer(limit, overdue)
    timer.daemon = True
    timer.name = "stop-overdue"
    timer.start()


def stopped() -> None:
    """Say so, once the drain is over. A stop signal from here on (a supervisor's
    second SIGTERM, a second Ctrl-C) is ignored: Python gives its default action back
    to a handled signal as it exits, and it killed a process that had stopped cleanly."""
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, signal.SIG_IGN)
    log.info("stopped")
