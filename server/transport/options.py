"""gRPC channel options for the server's limits: request size, keepalive, connection age,
and what one client can hold (streams per connection, handshake time, idle connections,
connections in all). Their ranges are ServerConfig's (startup/config.py), checked
before any of these is built."""

from __future__ import annotations

import resource
from typing import Protocol

# Descriptors kept out of --max-connections' default: the database pool, the health
# probe, the metrics server, log files, the listening sockets and grpc's own.
DESCRIPTOR_RESERVE = 64


class Limits(Protocol):
    """The settings read here (ServerConfig's, which this layer does not import)."""

    @property
    def reuse_port(self) -> bool: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def keepalive_time(self) -> float: ...
    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def keepalive_min_ping_interval(self) -> float: ...
    @property
    def max_connection_age(self) -> float: ...
    @property
    def max_connection_age_grace(self) -> float: ...
    @property
    def max_streams_per_connection(self) -> int: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def max_connection_idle(self) -> float: ...
    @property
    def max_connections(self) -> int | None: ...


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def max_connections(config: Limits) -> int:
    """--max-connections, or by default what the descriptor limit leaves after a reserve:
    connections beyond it are closed as soon as they are accepted, so that however many
    a client opens, the process keeps descriptors for its database and its callers."""
    if config.max_connections is not None:
        return config.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, int(soft) - DESCRIPTOR_RESERVE)


def grpc_options(config: Limits) -> list[tuple[str, int]]:
    """The grpc.server options that carry the configured limits."""
    options = [
        # A second server on a busy port must fail, not silently share it; only the
        # workers of one `serve --workers N` share theirs.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Requests up to twice --max-message-bytes reach the service's handlers, which
        # refuse those over it with their reason (interceptors._tolerant); larger ones
        # grpc refuses itself, with a bare RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", min(2 * config.max_message_bytes, 2**31 - 1)),
        # The server pings idle connections to find dead peers (half-open TCP).
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        # Enforcement: clients may keep idle connections alive with pings, but one
        # that pings more often than the interval is sent GOAWAY (too_many_pings)
        # after max_ping_strikes offences.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_min_ping_interval)),
        ("grpc.http2.max_ping_strikes", 2),
        # What one client can hold. Calls at once on one connection: more wait in the
        # client (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), so one connection cannot take
        # the whole --max-concurrent-rpcs.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # ... counted until grpc has freed them (its "overload protection", grpc's
        # default): a stream the client opens and resets at once (HTTP/2 rapid reset,
        # CVE-2023-44487) leaves HTTP/2's count but is still work here. Counted as HTTP/2
        # counts them (0), a 4-connection flood filled grpc's queue of calls not yet
        # started, and grpc cancelled other clients' calls (tests/test_hostile.py). The
        # price: a client keeping its connection at the limit has a few calls refused,
        # RST_STREAM REFUSED_STREAM, UNAVAILABLE without having run, which the client
        # library's retry policy takes up. Figures: bench/PROFILE.md, `make bench-reset`.
        ("grpc.http.overload_protection", 1),
        # A connection that has not finished its TLS handshake and sent the HTTP/2
        # preface and SETTINGS within this is closed (grpc's default is 120 s).
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout)),
        # Connections at once: beyond, new ones are closed at accept.
        ("grpc.max_allowed_incoming_connections", max_connections(config)),
    ]
    if config.max_connection_idle > 0:
        # A connection with no call for this long is sent GOAWAY and closed.
        options.append(("grpc.max_connection_idle_ms", _ms(config.max_connection_idle)))
    if config.max_connection_age > 0:
        # Connections are closed (GOAWAY, then grace for in-flight calls) after this age,
        # so clients reconnect and spread over servers added since; grpc adds +-10% jitter.
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace)),
        ]
    return options
