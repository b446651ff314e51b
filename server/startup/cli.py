"""The enrollment-server command: serve, health, migrate, rollback, status."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import grpc
import peewee as pw
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment.client.api import open_channel
from enrollment.server import addresses
from enrollment.server.operations import logs
from enrollment.server.persistence import engine, migrator
from enrollment.server.startup.config import ServerConfig, StartupError
from enrollment.server.startup.server import serve
from enrollment.server.transport.auth import ROLES, TokenFileError, new_token_line

DEFAULTS = ServerConfig()


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("ENROLLMENT_DATABASE_URL", DEFAULTS.database_url),
        help="database URL (env ENROLLMENT_DATABASE_URL; default %(default)s)",
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '24h' or '7d'."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90s, 15m, 24h)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enrollment-server", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ENROLLMENT_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env ENROLLMENT_LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument(
        "--log-sql-values",
        action="store_true",
        default=os.environ.get("ENROLLMENT_LOG_SQL_VALUES", "") == "1",
        help="with --log-level DEBUG, also log the values bound to each SQL statement "
        "(names, emails: personal data); off by default (env ENROLLMENT_LOG_SQL_VALUES=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("serve", help="serve the gRPC API")
    run.add_argument(
        "--address",
        default=os.environ.get("ENROLLMENT_ADDRESS", DEFAULTS.address),
        help="HOST:PORT to listen on (env ENROLLMENT_ADDRESS; default %(default)s)",
    )
    _database_flag(run)
    run.add_argument(
        "--grace",
        type=float,
        default=DEFAULTS.grace_seconds,
        help="seconds in-flight calls get to finish on SIGTERM/SIGINT (default %(default)s)",
    )
    run.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULTS.max_workers,
        help="threads serving calls at once (default %(default)s)",
    )
    run.add_argument(
        "--database-timeout",
        type=float,
        default=DEFAULTS.database_timeout,
        help="seconds a call waits for a lock or a new connection, and a statement may run, "
        "before the call fails as UNAVAILABLE (default %(default)s)",
    )
    run.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULTS.pool_size,
        help="database connections per process; at least --max-workers (default: --max-workers)",
    )
    run.add_argument(
        "--pool-timeout",
        type=float,
        default=DEFAULTS.pool_timeout,
        help="seconds a call waits for a free pooled connection before it fails as "
        "UNAVAILABLE (default %(default)s)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("ENROLLMENT_WORKERS", DEFAULTS.workers)),
        help="server processes sharing the port with SO_REUSEPORT "
        "(env ENROLLMENT_WORKERS; default %(default)s)",
    )

    run.add_argument(
        "--request-id-retention",
        type=duration,
        default=DEFAULTS.request_id_retention,
        metavar="DURATION",
        help="how long a successful call's request_id is remembered for safe retries: "
        "seconds, or a number with s, m, h or d (default 24h)",
    )

    probe = commands.add_parser(
        "health", help="ask a running server's grpc.health.v1 service; exit 0 when SERVING"
    )
    probe.add_argument(
        "--address",
        default=os.environ.get("ENROLLMENT_ADDRESS", DEFAULTS.address),
        help="HOST:PORT of the server (env ENROLLMENT_ADDRESS; default %(default)s); "
        "0.0.0.0 or [::] means this host",
    )
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    probe.add_argument("--tls-ca", help="CA of a TLS server's certificate (turns TLS on)")
    probe.add_argument("--tls-cert", help="client certificate, for a server that asks (mTLS)")
    probe.add_argument("--tls-key", help="the client certificate's key")

    _security_and_operations_flags(run)

    for name, text in (
        ("migrate", "apply pending migrations (creates a missing SQLite file)"),
        ("rollback", "undo the last applied migration"),
        ("status", "list applied and pending migrations"),
    ):
        _database_flag(commands.add_parser(name, help=text))
    commands.choices["rollback"].add_argument(
        "--allow-data-loss",
        action="store_true",
        help="allow a rollback that drops tables holding rows (refused otherwise)",
    )
    token = commands.add_parser(
        "hash-token",
        help="make a new random token: its tokens-file line on stdout, the token on stderr",
        description="Make a new random bearer token. Prints the line for the --auth-tokens "
        "file on stdout and the token itself on stderr, so that "
        "`enrollment-server hash-token --role reader --name NAME 2> NAME.token >> tokens.txt` "
        "adds the line and keeps the token. The token is not stored anywhere else.",
    )
    token.add_argument("--role", choices=ROLES, default="reader", help="default %(default)s")
    token.add_argument("--name", default="client", help="name logged for calls with this token")
    return parser


def _security_and_operations_flags(run: argparse.ArgumentParser) -> None:
    """serve flags for TLS, tokens, limits, metrics and log format (README "Security")."""
    env = os.environ.get
    run.add_argument(
        "--tls-cert",
        default=env("ENROLLMENT_TLS_CERT"),
        metavar="PEM",
        help="serve TLS with this certificate chain (env ENROLLMENT_TLS_CERT)",
    )
    run.add_argument(
        "--tls-key",
        default=env("ENROLLMENT_TLS_KEY"),
        metavar="PEM",
        help="the private key of --tls-cert (env ENROLLMENT_TLS_KEY)",
    )
    run.add_argument(
        "--tls-client-ca",
        default=env("ENROLLMENT_TLS_CLIENT_CA"),
        metavar="PEM",
        help="require client certificates signed by this CA: mutual TLS "
        "(env ENROLLMENT_TLS_CLIENT_CA)",
    )
    run.add_argument(
        "--auth-tokens",
        default=env("ENROLLMENT_AUTH_TOKENS"),
        metavar="FILE",
        help="require bearer tokens listed in FILE, lines '<sha256 hex> <role> "
        "<name>' (env ENROLLMENT_AUTH_TOKENS)",
    )
    run.add_argument(
        "--auth-failure-burst",
        type=int,
        default=DEFAULTS.auth_failure_burst,
        metavar="N",
        help="wrong tokens one address may send at once before its calls are refused "
        "(RESOURCE_EXHAUSTED AUTH_FAILURES_LIMITED) (default %(default)s)",
    )
    run.add_argument(
        "--auth-failure-rate",
        type=float,
        default=DEFAULTS.auth_failure_rate,
        metavar="R",
        help="wrong tokens per second one address may send after the burst (default %(default)s)",
    )
    run.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULTS.max_message_bytes,
        metavar="N",
        help="largest request accepted (default %(default)s)",
    )
    run.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=DEFAULTS.max_concurrent_rpcs,
        metavar="N",
        help="calls accepted at once, queued beyond --max-workers; "
        "more are RESOURCE_EXHAUSTED (default %(default)s)",
    )
    run.add_argument(
        "--keepalive-time",
        type=float,
        default=DEFAULTS.keepalive_time,
        metavar="S",
        help="ping idle connections this often (default %(default)s)",
    )
    run.add_argument(
        "--keepalive-timeout",
        type=float,
        default=DEFAULTS.keepalive_timeout,
        metavar="S",
        help="close a connection whose ping is not answered in S (default %(default)s)",
    )
    run.add_argument(
        "--keepalive-min-ping-interval",
        type=float,
        default=DEFAULTS.keepalive_min_ping_interval,
        metavar="S",
        help="clients pinging more often are disconnected (default %(default)s)",
    )
    run.add_argument(
        "--max-connection-age",
        type=float,
        default=DEFAULTS.max_connection_age,
        metavar="S",
        help="close connections after S seconds, so clients "
        "rebalance; 0 = never (default %(default)s)",
    )
    run.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=DEFAULTS.max_connection_age_grace,
        metavar="S",
        help="time in-flight calls get on such a connection (default %(default)s)",
    )
    run.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULTS.request_timeout,
        metavar="S",
        help="end a call whose request message has not arrived S seconds after the call "
        "began (DEADLINE_EXCEEDED, reason REQUEST_TIMEOUT; default %(default)s)",
    )
    run.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=DEFAULTS.max_streams_per_connection,
        metavar="N",
        help="calls at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); more wait "
        "in the client (default %(default)s)",
    )
    run.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULTS.handshake_timeout,
        metavar="S",
        help="close a new connection that has not finished its TLS handshake and HTTP/2 "
        "preface within S seconds (default %(default)s)",
    )
    run.add_argument(
        "--max-connection-idle",
        type=float,
        default=DEFAULTS.max_connection_idle,
        metavar="S",
        help="close a connection that has had no call for S seconds; 0 = never "
        "(default %(default)s)",
    )
    run.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULTS.max_connections,
        metavar="N",
        help="connections at once; more are closed when accepted (default: the "
        "descriptor limit, ulimit -n, less 64)",
    )
    run.add_argument(
        "--metrics-address",
        default=env("ENROLLMENT_METRICS_ADDRESS"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at "
        "http://HOST:PORT/metrics (env ENROLLMENT_METRICS_ADDRESS; default off)",
    )
    run.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default=env("ENROLLMENT_LOG_FORMAT", "text"),
        help="text lines or one JSON object per line (env ENROLLMENT_LOG_FORMAT; "
        "default %(default)s)",
    )


def _security_and_operations_config(args: argparse.Namespace) -> dict:
    names = (
        "tls_cert tls_key tls_client_ca auth_tokens auth_failure_burst auth_failure_rate "
        "max_message_bytes max_concurrent_rpcs "
        "keepalive_time keepalive_timeout keepalive_min_ping_interval max_connection_age "
        "max_connection_age_grace metrics_address request_timeout max_streams_per_connection "
        "handshake_timeout max_connection_idle max_connections"
    )
    return {name: getattr(args, name) for name in names.split()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, getattr(args, "log_format", "text"), sql_values=args.log_sql_values)
    # peewee-migrate logs every step at INFO through its own logger.
    logging.getLogger("peewee_migrate").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            serve(
                ServerConfig(
                    address=args.address,
                    database_url=args.database_url,
                    grace_seconds=args.grace,
                    max_workers=args.max_workers,
                    database_timeout=args.database_timeout,
                    pool_size=args.pool_size,
                    pool_timeout=args.pool_timeout,
                    workers=args.workers,
                    request_id_retention=args.request_id_retention,
                    **_security_and_operations_config(args),
                )
            )
            return 0
        if args.command == "health":
            return health_check(args)
        if args.command == "hash-token":
            token, line = new_token_line(args.role, args.name)
            print(line)
            print(token, file=sys.stderr)
            return 0
        db = engine.open_pool(
            args.database_url, max_connections=1, create=args.command == "migrate"
        )
        return _schema_command(args, db)
    except (
        StartupError,
        TokenFileError,
        engine.DatabaseConfigError,
        migrator.DataLossRefused,
        migrator.MigrationLockTimeout,
    ) as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return 2
    except (pw.DatabaseError, pw.InterfaceError) as exc:
        # Operators see the database's own words; the migration (if any) was rolled back.
        print(f"enrollment-server: {args.command} failed: {exc}", file=sys.stderr)
        return 1


def health_check(args: argparse.Namespace) -> int:
    """The container's HEALTHCHECK: one grpc.health.v1 Check of the whole server."""
    host, port = addresses.split(args.address)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    target = addresses.join(host, port)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("enrollment-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        channel = open_channel(
            target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
        )
    except OSError as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}", file=sys.stderr)
            return 1
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {state}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _schema_command(args: argparse.Namespace, db) -> int:
    command = args.command
    try:
        if command == "migrate":
            applied = migrator.migrate(db)
            print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
        elif command == "rollback":
            undone = migrator.rollback(db, allow_data_loss=args.allow_data_loss)
            print(f"rolled back {undone}" if undone else "nothing to roll back")
        else:
            with db.connection_context():
                done = migrator.applied_migrations(db)
                pending = migrator.pending_migrations(db)
            for name in done:
                print(f"applied  {name}")
            for name in pending:
                print(f"pending  {name}")
    finally:
        engine.close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
