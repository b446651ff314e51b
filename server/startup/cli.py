"""The enrollment-server command: serve, health, migrate, rollback, status, hash-token."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

import grpc
import peewee as pw
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment.client.api import connection_hint, open_channel, read_tls_files, tls_flag
from enrollment.server import addresses
from enrollment.server.operations import logs
from enrollment.server.outage import first_line
from enrollment.server.persistence import engine, migrator
from enrollment.server.startup.config import (
    BY_NAME,
    SETTINGS,
    SWITCH,
    ServerConfig,
    Setting,
    StartupError,
    load,
    read,
    seconds,
)
from enrollment.server.startup.quiet import quiet_core
from enrollment.server.startup.server import serve
from enrollment.server.transport.auth import ROLES, TokenFileError, new_token_line

log = logging.getLogger("enrollment.server")

DESCRIPTION = """\
The enrollment server (serve) and its operations: health checks, migrations, tokens.
`enrollment-server COMMAND --help` describes each command.

--log-level and --log-format go before or after the command. Every serve flag has an environment
variable (see `enrollment-server serve --help`); a flag wins over its variable. A bad
value stops the command with one line on stderr and exit status 2."""

SERVE_DESCRIPTION = (
    "Serve the gRPC API (enrollment.v1.EnrollmentService, health, reflection) until "
    "SIGTERM or SIGINT, then drain in-flight calls within --grace. Refuses a database "
    "whose schema is behind this server: run `enrollment-server migrate` first."
)


# Settings every command takes, before or after its name.
GLOBAL_SETTINGS = ("log_level", "log_format", "log_sql_values")


def _default_text(setting: Setting) -> str:
    if setting.default_text is not None:
        return setting.default_text
    if isinstance(setting.default, float):
        return f"{setting.default:g}"
    return str(setting.default)


def _add_setting(
    parser: argparse.ArgumentParser,
    setting: Setting,
    *,
    text: str | None = None,
    in_subcommand: bool = False,
) -> None:
    """A flag read as text: config.load/read parse it together with its variable, so a bad
    value fails the same way from either. In a subcommand a global flag's default is
    SUPPRESS, so that one given there wins and an absent one leaves the global alone."""
    help_text = f"{text or setting.help} (env {setting.env}; default {_default_text(setting)})"
    default = argparse.SUPPRESS if in_subcommand else None
    if setting.kind is SWITCH:  # given: "1", as its variable would say
        parser.add_argument(
            setting.flag, dest=setting.flag, action="store_const", const="1", default=default,
            help=help_text.replace("%", "%%"),
        )  # fmt: skip
        return
    parser.add_argument(
        setting.flag,
        dest=setting.flag,
        metavar=setting.metavar,
        default=default,
        help=help_text.replace("%", "%%"),
    )
    for old in setting.deprecated_flags:
        parser.add_argument(
            old,
            dest=old,
            metavar=setting.metavar,
            default=None,
            help=f"deprecated: the old name of {setting.flag}, which wins if both are given",
        )


def _subcommand(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=text, description=description or text[0].upper() + text[1:] + "."
    )
    for name in GLOBAL_SETTINGS:
        _add_setting(sub, BY_NAME[name], in_subcommand=True)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enrollment-server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in GLOBAL_SETTINGS:
        _add_setting(parser, BY_NAME[name])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _subcommand(commands, "serve", "serve the gRPC API", SERVE_DESCRIPTION)
    for setting in SETTINGS:
        if setting.name not in GLOBAL_SETTINGS:
            _add_setting(run, setting)

    probe = _subcommand(
        commands,
        "health",
        "ask a running server's grpc.health.v1 service; exit 0 when SERVING",
        "Ask a running server's grpc.health.v1 service about the whole server; exit 0 "
        "only when it answers SERVING (the container's health check).",
    )
    _add_setting(
        probe,
        BY_NAME["address"],
        text="HOST:PORT of the server; 0.0.0.0 or [::] means this host",
    )
    probe.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_probe_timeout,
        default=3.0,
        help="deadline of the check (default %(default)s)",
    )
    probe.add_argument(
        "--tls-ca", metavar="PEM", help="CA of a TLS server's certificate (turns TLS on)"
    )
    probe.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate, for a server that asks (mTLS)"
    )
    probe.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")

    for name, text in (
        ("migrate", "apply pending migrations (creates a missing SQLite file)"),
        ("rollback", "undo the last applied migration"),
        ("status", "list applied and pending migrations"),
    ):
        _add_setting(_subcommand(commands, name, text), BY_NAME["database_url"])
    commands.choices["rollback"].add_argument(
        "--allow-data-loss",
        action="store_true",
        help="allow a rollback that drops tables holding rows (refused otherwise)",
    )
    token = _subcommand(
        commands,
        "hash-token",
        "make a new random token: its tokens-file line on stdout, the token on stderr",
        "Make a new random bearer token. Prints the line for the --auth-tokens "
        "file on stdout and the token itself on stderr, so that "
        "`enrollment-server hash-token --role reader --name NAME 2> NAME.token >> tokens.txt` "
        "adds the line and keeps the token. The token is not stored anywhere else.",
    )
    token.add_argument("--role", choices=ROLES, default="reader", help="default %(default)s")
    token.add_argument(
        "--name",
        required=True,
        help="required: the name the log shows for calls with this token, 1-64 characters "
        "of A-Z a-z 0-9 . _ @ -; each token in a file needs a name of its own",
    )
    return parser


def _flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The flags given, by flag name (settings are stored under their flag)."""
    return {key: value for key, value in vars(args).items() if key.startswith("--")}


