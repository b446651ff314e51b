"""Failures the server must not lie about: a connection lost at COMMIT (outcome unknown),
and a full disk (STORAGE_FULL, reads keep working, recovery without a restart)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import re
import time

import grpc
import peewee as pw
import psycopg2.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from playhouse.pool import PooledPostgresqlDatabase

from enrollment.server.domain import courses, enrollments, students
from enrollment.server.operations.health import HealthMonitor
from enrollment.server.persistence import engine, migrator, outbox, prepared, unit_of_work
from enrollment.server.persistence.failures import Occurrences, Verdict, classify
from enrollment.server.persistence.models import proxy as database
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.mounts import small_tmpfs
from tests.proxy import stub_through_proxy
from tests.rpc import expect_error, new_course, new_student
from tests.servers import scrape

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ commit outcome unknown


@pytest.mark.databases("postgresql", "mysql")
def test_connection_lost_at_commit_is_outcome_unknown_not_unavailable(db_url):
    """The COMMIT reaches the database and commits; its answer never comes back. The
    caller must not be told "nothing changed" (DATABASE_UNAVAILABLE)."""
    with stub_through_proxy(db_url) as (proxy, stub):
        course = new_course(stub, capacity=5)
        student = new_student(stub)

        proxy.cut_at_commit()
        got = expect_error(
            stub.EnrollStudent,
            pb.EnrollStudentRequest(student_id=student.id, course_id=course.id),
            UNAVAILABLE,
            "COMMIT_OUTCOME_UNKNOWN",
        )
        assert proxy.commits_cut == 1
        assert "may have" in got.message
        # It did commit: the answer was the only thing lost.
        rows = databases.query(
            db_url,
            "SELECT COUNT(*) FROM student_courses WHERE student_id = ? AND course_id = ?",
            (student.id, course.id),
        )
        assert rows[0][0] == 1
        # Not retried inside the server: one COMMIT was cut and the next call is served.
        expect_error(
            stub.EnrollStudent,
            pb.EnrollStudentRequest(student_id=student.id, course_id=course.id),
            grpc.StatusCode.ALREADY_EXISTS,
            "ALREADY_ENROLLED",
        )

        # A write that fails before its COMMIT still says "nothing changed".
        proxy.cut()
        expect_error(
            stub.CreateStudent,
            pb.CreateStudentRequest(name="Before", email="before@example.com"),
            UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        proxy.restore()


COUNTER = "SELECT value FROM event_counters WHERE name = 'sequence'"


@pytest.mark.databases("postgresql")
def test_the_events_statement_carries_the_commit_and_its_failures_say_what_is_known(db_url):
    """On PostgreSQL a write's COMMIT goes in one round trip with the statement that
    numbers its events (outbox.py). An error the database answers that statement with
    means nothing was committed, and the caller gets that error's own status; a timeout
    may have struck the COMMIT itself, so it is "may have been made"."""
    with stub_through_proxy(db_url) as (_proxy, stub):
        course = new_course(stub, capacity=5)
        student = new_student(stub)
        request = pb.EnrollStudentRequest(student_id=student.id, course_id=course.id)
        (before,) = databases.query(db_url, COUNTER)[0]

        # The statement fails inside: a trigger on the event rows refuses them.
        with databases.connection(db_url) as db:
            db.execute_sql(
                "CREATE FUNCTION refuse_events() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
            )
            db.execute_sql(
                "CREATE TRIGGER refuse_events BEFORE INSERT ON events "
                "FOR EACH ROW EXECUTE FUNCTION refuse_events()"
            )
        try:
            expect_error(stub.EnrollStudent, request, grpc.StatusCode.INTERNAL, "INTERNAL")
        finally:
            with databases.connection(db_url) as db:
                db.execute_sql("DROP TRIGGER refuse_events ON events")
                db.execute_sql("DROP FUNCTION refuse_events()")

        # The statement times out waiting for the counter's row, which another
        # transaction holds past --database-timeout: the server cannot tell that from
        # a timeout of the COMMIT, so it does not say "nothing changed".
        with databases.connection(db_url) as holder, holder.atomic():
            holder.execute_sql(f"{COUNTER} FOR UPDATE")
            expect_error(stub.EnrollStudent, request, UNAVAILABLE, "COMMIT_OUTCOME_UNKNOWN")

        # Neither committed anything.
        enrolled = databases.query(
            db_url, "SELECT COUNT(*) FROM student_courses WHERE student_id = ?", (student.id,)
        )
        assert enrolled[0][0] == 0
        assert databases.query(db_url, COUNTER)[0][0] == before
        # With the row free again the same call goes through, its events numbered next.
        stub.EnrollStudent(request)
        assert databases.query(db_url, COUNTER)[0][0] == before + 1


@pytest.mark.databases("postgresql")
def test_a_write_with_events_sends_no_commit_of_its_own(db_url, monkeypatch):
    """The COMMIT went with the events' statement: the unit of work's own commit sends
    nothing (the write committed all the same), and the next transaction starts anew."""
    sent: list[str] = []
    commit = PooledPostgresqlDatabase.commit

    def counted(self):
        sent.append("COMMIT")
        return commit(self)

    monkeypatch.setattr(PooledPostgresqlDatabase, "commit", counted)
    engine.open_pool(db_url, max_connections=2)
    try:
        with database.connection_context():  # one connection throughout: its notices
            students.create_student(name="One", email="one@example.com")  # events: 1
            assert sent == []
            with database.atomic():  # a transaction of its own, committed as usual
                database.execute_sql("SELECT 1")
            assert sent == ["COMMIT"]
            # A second COMMIT sent anyway would have drawn PostgreSQL's warning.
            notices = database.connection().notices
            assert not [n for n in notices if "no transaction in progress" in n], notices
    finally:
        engine.close_pool()
    assert databases.query(db_url, "SELECT COUNT(*) FROM students")[0][0] == 1


class _Sent:
    """A cursor that records the text of every round trip it makes."""

    def __init__(self, cursor, sent: list[str]) -> None:
        self._cursor, self._sent = cursor, sent

    def execute(self, sql, params=None):
        self._sent.append(sql)
        return self._cursor.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


@pytest.mark.databases("postgresql")
def test_begin_goes_with_the_first_statement(db_url, monkeypatch):
    """On PostgreSQL a transaction's BEGIN goes in the round trip of its first
    statement (engine.PooledPostgresDatabase); one that runs no statement sends
    nothing; a failed first statement leaves a transaction that the rollback ends."""
    engine.open_pool(db_url, max_connections=2)
    sent: list[str] = []
    cursor = database.obj.cursor
    monkeypatch.setattr(database.obj, "cursor", lambda *a: _Sent(cursor(*a), sent))
    try:
        with database.connection_context():
            students.create_student(name="One", email="one@example.com")
            assert sent[0].startswith("BEGIN; "), sent
            assert not [sql for sql in sent if sql.strip().upper() == "BEGIN"], sent
            assert sent[-1].endswith("; COMMIT"), sent  # the events' statement

            sent.clear()
            with database.atomic():
                database.execute_sql("SELECT 1")
            assert sent == ["BEGIN; SELECT 1", "COMMIT"]

            sent.clear()
            with database.atomic():
                pass
            assert sent == []

            sent.clear()
            with pytest.raises(pw.IntegrityError), database.atomic():
                database.execute_sql(
                    "INSERT INTO students (name, email) VALUES ('Two', 'one@example.com')"
                )
            assert sent[0].startswith("BEGIN; INSERT") and sent[-1] == "ROLLBACK", sent
            assert database.connection().info.transaction_status == 0  # idle
            # A statement outside a transaction runs alone.
            sent.clear()
            database.execute_sql("SELECT 1")
            assert sent == ["SELECT 1"]
    finally:
        monkeypatch.undo()
        engine.close_pool()
    assert databases.query(db_url, "SELECT COUNT(*) FROM students")[0][0] == 1


@pytest.mark.databases("postgresql")
def test_savepoints_and_deferred_statements_go_with_the_next_statement(db_url, monkeypatch):
    """On PostgreSQL a savepoint's SAVEPOINT, RELEASE and ROLLBACK TO, and a statement
    whose result is not read (execute_later), go in the round trip of the statement
    after them (engine.PooledPostgresDatabase): a failure inside the savepoint still
    leaves its transaction usable, one that ran no statement sends nothing, and a
    deferred statement's failure fails its transaction."""
    engine.open_pool(db_url, max_connections=2)
    sent: list[str] = []
    cursor = database.obj.cursor
    monkeypatch.setattr(database.obj, "cursor", lambda *a: _Sent(cursor(*a), sent))
    insert = "INSERT INTO keys VALUES ('{0}')"
    try:
        with database.connection_context():
            # CreateStudent: its turn among creates (outbox.take_turn), then its unique
            # insert in a savepoint, then the events' statement.
            student = students.create_student(name="One", email="one@example.com")
            assert len(sent) == 2, sent
            turn = r'INSERT INTO "event_counters" .* ON CONFLICT \("name"\) DO UPDATE .*'
            assert re.fullmatch(rf'BEGIN; {turn}; SAVEPOINT "(\w+)"; INSERT .*', sent[0]), sent
            assert re.fullmatch(r'RELEASE SAVEPOINT "\w+"; WITH .*; COMMIT', sent[1]), sent
            # EnrollStudent: the seat, the entry in a savepoint, the events; DropCourse:
            # the course, the entry, the seat given back with the events.
            course = courses.create_course(code="C-1", title="One", capacity=2)
            sent.clear()
            enrollments.enroll_student(student_id=student.id, course_id=course.id)
            assert len(sent) == 3, sent
            assert sent[0].startswith('BEGIN; UPDATE "courses"'), sent
            assert re.fullmatch(r'SAVEPOINT "\w+"; INSERT INTO "student_courses" .*', sent[1])
            assert re.fullmatch(r'RELEASE SAVEPOINT "\w+"; WITH .*; COMMIT', sent[2]), sent
            sent.clear()
            enrollments.drop_course(student_id=student.id, course_id=course.id)
            assert len(sent) == 3, sent
            assert re.fullmatch(r'UPDATE "courses" .*; WITH .*; COMMIT', sent[2]), sent

            database.execute_sql("CREATE TEMPORARY TABLE keys (k text PRIMARY KEY)")
            database.execute_sql(insert.format("one"))
            sent.clear()
            with database.atomic():
                with pytest.raises(pw.IntegrityError), database.atomic():
                    database.execute_sql(insert.format("one"))  # taken
                database.execute_sql(insert.format("two"))
                with database.atomic():
                    pass
                with database.atomic():
                    database.execute_sql("SELECT 1")
            names = re.findall(r'SAVEPOINT "(\w+)"', " ".join(sent))
            assert sent == [
                f'BEGIN; SAVEPOINT "{names[0]}"; {insert.format("one")}',
                f'ROLLBACK TO SAVEPOINT "{names[0]}"; {insert.format("two")}',
                f'SAVEPOINT "{names[2]}"; SELECT 1',
                f'RELEASE SAVEPOINT "{names[2]}"; COMMIT',
            ], sent
            assert database.connection().info.transaction_status == 0  # idle

            sent.clear()  # a rollback drops what was not sent
            with pytest.raises(RuntimeError), database.atomic():
                with database.atomic():
                    database.execute_sql(insert.format("three"))
                raise RuntimeError("undo")
            assert sent[1:] == ["ROLLBACK"], sent

            later = "INSERT INTO keys VALUES (%s)"
            sent.clear()
            with database.atomic():
                database.execute_later(later, ("four",))
                found = database.execute_sql("SELECT k FROM keys WHERE k = %s", ("four",))
                assert found.fetchall() == [("four",)]
                database.execute_later(later, ("five",))
            assert sent == [
                f"BEGIN; {later}; SELECT k FROM keys WHERE k = %s",
                f"{later}; COMMIT",
            ], sent

            sent.clear()  # deferred in a savepoint undone: never sent
            with database.atomic():
                database.execute_sql("SELECT 1")
                with pytest.raises(RuntimeError), database.atomic():
                    database.execute_later(later, ("six",))
                    raise RuntimeError("undo")
            assert sent == ["BEGIN; SELECT 1", "COMMIT"], sent

            sent.clear()  # a deferred statement that fails fails the transaction
            with pytest.raises(pw.IntegrityError), database.atomic():
                database.execute_sql(later, ("seven",))
                database.execute_later(later, ("one",))
            assert sent == [f"BEGIN; {later}", f"{later}; COMMIT", "ROLLBACK"], sent
            assert database.connection().info.transaction_status == 0  # idle

            keys = database.execute_sql("SELECT k FROM keys ORDER BY k").fetchall()
            assert [k for (k,) in keys] == ["five", "four", "one", "two"]
    finally:
        monkeypatch.undo()
        engine.close_pool()


