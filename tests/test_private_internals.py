"""Private names of our dependencies: used only where no public API does the job, each
behind a pin in pyproject.toml and a test here that fails loudly when the name moves."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from enrollment.server.domain import students
from enrollment.server.operations import logs
from enrollment.server.persistence import engine
from enrollment.server.persistence.models import Student
from enrollment.server.persistence.prepared import Prepared
from tests import databases

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "client", "migrations", "bench")

# Private names of our dependencies that code has used: each is looked for in the
# modules that import its owner, and allowed only in the files named (the tests below
# cover them).
PEEWEE = ("peewee", "playhouse")
PRIVATE = {
    # peewee's pool: engine.timeouts() says what it was opened with.
    "_wait_timeout": (PEEWEE, ()),
    # peewee-migrate: the rollback plan is read from migrator.orm.
    "__ops__": (("peewee_migrate",), ()),
    # grpcio-reflection: the public ServerReflectionInfo is overridden instead.
    "_file_by_filename": (("grpc_reflection",), ()),
    "_file_containing_symbol": (("grpc_reflection",), ()),
    "_file_containing_extension": (("grpc_reflection",), ()),
    "_all_extension_numbers_of_type": (("grpc_reflection",), ()),
    "_list_services": (("grpc_reflection",), ()),
    "_pool": (("grpc_reflection",), ()),
    # peewee's own row wrapper builds model instances this way; the public ways cost a
    # lookup 10-80% more (`python -m bench micro`, GetStudent and ListCourses).
    "__no_default__": (PEEWEE, ("server/persistence/prepared.py",)),
    "__data__": (PEEWEE, ("server/persistence/prepared.py",)),
    "_dirty": (PEEWEE, ()),
    # peewee's pools have no public count of the connections checked out.
    "_in_use": (PEEWEE, ("server/persistence/engine.py",)),
    # peewee's hook for each connection a pool hands out (MariaDB session settings).
    "_initialize_connection": (PEEWEE, ("server/persistence/engine.py",)),
    # Python's logging HOWTO (Optimization) names this as the way to skip the caller lookup.
    "_srcfile": (("logging",), ("server/operations/logs.py",)),
}


def names_in(path: Path) -> tuple[set[str], set[str]]:
    """The top-level packages a module imports, and its attribute names, keyword names,
    function names and string constants (as getattr takes them)."""
    imported, found = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
    return imported, found


def test_private_names_of_dependencies_only_where_allowed():
    misplaced = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            imported, found = names_in(path)
            for name in sorted(found & PRIVATE.keys()):
                owners, allowed = PRIVATE[name]
                if imported & set(owners) and relative not in allowed:
                    misplaced.append(f"{relative}: {name}")
    assert not misplaced, "private names used where a public API does the job or no test covers"


@pytest.mark.databases("sqlite")  # the instances, not the database, are under test
def test_prepared_rows_are_the_instances_peewee_builds(db_url):
    """Prepared.rows builds instances as peewee's row wrapper does, with the private
    __no_default__ and __data__: no defaults computed, nothing marked changed."""
    engine.open_pool(db_url, max_connections=2)
    try:
        with engine.proxy.connection_context():
            made = students.create_student(name="Ada", email="ada@example.com")
            by_id = Prepared(lambda i: Student.select().where(Student.id == i), 1)
            (ours,) = by_id.rows(made.id)
            theirs = Student.get_by_id(made.id)
        assert ours.__data__ == theirs.__data__
        assert not ours.is_dirty() and ours.dirty_fields == []
        # A renamed keyword would be set as an attribute, the defaults computed.
        assert "__no_default__" not in vars(ours)
    finally:
        engine.close_pool()


def test_peewee_wraps_the_drivers_errors_keeping_them_as_orig():
    """engine.py, notify.py and loop_reads.py raise psycopg2's errors as peewee's,
    through peewee's module-level __exception_wrapper__ (its stubs do not declare it),
    so that failures.py reads them as it reads a unit of work's."""
    import peewee as pw
    import psycopg2

    from enrollment.server.persistence import failures

    wrapper = vars(pw)["__exception_wrapper__"]
    lost = psycopg2.OperationalError("server closed the connection unexpectedly")
    with pytest.raises(pw.OperationalError) as raised, wrapper:
        raise lost
    assert raised.value.orig is lost
    assert failures.lost_connection(raised.value)
    assert failures.verdict(raised.value) is failures.Verdict.UNAVAILABLE


def test_the_pool_counts_the_connections_in_use(db_url):
    """engine.connections_in_use reads the pool's private _in_use."""
    db = engine.open_pool(db_url, max_connections=2)
    try:
        assert engine.connections_in_use() == 0
        with db.connection_context():
            db.execute_sql("SELECT 1")
            assert engine.connections_in_use() == 1
        assert engine.connections_in_use() == 0
    finally:
        engine.close_pool()


@pytest.mark.databases("mysql")
def test_every_pooled_mariadb_connection_gets_the_session_settings(db_url):
    """The settings are run from peewee's private _initialize_connection hook."""
    db = engine.open_pool(db_url, max_connections=1, timeout=3, statement_timeout=2)
    try:
        for _ in range(2):  # a new connection, then the same one from the pool
            with db.connection_context():
                row = databases.sql(
                    db,
                    "SELECT @@SESSION.tx_isolation, @@SESSION.innodb_lock_wait_timeout,"
                    " @@SESSION.max_statement_time",
                )[0]
            assert (row[0], int(row[1]), float(row[2])) == ("READ-COMMITTED", 3, 2.0)
    finally:
        engine.close_pool()


def test_log_records_skip_the_caller_lookup(monkeypatch):
    """logs.setup sets logging's private _srcfile to None: records carry no caller."""
    monkeypatch.setattr(logging, "_srcfile", logging._srcfile)
    monkeypatch.setattr(logging, "logThreads", logging.logThreads)
    monkeypatch.setattr(logging, "logMultiprocessing", logging.logMultiprocessing)
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("enrollment.test-private-internals")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        logger.info("before")
        logs.setup("INFO")
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    before, after = records
    assert before.pathname == __file__  # the test can tell the difference
    assert (after.pathname, after.lineno, after.funcName) == (
        "(unknown file)",
        0,
        "(unknown function)",
    )
