"""Runs several server processes on one port, as in grpc's examples/python/multiprocessing:
the parent forks before any gRPC object exists, and each worker builds its own server,
thread pool and database pool."""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import wait as wait_for_exit
from types import FrameType
from typing import Any, cast

from enrollment.server import addresses
from enrollment.server.startup.config import ServerConfig, StartupError
from enrollment.server.startup.server import (
    SERVICE_NAME,
    checked_schema,
    close_database,
    create_server,
    open_database,
    security_summary,
    serve_until_signalled,
    stopped,
)

log = logging.getLogger("enrollment.server")


def serve_workers(config: ServerConfig) -> int:
    """Run config.workers server processes on one port; returns the exit status.

    SIGTERM/SIGINT to the parent drains and stops every worker (exit 0). A worker
    that dies on its own is reported, the others are stopped, and the parent exits 1:
    the supervisor (systemd, Docker, Kubernetes) restarts the whole server, rather
    than this process hiding a crash loop. When the first to die could not start (exit
    2: its metrics port in use, say), the parent exits 2, as one process would.
    """
    # The schema is checked once, here, so a database behind the code is one clear error.
    open_database(config)
    try:
        checked_schema()
    finally:
        close_database()
    host, port, reserved = _reserve_port(config.address)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    worker_config = replace(config, address=address, workers=1, reuse_port=True)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_worker_main,
            args=(_for_worker(worker_config, n), n, os.getpid()),
            name=f"worker-{n}",
        )
        for n in range(1, config.workers + 1)
    ]
    stopping = threading.Event()

    def stop_workers(why: str) -> None:
        log.info("%s: stopping %d workers", why, len(workers))
        stopping.set()
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    def shutdown(signum: int, _frame: FrameType | None) -> None:
        stop_workers(signal.Signals(signum).name)

    # Blocked until each side has its handler: the workers are forked with the mask,
    # so a SIGTERM as they start waits for theirs rather than killing them outright.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        for worker in workers:
            worker.start()
        signal.signal(signal.SIGTERM, shutdown)
        signal.signal(signal.SIGINT, shutdown)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    log.info(
        "serving %s on port %d with %d workers; security: %s",
        SERVICE_NAME,
        port,
        len(workers),
        security_summary(config),
    )
    status = 0
    try:
        running = {worker.sentinel: worker for worker in workers}
        while running:
            for sentinel in wait_for_exit(list(running), timeout=1.0):
                worker = running.pop(cast(int, sentinel))  # wait_for_exit gives them back
                worker.join()
                if not stopping.is_set() or worker.exitcode != 0:
                    log.error(
                        "worker %s (pid %d) exited with %s; stopping the others",
                        worker.name,
                        worker.pid,
                        _describe_exit(worker.exitcode),
                    )
                    if not stopping.is_set():
                        status = 2 if worker.exitcode == 2 else 1
                        stop_workers("a worker exited")
                    else:
                        status = status or 1
    finally:
        reserved.close()
    stopped()
    return status


def _for_worker(config: ServerConfig, number: int) -> ServerConfig:
    """Worker n serves its own metrics on the metrics port + n - 1: each process counts
    only its own calls, so each is scraped as a target of its own."""
    if not config.metrics_address:
        return config
    host, port = addresses.split(config.metrics_address)
    if not port.isdigit() or int(port) == 0:
        return config
    return replace(config, metrics_address=addresses.join(host, int(port) + number - 1))


_STOPS = {signal.SIGTERM, signal.SIGINT}


def _worker_main(config: ServerConfig, number: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    # A SIGTERM while the worker starts (its parent stopping at once) is kept, and
    # answered as soon as the worker has a server to drain: not a death by signal.
    pending: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: pending.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by the parent to fork
    _stop_with(parent)
    try:
        running = create_server(config, schema_checked=True)  # the parent checked it
    except StartupError as exc:
        log.error("worker %d cannot start: %s", number, exc)
        sys.exit(2)
    log.info("worker %d (pid %d) serving on %s", number, os.getpid(), config.address)
    serve_until_signalled(running, config, pending)


_PR_SET_PDEATHSIG = 1


def _stop_with(parent: int) -> None:
    """SIGTERM to this worker when its parent dies, killed too (SIGKILL, OOM) to stop its
    workers itself: orphans would keep the port, and a restart could not listen."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's pid is watched instead
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _reserve_port(address: str) -> tuple[str, int, socket.socket]:
    """Check that nothing listens on the port, then hold it with SO_REUSEPORT so that
    only this server's workers (same user, same option) can bind it while it runs."""
    host, port_text = addresses.split(address)
    host = host or "0.0.0.0"
    try:
        port = int(port_text)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (ValueError, OSError) as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR, as grpc's own listeners have: the connections a stopped
            # server closed wait in TIME_WAIT on its port for a minute, and they must
            # not stop it starting again. Linux still refuses the bind while any socket
            # listens on the port; no SO_REUSEPORT, so a listener that has it counts too.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
            port = probe.getsockname()[1]
        held = _hold(family, (sockaddr[0], port, *sockaddr[2:]))
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return host, port, held


def _hold(family: socket.AddressFamily, sockaddr: tuple[Any, ...]) -> socket.socket:
    """A socket bound to the port with SO_REUSEPORT, and without SO_REUSEADDR while
    that works: another server's start-up check (which has SO_REUSEADDR) then fails
    against it, before the workers listen. TIME_WAIT sockets left by workers have
    SO_REUSEPORT and let it bind; those of a server without it (`serve` in one
    process) need SO_REUSEADDR as well."""
    for options in ((socket.SO_REUSEPORT,), (socket.SO_REUSEPORT, socket.SO_REUSEADDR)):
        held = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in options:
                held.setsockopt(socket.SOL_SOCKET, option, 1)
            held.bind(sockaddr)
            return held
        except OSError as exc:
            held.close()
            if exc.errno != errno.EADDRINUSE or socket.SO_REUSEADDR in options:
                raise
    raise AssertionError("unreachable")
