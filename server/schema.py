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


def router_names() -> list[str]:
    return sorted(p.stem for p in MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.py"))


def applied_migrations(db: pw.Database) -> list[str]:
    """Names recorded as applied, read without creating anything."""
    if not db.table_exists(MIGRATE_TABLE):
        return []
    cursor = db.execute_sql(f"SELECT name FROM {MIGRATE_TABLE} ORDER BY id")
    return [row[0] for row in cursor.fetchall()]


def pending_migrations(db: pw.Database) -> list[str]:
    done = set(applied_migrations(db))
    return [name for name in router_names() if name not in done]


def unknown_migrations(db: pw.Database) -> list[str]:
    """Applied migrations this code does not know: the schema is newer than the code."""
    known = set(router_names())
    return [name for name in applied_migrations(db) if name not in known]


def migrate(db: pw.Database) -> list[str]:
    """Apply every pending migration; returns their names (empty when up to date)."""
    with db.connection_context():
        return router(db).run()


def rollback(db: pw.Database) -> str | None:
    """Undo the last applied migration; returns its name, or None when none is applied."""
    with db.connection_context():
        done = applied_migrations(db)
        if not done:
            return None
        router(db).rollback()
        return done[-1]