@pytest.mark.databases("postgresql")
def test_hot_inserts_are_prepared_once_per_connection(db_url, monkeypatch, caplog):
    """On PostgreSQL the serving pool PREPAREs the statements it is given on each
    connection when it is checked out, then sends EXECUTE for them
    (engine.PooledPostgresDatabase): the same rows, fewer parses. Only INSERTs are
    given (prepared.to_prepare says why); a statement the database refuses is logged
    and sent as it is; a new connection prepares again; a statement the session lost
    costs no call and ends preparing; prepare=false in the URL prepares nothing."""
    engine.open_pool(db_url, max_connections=2)
    given = [*prepared.to_prepare(), *outbox.to_prepare()]
    assert len(given) == 3 + outbox.PREPARED_ROWS, given
    assert all(sql.startswith(("INSERT ", "WITH c AS (INSERT ")) for sql in given), given
    refused = "SELECT %s + %s"  # PostgreSQL cannot tell its values' types
    database.obj.prepare_statements([*given, refused])
    sent: list[str] = []
    cursor = database.obj.cursor
    monkeypatch.setattr(database.obj, "cursor", lambda *a: _Sent(cursor(*a), sent))

    def prepared_here() -> list[str]:
        found = database.execute_sql("SELECT statement FROM pg_prepared_statements")
        return [text for (text,) in found.fetchall()]

    try:
        with (
            caplog.at_level(logging.WARNING, logger="enrollment.db"),
            database.connection_context(),
        ):
            assert len(prepared_here()) == len(given)
            assert "cannot be prepared" in caplog.text
            assert database.execute_sql(refused, (1, 2)).fetchone() == (3,)
            assert sent[-1] == refused, sent
            student = students.create_student(name="One", email="one@example.com")
            course = courses.create_course(code="C-1", title="One", capacity=2)
            sent.clear()
            entry = enrollments.enroll_student(student_id=student.id, course_id=course.id)
            assert len(sent) == 3, sent
            values = r"\(%s(, %s)*\)"
            assert re.fullmatch(rf'SAVEPOINT "\w+"; EXECUTE enrollment_\d+{values}', sent[1])
            assert re.fullmatch(
                rf'RELEASE SAVEPOINT "\w+"; EXECUTE enrollment_\d+{values}; COMMIT', sent[2]
            ), sent
        assert entry.course_id == course.id
        rows = databases.query(db_url, "SELECT student_id, course_id FROM student_courses")
        assert rows == [(student.id, course.id)]
        events = databases.query(db_url, "SELECT sequence, course_id FROM events ORDER BY 1")
        assert events == [(1, 0), (2, course.id), (3, course.id)]
        database.obj.close_all()  # a new connection prepares again
        with database.connection_context():
            assert len(prepared_here()) == len(given)
            # A pooler in transaction mode hands the session to others, whose
            # DISCARD ALL (or another server connection) loses what was prepared: the
            # call still succeeds, run again unprepared, and preparing stops.
            database.connection().cursor().execute("DEALLOCATE ALL")
            sent.clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="enrollment.db"):
                students.create_student(name="Three", email="three@example.com")
            assert "lost a statement" in caplog.text
            # The first statement lost is the create's turn (outbox.take_turn).
            assert "EXECUTE" in sent[0] and sent[1] == "ROLLBACK", sent
            assert re.fullmatch(r'RELEASE SAVEPOINT "\w+"; WITH .*; COMMIT', sent[-1]), sent
            assert len(sent) == 4, sent
            sent.clear()
            students.create_student(name="Four", email="four@example.com")
            assert len(sent) == 2 and "EXECUTE" not in " ".join(sent), sent
    finally:
        monkeypatch.undo()
        engine.close_pool()

    engine.open_pool(f"{db_url}?prepare=false", max_connections=1)
    try:
        database.obj.prepare_statements(given)
        with database.connection_context():
            assert prepared_here() == []
            students.create_student(name="Two", email="two@example.com")
    finally:
        engine.close_pool()
    assert databases.query(db_url, "SELECT COUNT(*) FROM students")[0][0] == 4


