"""Prometheus metrics on a registry of their own, served over HTTP by --metrics-address."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

from enrollment.server import addresses
from enrollment.server.persistence.failures import (
    Occurrences,
    read_only_events,
    storage_full_events,
)

# Unary calls on a local database: most finish in milliseconds.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Peer addresses are labels only up to this many, so an attacker with many addresses
# cannot grow the metrics without end.
MAX_PEER_LABELS = 100


class RpcMetrics:
    """Requests by method and code, latency by method, calls in flight, connections in use."""

    def __init__(self, connections_in_use: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "enrollment_rpc_requests",
            "EnrollmentService calls finished, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "enrollment_rpc_duration_seconds",
            "EnrollmentService call latency in seconds, by method",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "enrollment_rpcs_in_flight",
            "EnrollmentService calls being served right now",
            registry=self.registry,
        )
        connections = Gauge(
            "enrollment_db_connections_in_use",
            "database connections checked out of the pool",
            registry=self.registry,
        )
        connections.set_function(connections_in_use)
        self.registry.register(
            _OccurrencesCollector(
                "enrollment_storage_full",
                "writes the database refused for want of space (STORAGE_FULL answers)",
                storage_full_events,
            )
        )
        self.registry.register(
            _OccurrencesCollector(
                "enrollment_database_read_only",
                "writes refused by a database that accepts none now (read-only: a "
                "failover, a replica); answered DATABASE_UNAVAILABLE",
                read_only_events,
            )
        )
        self._auth_failures = Counter(
            "enrollment_auth_failures",
            "calls refused for their token (or for their address's earlier failures), "
            f"by peer address (the first {MAX_PEER_LABELS}; then 'other') and reason",
            ["peer", "reason"],
            registry=self.registry,
        )
        self._peers: set[str] = set()
        self._children: dict[tuple[str, str], Counter] = {}
        self._lock = threading.Lock()
        self._sqlite_writes: tuple[Histogram, Counter] | None = None

    def sqlite_writes(self) -> tuple[Histogram, Counter]:
        """The metrics of SQLite's writes on the event loop (transport's LoopWrites),
        registered when the process has them: how many commit together, and how often
        they went to the writer thread for a while."""
        if self._sqlite_writes is None:
            groups = Histogram(
                "enrollment_sqlite_write_group_size",
                "SQLite writes committed together in one transaction on the event loop",
                buckets=(1, 2, 4, 8, 16),
                registry=self.registry,
            )
            pauses = Counter(
                "enrollment_sqlite_write_pauses",
                "times the event loop's SQLite writes went to the writer thread for a "
                "while, having held the loop too long on average (a slow disk)",
                registry=self.registry,
            )
            self._sqlite_writes = (groups, pauses)
        return self._sqlite_writes

    def latency(self, method: str) -> Histogram:
        """The histogram child of one method (looked up once per method, not per call)."""
        return self._latency.labels(method)

    def count(self, method: str, code: str) -> None:
        child = self._children.get((method, code))
        if child is None:
            with self._lock:
                child = self._requests.labels(method, code)
                self._children[(method, code)] = child
        child.inc()

    def auth_failure(self, peer: str, reason: str) -> None:
        """One call refused by authentication, from peer (an address without its port)."""
        if peer not in self._peers:
            with self._lock:
                if len(self._peers) < MAX_PEER_LABELS:
                    self._peers.add(peer)
                else:
                    peer = "other"
        self._auth_failures.labels(peer, reason).inc()

    def serve(self, address: str) -> tuple[WSGIServer, threading.Thread]:
        """Serve /metrics on HOST:PORT (port 0 picks a free one); returns the HTTP server."""
        host, port = addresses.split(address)
        if not host or not port.isdigit():
            raise ValueError(f"the metrics address must be HOST:PORT, not {address!r}")
        return start_http_server(int(port), addr=host, registry=self.registry)


class _OccurrencesCollector:
    """A counter kept by the layer that sees the condition (persistence), read at scrape."""

    def __init__(self, name: str, documentation: str, source: Occurrences) -> None:
        self._name, self._documentation, self._source = name, documentation, source

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._source.total)
