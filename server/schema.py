"""Applies and checks the peewee-migrate migrations in migrations/."""

from __future__ import annotations

import logging

import peewee as pw
from peewee_migrate import Router
from peewee_migrate.models import MIGRATE_TABLE

from migrations import MIGRATIONS_DIR

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


def migrate(db: pw.Database) -> list[str]:
    """Apply every pending migration; returns their names (empty when up to date)."""
    with db.connection_context():
        return router(db).run()


class DataLossRefused(RuntimeError):
    """A rollback would drop tables that hold rows."""


def rollback(db: pw.Database, *, allow_data_loss: bool = False) -> str | None:
    """Undo the last applied migration; returns its name, or None when none is applied.

    A rollback that would drop a table holding rows is undone and refused unless
    allow_data_loss is set (SQLite rolls DDL back with the transaction).
    """
    with db.connection_context(), db.atomic():
        done = applied_migrations(db)
        if not done:
            return None
        holding_rows = [t for t in db.get_tables() if t != MIGRATE_TABLE and _has_rows(db, t)]
        router(db).rollback()
        dropped = sorted(set(holding_rows) - set(db.get_tables()))
        if dropped and not allow_data_loss:
            raise DataLossRefused(
                f"rolling back {done[-1]} would drop {', '.join(dropped)}, which hold rows; "
                "nothing was changed (pass --allow-data-loss to drop them)"
            )
        return done[-1]


def _has_rows(db: pw.Database, table: str) -> bool:
    return pw.Table(table).select(pw.SQL("1")).limit(1).bind(db).scalar() is not None
