"""Driver options in a database URL add to the server's session settings and never
replace them: the lock and statement timeouts and the isolation level stay the server's."""

from __future__ import annotations

import time
from urllib.parse import quote

import peewee as pw
import pytest

from enrollment.server.persistence import engine
from enrollment.server.persistence.failures import Verdict, verdict
from tests import databases


@pytest.mark.databases("postgresql")
def test_postgresql_options_in_the_url_keep_the_servers_timeouts(db_url):
    url = f"{db_url}?options={quote('-c work_mem=8MB')}"
    db = engine.open_pool(url, max_connections=1, timeout=3, statement_timeout=2)
    try:
        with db.connection_context():
            got = [
                databases.sql(db, f"SHOW {name}")[0][0]
                for name in ("work_mem", "lock_timeout", "statement_timeout")
            ]
        assert got == ["8MB", "3s", "2s"]
    finally:
        engine.close_pool()


@pytest.mark.databases("mysql")
def test_a_mariadb_init_command_in_the_url_keeps_the_servers_session(db_url):
    command = quote("SET time_zone = '+01:00'")
    url = f"{db_url}?init_command={command}"
    db = engine.open_pool(url, max_connections=1, timeout=3, statement_timeout=2)
    try:
        with db.connection_context():
            row = databases.sql(
                db,
                "SELECT @@SESSION.time_zone, @@SESSION.tx_isolation,"
                " @@SESSION.innodb_lock_wait_timeout, @@SESSION.lock_wait_timeout",
            )[0]
        assert (row[0], row[1], int(row[2]), int(row[3])) == ("+01:00", "READ-COMMITTED", 3, 3)
    finally:
        engine.close_pool()


@pytest.mark.databases("mysql")
def test_a_mariadb_metadata_lock_wait_ends_with_the_database_timeout(db_url):
    """A schema change behind a transaction that read the table (a migration while a
    long transaction runs) waits --database-timeout, not MariaDB's default of a day,
    and is then a lock timeout like any other (UNAVAILABLE)."""
    with databases.connection(db_url) as holder:
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT COUNT(*) FROM students").fetchone()
        db = engine.open_pool(db_url, max_connections=1, timeout=2)
        try:
            started = time.monotonic()
            with pytest.raises(pw.DatabaseError) as raised, db.connection_context():
                db.execute_sql("ALTER TABLE students ADD COLUMN blocked_by_the_reader INT")
            waited = time.monotonic() - started
        finally:
            engine.close_pool()
            holder.execute_sql("ROLLBACK")
    assert waited < 10, waited
    assert verdict(raised.value) is Verdict.UNAVAILABLE, raised.value