@pytest.mark.databases("postgresql", "mysql")
def test_a_read_lost_at_commit_is_still_database_unavailable(db_url):
    """A read changes nothing whatever its COMMIT did: retrying it as it is stays safe."""
    with stub_through_proxy(db_url) as (proxy, stub):
        student = new_student(stub)
        proxy.cut_at_commit()
        # A read that runs in a transaction (GetStudent runs its one statement without
        # BEGIN/COMMIT since the hot reads went snapshot-free).
        expect_error(
            stub.ListEnrollments,
            pb.ListEnrollmentsRequest(student_id=student.id),
            UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        assert proxy.commits_cut == 1


@pytest.mark.databases("postgresql")
def test_an_id_collision_is_not_reported_as_a_taken_email_or_code(db_url, stub):
    """After a restore or an import that wrote ids itself, PostgreSQL's id sequences can
    lag behind the table: the next insert collides on its primary key. That is the
    server's fault, not the caller's: INTERNAL, not ALREADY_EXISTS / EMAIL_TAKEN (which
    would send whoever reads it after a duplicate that does not exist), and nothing
    changes."""
    student, course = new_student(stub), new_course(stub)
    for table, taken in (("students", student.id), ("courses", course.id)):
        # The next id handed out is one a row holds.
        databases.query(
            db_url, f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {taken}, false)"
        )
    counts = "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM students), " + (
        "(SELECT COUNT(*) FROM courses)"
    )
    before = databases.query(db_url, counts)
    for call, request in (
        (stub.CreateStudent, pb.CreateStudentRequest(name="New", email="new-one@x.io")),
        (stub.CreateCourse, pb.CreateCourseRequest(code="NEW-1", title="New")),
    ):
        expect_error(call, request, grpc.StatusCode.INTERNAL, "INTERNAL")
    assert databases.query(db_url, counts) == before
    # The unique keys still answer for themselves.
    expect_error(
        stub.CreateStudent,
        pb.CreateStudentRequest(name="Again", email=student.email),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_TAKEN",
    )