def serve_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """serve's configuration: its flags, then ENROLLMENT_* variables, then the defaults."""
    return load(_flags(args), os.environ if environ is None else environ)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = _flags(args)
    log_format = _log_format(flags)
    try:
        if args.command == "serve":
            config = serve_config(args)
            logs.setup(config.log_level, config.log_format, sql_values=config.log_sql_values)
            for setting in SETTINGS:
                for old in setting.deprecated_flags:
                    if flags.get(old) is not None:
                        log.warning("%s is deprecated: use %s", old, setting.flag)
        else:
            logs.setup(
                read("log_level", flags, os.environ),
                read("log_format", flags, os.environ),  # a bad one refused, as serve does
                sql_values=read("log_sql_values", flags, os.environ),
            )
        # peewee-migrate logs every step at INFO through its own logger.
        logging.getLogger("peewee_migrate").setLevel(logging.WARNING)
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger(migrator.__name__).addFilter(_failures_said_once)
        if args.command == "serve":
            serve(config)
            return 0
        if args.command == "health":
            return health_check(args, read("address", flags, os.environ))
        if args.command == "hash-token":
            token, line = new_token_line(args.role, args.name)
            print(line)
            print(token, file=sys.stderr)
            return 0
        url = read("database_url", flags, os.environ)
        db = engine.open_pool(url, max_connections=1, create=args.command == "migrate")
        return _schema_command(args, db)
    except (
        StartupError,
        TokenFileError,
        engine.DatabaseConfigError,
        migrator.DataLossRefused,
        migrator.MigrationLockTimeout,
        migrator.UnknownMigration,
    ) as exc:
        _say_failure(str(exc), log_format)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C before serve's own signal handling (a database slow to answer at
        # start-up) or during a schema command; 130 as a shell reports it.
        _say_failure(f"{args.command} interrupted", log_format)
        return 130
    except (pw.DatabaseError, pw.InterfaceError) as exc:
        # Operators see the database's own words; the migration (if any) was rolled back.
        # One line: psycopg2 adds a hint on lines of its own ("Is the server running…").
        _say_failure(f"{args.command} failed: {first_line(exc)}", log_format)
        return 1


def _log_format(flags: dict[str, str | None]) -> str:
    """--log-format or ENROLLMENT_LOG_FORMAT, read before anything else can fail; a bad
    value is reported later, as text, with the rest of serve's settings."""
    try:
        return str(read("log_format", flags, os.environ))
    except StartupError:
        return "text"


def _say_failure(message: str, log_format: str) -> None:
    """The one line a failed command ends with: "enrollment-server: …" on stderr, or with
    JSON logs a JSON object at ERROR like every other line (a pipeline reads them all)."""
    if log_format != "json":
        print(f"enrollment-server: {message}", file=sys.stderr)
        return
    if not logs.configured():  # failed before its settings were read
        logs.setup("INFO", "json")
    log.error(message)


class _FailuresSaidOnce(logging.Filter):
    """peewee-migrate logs a failed migration or rollback with its traceback, then raises
    it again: the command says it in one line (main), the migration's transaction undone.
    At --log-level DEBUG the traceback is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.msg == "%s failed: %s")


_failures_said_once = _FailuresSaidOnce()


def _probe_timeout(text: str) -> float:
    """health --timeout: above 0 (grpc took 0 as no deadline and -1 as one past)."""
    try:
        return float(seconds(above_zero=True).parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def health_check(args: argparse.Namespace, address: str) -> int:
    """The container's HEALTHCHECK: one grpc.health.v1 Check of the whole server."""
    host, port = addresses.split(address)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    target = addresses.join(host, port)
    try:
        # Checked first, so that a message names the flag rather than the parameter.
        read_tls_files(args.tls_ca, args.tls_cert, args.tls_key, spelled=tls_flag)
        channel = open_channel(
            target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
        )
    except ValueError as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            # grpc's core logs a failed TLS handshake (at INFO) before our one line.
            with quiet_core():
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
                )
        except grpc.RpcError as error:
            hint = ""
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                tls = bool(args.tls_ca or args.tls_cert)
                hint = connection_hint(
                    error.details() or "", tls=tls, client_cert=bool(args.tls_cert)
                )
            print(f"{address}: {error.code().name}{f' ({hint})' if hint else ''}", file=sys.stderr)
            return 1
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {state}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _schema_command(args: argparse.Namespace, db: pw.Database) -> int:
    command = args.command
    try:
        if command == "migrate":
            applied = migrator.migrate(db)
            if applied:
                print(f"applied {', '.join(applied)}")
            else:
                with db.connection_context():
                    newer = migrator.unknown_migrations(db)
                print(
                    f"nothing to apply; the schema is newer than this version ({', '.join(newer)})"
                    if newer
                    else "schema is up to date"
                )
        elif command == "rollback":
            undone = migrator.rollback(db, allow_data_loss=args.allow_data_loss)
            print(f"rolled back {undone}" if undone else "nothing to roll back")
        else:
            with db.connection_context():
                done = migrator.applied_migrations(db)
                pending = migrator.pending_migrations(db)
                unknown = set(migrator.unknown_migrations(db))
            for name in done:
                note = " (unknown to this version: a newer version applied it)"
                print(f"applied  {name}{note if name in unknown else ''}")
            for name in pending:
                print(f"pending  {name}")
    finally:
        engine.close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
