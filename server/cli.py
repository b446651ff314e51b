"""The enrollment-server command: serve, migrate, rollback, status."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import peewee as pw

from server import db as database
from server import logs, schema
from server.app import ServerConfig, StartupError, serve

DEFAULTS = ServerConfig()


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("ENROLLMENT_DATABASE_URL", DEFAULTS.database_url),
        help="database URL (env ENROLLMENT_DATABASE_URL; default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enrollment-server", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ENROLLMENT_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env ENROLLMENT_LOG_LEVEL; default %(default)s)",
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
        help="seconds a call waits for the database (a lock, a connection) before it fails "
        "as UNAVAILABLE (default %(default)s)",
    )

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logs.write_in_background()
    # peewee-migrate logs every step at INFO through its own logger.
    logging.getLogger("peewee_migrate").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            if args.max_workers < 1:
                raise StartupError("--max-workers must be 1 or more")
            if args.database_timeout <= 0 or args.grace < 0:
                raise StartupError("--database-timeout must be above 0 and --grace 0 or more")
            serve(
                ServerConfig(
                    address=args.address,
                    database_url=args.database_url,
                    grace_seconds=args.grace,
                    max_workers=args.max_workers,
                    database_timeout=args.database_timeout,
                )
            )
            return 0
        db = database.connect(
            args.database_url, max_connections=1, create=args.command == "migrate"
        )
        return _schema_command(args, db)
    except (StartupError, database.DatabaseConfigError, schema.DataLossRefused) as exc:
        print(f"enrollment-server: {exc}", file=sys.stderr)
        return 2
    except pw.DatabaseError as exc:
        # Operators see the database's own words; the migration (if any) was rolled back.
        print(f"enrollment-server: {args.command} failed: {exc}", file=sys.stderr)
        return 1


def _schema_command(args: argparse.Namespace, db) -> int:
    command = args.command
    try:
        if command == "migrate":
            applied = schema.migrate(db)
            print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
        elif command == "rollback":
            undone = schema.rollback(db, allow_data_loss=args.allow_data_loss)
            print(f"rolled back {undone}" if undone else "nothing to roll back")
        else:
            with db.connection_context():
                done = schema.applied_migrations(db)
                pending = schema.pending_migrations(db)
            for name in done:
                print(f"applied  {name}")
            for name in pending:
                print(f"pending  {name}")
    finally:
        database.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
