"""gRPC channel options for the server's limits: request size, keepalive, connection age."""

from __future__ import annotations


class LimitsError(ValueError):
    """A limit flag out of range; the message names the flag."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def check(config) -> None:
    """Refuse limits that cannot work, naming the flag."""
    if config.max_message_bytes < 1024:
        raise LimitsError("--max-message-bytes must be 1024 or more")
    if config.max_concurrent_rpcs < 1:
        raise LimitsError("--max-concurrent-rpcs must be 1 or more")
    if min(config.keepalive_time, config.keepalive_timeout) <= 0:
        raise LimitsError("--keepalive-time and --keepalive-timeout must be above 0")
    if config.keepalive_min_ping_interval < 0:
        raise LimitsError("--keepalive-min-ping-interval must be 0 or more")
    if config.max_connection_age < 0 or config.max_connection_age_grace < 0:
        raise LimitsError("--max-connection-age and --max-connection-age-grace must be 0 or more")


def grpc_options(config) -> list[tuple[str, int]]:
    """The grpc.server options that carry the configured limits."""
    options = [
        # A second server on a busy port must fail, not silently share it; only the
        # workers of one `serve --workers N` share theirs.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Larger requests are refused by grpc itself with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # The server pings idle connections to find dead peers (half-open TCP).
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        # Enforcement: clients may keep idle connections alive with pings, but one
        # that pings more often than the interval is sent GOAWAY (too_many_pings)
        # after max_ping_strikes offences.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_min_ping_interval)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if config.max_connection_age > 0:
        # Connections are closed (GOAWAY, then grace for in-flight calls) after this age,
        # so clients reconnect and spread over servers added since; grpc adds +-10% jitter.
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace)),
        ]
    return options