@pytest.mark.databases("postgresql", "mysql")
def test_kept_connections_cut_by_the_database_cost_no_call(db_url):
    """The serving threads keep their connections between calls on PostgreSQL and
    MariaDB, without the pool's test on checkout (startup/server.py). When the database
    drops them all (a restart, an idle timeout), the calls after still succeed, each
    run again once on a new connection, and a write so run again is made once."""

    def at_once(call, count=16):
        with concurrent.futures.ThreadPoolExecutor(count) as running:
            return list(running.map(lambda _: call(), range(count)))

    with stub_through_proxy(db_url) as (proxy, stub):
        student = new_student(stub)
        read = pb.GetStudentRequest(student_id=student.id)
        at_once(lambda: stub.GetStudent(read, timeout=10))  # every thread keeps one
        proxy.cut()
        proxy.restore()
        got = at_once(lambda: stub.GetStudent(read, timeout=10))
        assert {reply.student.id for reply in got} == {student.id}

        at_once(lambda: stub.GetStudent(read, timeout=10))  # every thread keeps one again
        (before,) = databases.query(db_url, "SELECT COUNT(*) FROM events")[0]
        proxy.cut()
        proxy.restore()
        made = at_once(lambda: new_student(stub))
        assert len({s.id for s in made}) == 16
        ids = ", ".join(str(s.id) for s in made)
        assert databases.query(db_url, f"SELECT COUNT(*) FROM students WHERE id IN ({ids})")[0] == (
            16,
        )
        assert databases.query(db_url, "SELECT COUNT(*) FROM events")[0] == (before + 16,)


