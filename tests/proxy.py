"""A TCP proxy owned by a test: forwards to a database, and can cut and restore the line."""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import grpc

from enrollment.server.persistence import engine
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

# The statement COMMIT, not the word inside "READ COMMITTED" (which a new MariaDB
# connection sends when it starts its session).
_COMMIT = re.compile(rb"\bCOMMIT\b")


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards every connection to target.

    cut(): closes every open connection and refuses new ones, as a database that
    went away would. restore(): accepts connections again on the same port.
    freeze(): nothing passes any more, yet connections stay open, as with a database
    that hangs. cut_at_commit(): the next COMMIT a client sends reaches the database,
    and its connection is then dropped before the database's answer gets back: the
    client cannot know whether the transaction committed. cut_before(marker): the next
    statement a client sends with marker in it (b"INSERT", say) never reaches the
    database; its connection is dropped instead: nothing of its transaction commits.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._commit_trap = threading.Event()
        self.commits_cut = 0
        self._before: bytes | None = None
        self.statements_cut = 0
        self._frozen = threading.Event()
        self.port = self._listen(0)

    def _listen(self, port: int) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: cut() or close()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        committing = False  # a COMMIT went upstream; its answer is not passed back
        try:
            while True:
                if self._frozen.is_set():  # nothing passes; TCP still acknowledges
                    time.sleep(0.05)
                    continue
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is b and committing:
                        with self._lock:
                            self.commits_cut += 1
                        return  # the answer to COMMIT is dropped with the connection
                    if key.fileobj is a and self._take_before(data):
                        return  # the statement goes down with the connection
                    if key.fileobj is a and _COMMIT.search(data.upper()) and self._take_trap():
                        committing = True
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            self._drop(a, b)

    def freeze(self) -> None:
        """From now on nothing passes either way, yet every connection stays open (and
        new ones are accepted): a database, pooler or proxy that hangs. Its statement
        timeouts are its own, so nothing it enforces ends a wait for it."""
        self._frozen.set()

    def cut_at_commit(self) -> None:
        self._commit_trap.set()

    def _take_trap(self) -> bool:
        with self._lock:
            armed = self._commit_trap.is_set()
            self._commit_trap.clear()
            return armed

    def cut_before(self, marker: bytes) -> None:
        with self._lock:
            self._before = marker.upper()

    def _take_before(self, data: bytes) -> bool:
        with self._lock:
            if self._before is None or self._before not in data.upper():
                return False
            self._before = None
            self.statements_cut += 1
            return True

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock, contextlib.suppress(ValueError):
            self._pairs.remove((a, b))

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for a, b in pairs:
            self._drop(a, b)

    def restore(self) -> None:
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()


def through(proxy: TcpProxy, url: str) -> str:
    """The database URL with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    credentials = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{proxy.port}"))


@contextlib.contextmanager
def server_through_proxy(db_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A server in this process reaching the database at db_url through a TcpProxy:
    (the proxy, the server's address)."""
    target = urlsplit(db_url)
    assert target.hostname is not None and target.port is not None
    proxy = TcpProxy((target.hostname, target.port))
    config = ServerConfig(
        address="127.0.0.1:0",
        database_url=through(proxy, db_url),
        database_timeout=2.0,
        pool_timeout=2.0,
        health_interval=60.0,  # the probe stays off the line while a statement is trapped
    )
    running = create_server(config)
    try:
        yield proxy, f"127.0.0.1:{running.port}"
    finally:
        running.stop(None).wait(10)
        running.wait_idle()
        engine.close_pool()
        proxy.close()


@contextlib.contextmanager
def stub_through_proxy(db_url: str) -> Iterator[tuple[TcpProxy, pb_grpc.EnrollmentServiceStub]]:
    """server_through_proxy with a plain stub (no retries) on a channel to it."""
    with server_through_proxy(db_url) as (proxy, address), grpc.insecure_channel(address) as ch:
        yield proxy, pb_grpc.EnrollmentServiceStub(ch)
