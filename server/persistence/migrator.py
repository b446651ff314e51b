"""Applies and checks the peewee-migrate migrations in migrations/."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import peewee as pw
from peewee_migrate import Router
from peewee_migrate.models import MIGRATE_TABLE

from enrollment.migrations import MIGRATIONS_DIR

log = logging.getLogger(__name__)


def router(db: pw.Database) -> Router:
    return Router(db, migrate_dir=MIGRATIONS_DIR, logger=log)


def known_migrations() -> list[str]:
    return sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.py"))


def applied_migrations(db: pw.Database) -> list[str]:
    """Names recorded as applied, read without creating anything."""
    if not db.table_exists(MIGRATE_TABLE):
        return []
    cursor = db.execute_sql(f"SELECT name FROM {MIGRATE_TABLE} ORDER BY id")
    return [row[0] for row in cursor.fetchall()]


def pending_migrations(db: pw.Database) -> list[str]:
    done = set(applied_migrations(db))
    return [name for name in known_migrations() if name not in done]


def unknown_migrations(db: pw.Database) -> list[str]:
    """Applied migrations this code does not know: the schema is newer than the code."""
    known = set(known_migrations())
    return [name for name in applied_migrations(db) if name not in known]


# One schema change at a time per database: a second migrate started at the same
# moment waits for the first, then finds nothing left to do.
LOCK_NAME = "enrollment.v1.schema"
LOCK_KEY = 0x656E726F6C6C  # PostgreSQL advisory lock key ("enroll")
LOCK_WAIT_SECONDS = 600


class MigrationLockTimeout(RuntimeError):
    """Another schema change held the database for longer than LOCK_WAIT_SECONDS."""


@contextlib.contextmanager
def schema_lock(db: pw.Database) -> Iterator[None]:
    """Hold the database's schema lock on the current connection."""
    if isinstance(db, pw.PostgresqlDatabase):
        # Polled rather than waited on, so the session's lock_timeout does not apply.
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not db.execute_sql("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise MigrationLockTimeout("another schema change holds the database")
            time.sleep(0.1)
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    elif isinstance(db, pw.MySQLDatabase):
        got = db.execute_sql("SELECT GET_LOCK(%s, %s)", (LOCK_NAME, LOCK_WAIT_SECONDS))
        if got.fetchone()[0] != 1:
            raise MigrationLockTimeout("another schema change holds the database")
        try:
            yield
        finally:
            db.execute_sql("SELECT RELEASE_LOCK(%s)", (LOCK_NAME,))
    else:
        # SQLite: the whole run in one exclusive transaction (DDL rolls back with it).
        # Its BEGIN waits the busy timeout (seconds), then tried again up to the same
        # LOCK_WAIT_SECONDS as the other databases.
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        with contextlib.ExitStack() as held:
            while True:
                try:
                    held.enter_context(db.atomic("EXCLUSIVE"))
                    break
                except pw.OperationalError as exc:
                    if "database is locked" not in str(exc):
                        raise
                    if time.monotonic() > deadline:
                        raise MigrationLockTimeout(
                            "another schema change holds the database"
                        ) from None
            yield


def migrate(db: pw.Database) -> list[str]:
    """Apply every pending migration; returns their names (empty when up to date)."""
    with db.connection_context(), schema_lock(db):
        applied = router(db).run()
        if isinstance(db, pw.PostgresqlDatabase):
            sync_sequences(db)
        return applied


def sync_sequences(db: pw.PostgresqlDatabase) -> None:
    """Move each id sequence past the largest id in its table.

    Rows loaded with explicit ids (a restore, a copy from another database) do not
    advance PostgreSQL's sequences; the next insert would then collide. A sequence
    only moves forward, so ids are never handed out twice.
    """
    for table in ("students", "courses"):
        if not db.table_exists(table):
            continue
        (sequence,) = db.execute_sql("SELECT pg_get_serial_sequence(%s, 'id')", (table,)).fetchone()
        last, called = db.execute_sql(f"SELECT last_value, is_called FROM {sequence}").fetchone()
        (largest,) = db.execute_sql(f"SELECT MAX(id) FROM {table}").fetchone()
        next_free = last + 1 if called else last
        if largest is not None and largest >= next_free:
            db.execute_sql("SELECT setval(%s, %s)", (sequence, largest))


class DataLossRefused(RuntimeError):
    """A rollback would drop tables that hold rows, or its migration refuses for a reason
    of its own (004's: waitlisted entries would become enrollments)."""


class UnknownMigration(RuntimeError):
    """The last applied migration is not one this code has: a newer version applied it."""


def rollback(db: pw.Database, *, allow_data_loss: bool = False) -> str | None:
    """Undo the last applied migration; returns its name, or None when none is applied.

    A rollback that would drop a table holding rows is refused unless allow_data_loss
    is set. The tables a rollback drops are read from its planned operations before
    anything runs, because MySQL commits DDL at once; on SQLite and PostgreSQL the
    result is checked again inside the transaction, which undoes everything if needed.
    """
    with db.connection_context(), schema_lock(db), db.atomic():
        done = applied_migrations(db)
        if not done:
            return None
        if done[-1] not in known_migrations():
            raise UnknownMigration(
                f"the last applied migration, {done[-1]}, is not one this version has (a "
                "newer version applied it): roll it back with that version; nothing was changed"
            )
        holding_rows = {t for t in db.get_tables() if t != MIGRATE_TABLE and _has_rows(db, t)}
        planned = _tables_dropped_by_rollback(router(db), done[-1])
        _refuse_loss(done[-1], holding_rows & planned, allow_data_loss)
        _refuse_lost_values(db, done[-1], allow_data_loss)
        try:
            router(db).rollback()
        except RuntimeError as exc:
            # The migration's own refusal (a DatabaseError is not a RuntimeError): it says
            # why, before it changed anything.
            raise DataLossRefused(str(exc)) from exc
        _refuse_loss(done[-1], holding_rows - set(db.get_tables()), allow_data_loss)
        return done[-1]


def _refuse_loss(name: str, dropped: set[str], allow_data_loss: bool) -> None:
    if dropped and not allow_data_loss:
        raise DataLossRefused(
            f"rolling back {name} would drop {', '.join(sorted(dropped))}, which hold rows; "
            "nothing was changed (pass --allow-data-loss to drop them)"
        )


def _refuse_lost_values(db: pw.Database, name: str, allow_data_loss: bool) -> None:
    """Refuse a rollback that drops columns holding values someone chose.

    A migration lists them in LOST_BY_ROLLBACK: a description with {} for the count, and
    the query that counts them. Its rollback function's module scope holds that name.
    """
    if allow_data_loss:
        return
    _, undo = router(db).read(name)
    lost = [
        what.format(count)
        for what, query in getattr(undo, "__globals__", {}).get("LOST_BY_ROLLBACK", {}).items()
        if (count := db.execute_sql(query).fetchone()[0])
    ]
    if lost:
        raise DataLossRefused(
            f"rolling back {name} would lose {', '.join(lost)}; "
            "nothing was changed (pass --allow-data-loss to lose it)"
        )


def _tables_dropped_by_rollback(migrations: Router, name: str) -> set[str]:
    """The tables the rollback of one migration drops, read from its plan, not run.

    The router's migrator holds the models of the applied migrations (migrator.orm);
    a rollback's remove_model takes its model out and plans the DROP TABLE, which runs
    only when the migrator is called. This router is thrown away unrun.
    """
    migrator = migrations.migrator
    before = {model._meta.table_name for model in migrator.orm}
    _, undo = migrations.read(name)
    undo(migrator, migrations.database, fake=False)
    return before - {model._meta.table_name for model in migrator.orm}


def _has_rows(db: pw.Database, table: str) -> bool:
    return pw.Table(table).select(pw.SQL("1")).limit(1).bind(db).scalar() is not None