# ------------------------------------------------------------------------- storage full


def fill(path) -> None:
    """Write to path until the file system has no byte left."""
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with open(path, "ab", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0")


@pytest.mark.databases("sqlite")
def test_sqlite_on_a_full_disk_is_storage_full_reads_work_and_writes_recover(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with small_tmpfs(tmp_path / "small", "3m") as disk:
        url = f"sqlite:///{disk / 'enrollment.db'}"
        db = engine.open_pool(url, max_connections=2, create=True)
        migrator.migrate(db)
        engine.close_pool()
        running = create_server(
            ServerConfig(
                address="127.0.0.1:0",
                database_url=url,
                metrics_address="127.0.0.1:0",
                health_interval=0.2,
            )
        )
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            kept = new_student(stub, name="Kept")
            fill(disk / "filler")

            refused = 0
            for attempt in range(3000):
                request = pb.CreateStudentRequest(
                    name="N" * 200, email=f"full{attempt}@example.com"
                )
                try:
                    stub.CreateStudent(request, timeout=10)
                except grpc.RpcError as error:
                    got = expect_error(stub.CreateStudent, request, UNAVAILABLE, "STORAGE_FULL")
                    assert "full" in got.message and "/" not in got.message
                    assert error.code() == UNAVAILABLE
                    refused += 2
                    if refused >= 6:
                        break
            assert refused >= 6, "the disk never filled up"

            # Reads keep working, and so does the health check.
            again = stub.GetStudent(pb.GetStudentRequest(student_id=kept.id), timeout=10)
            assert again.student.name == "Kept"
            assert stub.ListStudents(pb.ListStudentsRequest(), timeout=10).students
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            # Counted in metrics; logged as one line, no traceback.
            metrics = scrape(running.metrics_port)
            assert metrics[("enrollment_storage_full_total", ())] >= refused
            full_lines = [r for r in caplog.records if "storage full" in r.getMessage()]
            assert len(full_lines) == 1, [r.getMessage() for r in full_lines]
            assert not [r for r in caplog.records if r.exc_info], "no traceback for a full disk"

            # Space freed: writes work again without a restart.
            os.remove(disk / "filler")
            new_student(stub, name="After")
        finally:
            channel.close()
            running.stop(None).wait(10)
            running.wait_idle()
            engine.close_pool()


def test_disk_full_is_recognised_on_sqlite_and_postgresql(tmp_path):
    """SQLite's SQLITE_FULL (here from max_page_count) and PostgreSQL's 53100 are FULL."""
    sqlite = pw.SqliteDatabase(str(tmp_path / "tiny.db"), pragmas={"max_page_count": 8})
    sqlite.execute_sql("CREATE TABLE t (x TEXT)")
    with pytest.raises(pw.OperationalError) as raised:
        for _ in range(100):
            sqlite.execute_sql("INSERT INTO t VALUES (?)", ("x" * 4000,))
    sqlite.close()
    assert classify(raised.value) is Verdict.FULL, raised.value

    # psycopg2 raises this class for SQLSTATE 53100; filling a PostgreSQL disk is not
    # something a test can do to a shared server.
    assert classify(pw.OperationalError(psycopg2.errors.DiskFull("no space"))) is Verdict.FULL
    assert classify(pw.OperationalError(psycopg2.errors.OutOfMemory("53200"))) is not None


@pytest.mark.databases("mysql")
def test_mariadb_table_full_is_recognised(new_database):
    """MariaDB's 'table is full' (1114), from a MEMORY table past max_heap_table_size."""
    with databases.connection(new_database()) as db:
        db.execute_sql("SET SESSION max_heap_table_size = 16384")
        db.execute_sql("CREATE TEMPORARY TABLE t (x CHAR(255)) ENGINE=MEMORY")
        with pytest.raises(pw.DatabaseError) as raised:
            for _ in range(1000):
                db.execute_sql("INSERT INTO t VALUES (REPEAT('x', 255))")
    assert raised.value.orig.args[0] == 1114, raised.value
    assert classify(raised.value) is Verdict.FULL


# ------------------------------------------------------------------- read-only database


def _serve_in(stack: contextlib.ExitStack, url: str) -> pb_grpc.EnrollmentServiceStub:
    """A server on url in this process, stopped (and its pool closed) when stack ends;
    a stub of its."""
    running = create_server(ServerConfig(address="127.0.0.1:0", database_url=url))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stack.callback(engine.close_pool)
    stack.callback(running.wait_idle)
    stack.callback(lambda: running.stop(None).wait(10))
    stack.callback(channel.close)
    return pb_grpc.EnrollmentServiceStub(channel)


@contextlib.contextmanager
def read_only(url: str):
    """Yield the URL the server should use and a switch that makes the database refuse
    writes, as a demoted primary or a replica does; writable again on exit.

    PostgreSQL: default_transaction_read_only for the database, its sessions ended so the
    server's next connections get it. MariaDB: read_only for the whole server, which
    holds back every account without READ_ONLY ADMIN: the server connects as such an
    account (root has it)."""
    kind = databases.kind_of(url)
    name = url.rsplit("/", 1)[1]
    admin = engine.open_probe(databases.admin_url(kind), timeout=10)
    admin.connect()
    if kind == "postgresql":
        admin.connection().autocommit = True

        def switch(on: bool) -> None:
            admin.execute_sql(
                f"ALTER DATABASE {name} SET default_transaction_read_only = {'on' if on else 'off'}"
            )
            admin.execute_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )

        try:
            yield url, switch
        finally:
            switch(False)
            admin.close()
        return
    user = f"ro_{os.getpid()}"
    admin.execute_sql(f"CREATE OR REPLACE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'ro-secret'")
    admin.execute_sql(f"GRANT ALL ON {name}.* TO '{user}'@'127.0.0.1'")

    def switch(on: bool) -> None:
        admin.execute_sql(f"SET GLOBAL read_only = {1 if on else 0}")

    try:
        yield url.replace("root@", f"{user}:ro-secret@"), switch
    finally:
        switch(False)
        admin.execute_sql(f"DROP USER '{user}'@'127.0.0.1'")
        admin.close()


@pytest.mark.own_database
@pytest.mark.databases("postgresql", "mysql")
def test_a_read_only_database_refuses_writes_as_unavailable_and_they_resume(
    db_url, caplog, monkeypatch
):
    """A database that accepts no writes (a demoted primary during a failover, a replica
    the URL points at by mistake) answers a write UNAVAILABLE DATABASE_UNAVAILABLE saying
    so, changes nothing, logs one line and no traceback; reads go on, and writes resume
    without a restart."""
    caplog.set_level(logging.INFO)
    # A count of this test's own: the log line is once per 10 s per process.
    monkeypatch.setattr(unit_of_work, "read_only_events", Occurrences(every=10.0))
    with contextlib.ExitStack() as stack:
        url, switch = stack.enter_context(read_only(db_url))
        stub = _serve_in(stack, url)
        kept = new_student(stub, name="Kept")
        course = new_course(stub, capacity=5)
        before = databases.snapshot(db_url)

        switch(True)
        for attempt in range(3):
            got = expect_error(
                stub.CreateStudent,
                pb.CreateStudentRequest(name="No", email=f"no{attempt}@example.com"),
                UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
            assert "read-only" in got.message, got.message
            assert "nothing was changed" in got.message, got.message
        expect_error(
            stub.EnrollStudent,
            pb.EnrollStudentRequest(student_id=kept.id, course_id=course.id),
            UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        again = stub.GetStudent(pb.GetStudentRequest(student_id=kept.id), timeout=10)
        assert again.student.name == "Kept"
        lines = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
        assert len(lines) == 1, lines
        assert not [r for r in caplog.records if r.exc_info], "no traceback"

        switch(False)
        assert databases.snapshot(db_url) == before
        new_student(stub, name="After")
        stub.EnrollStudent(
            pb.EnrollStudentRequest(student_id=kept.id, course_id=course.id), timeout=10
        )


def test_sqlite_read_only_is_recognised(tmp_path):
    """SQLite's SQLITE_READONLY (a file system remounted read-only after a disk error; here
    a connection opened read-only) is READ_ONLY, as PostgreSQL's 25006 and MariaDB's
    1290 and 1792 are (test above)."""
    path = tmp_path / "ro.db"
    writable = pw.SqliteDatabase(str(path))
    writable.execute_sql("CREATE TABLE t (x INTEGER)")
    writable.close()
    sqlite = pw.SqliteDatabase(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(pw.OperationalError) as raised:
        sqlite.execute_sql("INSERT INTO t VALUES (1)")
    sqlite.close()
    assert classify(raised.value) is Verdict.READ_ONLY, raised.value


# ------------------------------------------------------------------- login refused


@contextlib.contextmanager
def login_switch(url: str):
    """Yield the URL of an account of this test's own and a switch that makes the
    database refuse that account's logins and end its sessions (a rotated password or a
    locked account, as an operator's mistake does while the server runs)."""
    kind = databases.kind_of(url)
    name = url.rsplit("/", 1)[1]
    user = f"login_{os.getpid()}"
    admin = engine.open_probe(databases.admin_url(kind), timeout=10)
    admin.connect()
    if kind == "postgresql":
        admin.connection().autocommit = True
        admin.execute_sql(f"CREATE ROLE {user} LOGIN")
        with databases.connection(url) as db:
            db.execute_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {user}")
            db.execute_sql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {user}")

        def switch(refused: bool) -> None:
            admin.execute_sql(f"ALTER ROLE {user} {'NOLOGIN' if refused else 'LOGIN'}")
            if refused:
                admin.execute_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (user,),
                )

        def drop() -> None:
            with databases.connection(url) as db:
                db.execute_sql(f"DROP OWNED BY {user}")
            admin.execute_sql(f"DROP ROLE {user}")

        their_url = url.replace("postgres@", f"{user}@")
    else:
        admin.execute_sql(f"CREATE OR REPLACE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'secret'")
        admin.execute_sql(f"GRANT ALL ON {name}.* TO '{user}'@'127.0.0.1'")

        def switch(refused: bool) -> None:
            admin.execute_sql(
                f"ALTER USER '{user}'@'127.0.0.1' ACCOUNT {'LOCK' if refused else 'UNLOCK'}"
            )
            if refused:
                for (session,) in admin.execute_sql(
                    "SELECT id FROM information_schema.processlist WHERE user = %s", (user,)
                ).fetchall():
                    with contextlib.suppress(pw.DatabaseError):
                        admin.execute_sql(f"KILL {int(session)}")

        def drop() -> None:
            admin.execute_sql(f"DROP USER '{user}'@'127.0.0.1'")

        their_url = url.replace("root@", f"{user}:secret@")
    try:
        yield their_url, switch
    finally:
        switch(False)
        drop()
        admin.close()


@pytest.mark.own_database
@pytest.mark.databases("postgresql", "mysql")
def test_a_login_refused_while_serving_is_unavailable_and_calls_resume(db_url, caplog):
    """On MariaDB a refused login (1045, 4151 ...) was answered INTERNAL, with a traceback
    a call: the server's account is locked, or its password rotated, while it serves."""
    caplog.set_level(logging.INFO)
    with contextlib.ExitStack() as stack:
        url, switch = stack.enter_context(login_switch(db_url))
        stub = _serve_in(stack, url)
        kept = new_student(stub, name="Kept")
        switch(True)
        for _ in range(3):
            expect_error(
                stub.GetStudent,
                pb.GetStudentRequest(student_id=kept.id),
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
        assert not [r for r in caplog.records if r.exc_info], "no traceback for a refused login"
        switch(False)
        assert stub.GetStudent(pb.GetStudentRequest(student_id=kept.id), timeout=10).student.name


@pytest.mark.databases("postgresql")
def test_health_stays_serving_when_only_the_probes_connection_is_ended(start_server, db_url):
    """Health went NOT_SERVING for an interval when the probe's own connection was ended
    (pg_terminate_backend, a pooler's recycling) while calls were served: a Kubernetes
    readiness probe with failureThreshold 1 took the pod out. The probe now tries a
    fresh connection before it reports the database unreachable."""
    live = start_server(health_interval=0.1)
    health = health_pb2_grpc.HealthStub(live.channel)
    admin = engine.open_probe(databases.admin_url("postgresql"), timeout=10)
    admin.connect()
    admin.connection().autocommit = True
    seen = set()
    try:
        for _ in range(30):
            admin.execute_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (HealthMonitor.APPLICATION_NAME,),
            )
            for _ in range(4):
                seen.add(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
                time.sleep(0.03)
        ended = admin.execute_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (HealthMonitor.APPLICATION_NAME,),
        ).fetchone()
    finally:
        admin.close()
    assert ended == (1,), "the probe connected again"
    assert seen == {health_pb2.HealthCheckResponse.SERVING}


@pytest.mark.databases("postgresql")
def test_a_database_timeout_below_a_millisecond_is_not_turned_into_no_limit(db_url):
    # lock_timeout and statement_timeout were int(timeout * 1000) ms: 0 for
    # --database-timeout 0.0005, which PostgreSQL reads as no limit at all, so a call
    # waited for a lock as long as it was held. Now at least 1 ms.
    db = engine.open_probe(db_url, timeout=0.0005)
    db.connect()
    try:
        shown = [
            db.execute_sql(f"SHOW {name}").fetchone()[0]
            for name in ("lock_timeout", "statement_timeout")
        ]
    finally:
        db.close()
    assert shown == ["1ms", "1ms"]


@pytest.mark.databases("postgresql", "mysql")
def test_a_database_timeout_of_hours_still_connects(start_server):
    # keepalives_idle was the whole timeout: past 32767 s Linux refused the socket option
    # and PostgreSQL could not be reached at all.
    live = start_server(database_timeout=40000)
    assert live.stub.CreateCourse(pb.CreateCourseRequest(code="LONG", title="Long")).course.id
