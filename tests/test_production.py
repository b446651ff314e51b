"""Production concerns on every database: pools, worker processes, outages, migrations
on real servers, and the deployment's own commands."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import peewee as pw
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment.server.domain import courses, students
from enrollment.server.errors import DatabaseUnavailable
from enrollment.server.persistence import engine, migrator, unit_of_work
from enrollment.server.persistence.models import MODELS
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.proxy import TcpProxy, through
from tests.rpc import TIMEOUT, expect_error, new_course, new_student, race
from tests.servers import SERVER, free_port

ROOT = Path(__file__).resolve().parent.parent
M001, M002, M003, M004, M005, M006 = (
    "001_create_students_and_courses",
    "002_create_student_courses",
    "003_mysql_utf8mb4_and_microseconds",
    "004_waitlists_updates_and_etags",
    "005_change_feed",
    "006_request_records",
)
BIG_ID = 2**40
UNICODE = ("Zoë Ångström", "李小龍", "José 🙂 Núñez", "Ольга", 'O\'Brien "Q"; --')
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------------- pool


def test_pool_exhaustion_is_unavailable_and_connections_go_back(db_url):
    db = engine.open_pool(db_url, max_connections=1, pool_timeout=0.3)
    try:
        held, release = threading.Event(), threading.Event()

        def hold():
            with db.connection_context():
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            students.get_student(student_id=1)
        assert time.monotonic() - started < 3
        release.set()
        holder.join()
        # The one connection is free again, also after failed calls.
        for _ in range(3):
            with pytest.raises(Exception, match="does not exist"):
                students.get_student(student_id=1)
        assert db._in_use == {}
    finally:
        engine.close_pool()


SLOW_QUERY = {
    "postgresql": "SELECT pg_sleep(5)",
    # MariaDB's SLEEP() ends quietly when interrupted; a join of two sequences does not.
    "mysql": "SELECT COUNT(*) FROM seq_1_to_100000 a JOIN seq_1_to_100000 b ON a.seq + b.seq = 7",
}


@pytest.mark.databases("postgresql", "mysql")
def test_a_statement_over_its_time_limit_is_unavailable(db_url):
    engine.open_pool(db_url, max_connections=2, timeout=1, statement_timeout=0.3)
    slow = SLOW_QUERY[databases.kind_of(db_url)]

    @unit_of_work.transactional(write=False)
    def slow_unit_of_work():
        return engine.proxy.execute_sql(slow).fetchall()

    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            slow_unit_of_work()
        assert time.monotonic() - started < 3
        assert engine.proxy.obj._in_use == {}
    finally:
        engine.close_pool()


def test_a_thread_that_keeps_its_connection_reuses_it_and_hands_it_back(db_url):
    """unit_of_work.connection_kept: the same connection from call to call, idle
    between them; a database error hands it back; leaving hands it back."""
    db = engine.open_pool(db_url, max_connections=2)

    @unit_of_work.transactional(write=False, snapshot=False)
    def connection_of_a_call() -> object:
        assert engine.connections_in_use() == 1
        return db.connection()

    @unit_of_work.transactional(write=False)
    def broken() -> None:
        db.execute_sql("SELECT no_such_column FROM students")

    try:
        with unit_of_work.connection_kept():
            first = connection_of_a_call()
            assert connection_of_a_call() is first
            assert engine.connections_in_use() == 0
            assert len(db._in_use) == 1  # checked out, kept between calls
            with pytest.raises(pw.DatabaseError):
                broken()
            assert db._in_use == {}  # handed back, in case the error broke it
            connection_of_a_call()
            assert len(db._in_use) == 1
        assert db._in_use == {}
        assert engine.connections_in_use() == 0
    finally:
        engine.close_pool()


def test_every_rpc_returns_its_connection_to_the_pool(live):
    stub = live.stub
    student = new_student(stub)
    course = new_course(stub, capacity=1)
    stub.EnrollStudent(pb.EnrollStudentRequest(student_id=student.id, course_id=course.id))
    for request, call in (
        (pb.GetStudentRequest(student_id=10**12), stub.GetStudent),
        (pb.EnrollStudentRequest(student_id=student.id, course_id=course.id), stub.EnrollStudent),
        (pb.CreateStudentRequest(name="x", email=student.email), stub.CreateStudent),
        (pb.DeleteCourseRequest(course_id=course.id), stub.DeleteCourse),
    ):
        with pytest.raises(grpc.RpcError):
            call(request, timeout=TIMEOUT)
    # None is in a call any more (on SQLite the loop and writer threads keep theirs).
    assert engine.connections_in_use() == 0


# --------------------------------------------------------------------------- workers


def worker_pids(parent: int) -> set[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return {int(pid) for pid in children.read_text().split()} if children.exists() else set()


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def worker_serving(server, channel: grpc.Channel, probe: str) -> str:
    """The pid of the worker that a channel's connection reached: the one whose log line
    carries the request id of a call made on it."""
    pb_grpc.EnrollmentServiceStub(channel).ListCourses(
        pb.ListCoursesRequest(page_size=1), timeout=TIMEOUT, metadata=[("x-request-id", probe)]
    )
    line = re.compile(rf"\[(\d+)\] enrollment\.rpc rpc .* request_id={re.escape(probe)}$", re.M)
    found = wait_for(lambda: line.search(server.log), 10)
    assert found, f"no log line for the call {probe}"
    return found.group(1)


def channels_on_both_workers(server, count: int) -> list[grpc.Channel]:
    """count channels, each its own TCP connection, at least one on each of two workers.
    The kernel spreads new connections over the workers (SO_REUSEPORT) by a hash of their
    addresses, so 8 connections all land on one worker once in 128 (seen in CI): while
    they do, the last is swapped for a new one until one lands on the other."""
    # A channel of its own subchannel pool: grpc would otherwise share one connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    channels: list[grpc.Channel] = []
    pids: list[str] = []
    run = os.urandom(4).hex()  # the probes' request ids are this call's own
    for n in range(64):
        channel = grpc.insecure_channel(server.address, options=own_connection)
        grpc.channel_ready_future(channel).result(timeout=30)
        pid = worker_serving(server, channel, f"connection-probe-{run}-{n}")
        if len(channels) == count:  # all on pids[0]
            if pid == pids[0]:
                channel.close()
                continue
            channels.pop().close()
            pids.pop()
        channels.append(channel)
        pids.append(pid)
        if len(channels) == count and len(set(pids)) == 2:
            return channels
    for channel in channels:
        channel.close()
    raise AssertionError(f"64 connections reached workers {set(pids)} only")


def test_two_workers_race_exactly_once_and_within_capacity(db_url, server_process):
    server = server_process("--database-url", db_url, "--workers", "2")
    channels = []
    try:
        assert len(wait_for(lambda: worker_pids(server.proc.pid), 10)) == 2
        channels = channels_on_both_workers(server, 8)
        stubs = [pb_grpc.EnrollmentServiceStub(c) for c in channels]

        capacity = 7
        course = new_course(stubs[0], capacity=capacity)
        students = [new_student(stubs[i % len(stubs)]) for i in range(32)]
        calls = [
            lambda s=s, stub=stub: stub.EnrollStudent(
                pb.EnrollStudentRequest(student_id=s.id, course_id=course.id), timeout=TIMEOUT
            )
            for s, stub in zip(students, stubs * 4, strict=True)
        ]
        codes = race(calls)
        assert codes.count(grpc.StatusCode.OK) == capacity
        assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == len(students) - capacity

        # One pair from every channel at once: enrolled exactly once.
        open_course = new_course(stubs[0], capacity=0)
        pair = pb.EnrollStudentRequest(student_id=students[0].id, course_id=open_course.id)
        codes = race(
            [lambda stub=stub: stub.EnrollStudent(pair, timeout=TIMEOUT) for stub in stubs * 2]
        )
        assert codes.count(grpc.StatusCode.OK) == 1
        assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == len(stubs) * 2 - 1

        # A storm of enrolls and drops from both workers; every count equals its roster.
        courses = [new_course(stubs[0], capacity=3) for _ in range(3)]
        rng = random.Random(7)
        storm = []
        for i in range(96):
            student, target = rng.choice(students), rng.choice(courses)
            stub = stubs[i % len(stubs)]
            if rng.random() < 0.6:
                request = pb.EnrollStudentRequest(student_id=student.id, course_id=target.id)
                storm.append(lambda stub=stub, r=request: stub.EnrollStudent(r, timeout=TIMEOUT))
            else:
                request = pb.DropCourseRequest(student_id=student.id, course_id=target.id)
                storm.append(lambda stub=stub, r=request: stub.DropCourse(r, timeout=TIMEOUT))
        codes = race(storm)
        allowed = {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS,
                   grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}  # fmt: skip
        assert set(codes) <= allowed, codes
        assert not databases.miscounted_courses(db_url)
    finally:
        for channel in channels:
            channel.close()
        returncode = server.stop()
    out = server.log
    assert returncode == 0, out
    # Both workers served calls: each logs its own pid on its RPC lines.
    pids = set(re.findall(r"\[(\d+)\] enrollment\.rpc rpc method=", out))
    assert len(pids) == 2, out[-3000:]
    assert "stopping 2 workers" in out and out.rstrip().endswith("stopped")


@pytest.mark.databases("sqlite")
def test_sigterm_to_the_parent_drains_and_stops_every_worker(db_url, server_process):
    server = server_process(
        "--database-url", db_url, "--workers", "2", "--grace", "20", "--database-timeout", "20"
    )
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        pids = wait_for(lambda: worker_pids(server.proc.pid), 10)
        assert len(pids) == 2
        stub = pb_grpc.EnrollmentServiceStub(channel)
        outcome = {}
        with databases.write_blocked(db_url, "late@example.com") as blocker:

            def in_flight():
                request = pb.CreateStudentRequest(name="Late", email="late@example.com")
                outcome["student"] = stub.CreateStudent(request, timeout=30).student

            caller = threading.Thread(target=in_flight)
            caller.start()
            time.sleep(0.5)  # inside a worker, waiting for the write lock
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert server.proc.poll() is None, "the parent waits for its workers to drain"
            blocker.release()
            caller.join(timeout=30)
        assert outcome["student"].name == "Late"
        assert server.wait(timeout=60) == 0, server.log
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.databases("sqlite")
def test_a_signal_to_the_whole_process_group_stops_within_the_grace(db_url, server_process, signum):
    # Ctrl-C in a terminal, `timeout`, and systemd's KillMode=control-group signal every
    # process of the group: each worker gets its own signal and its parent's SIGTERM.
    # The second signal's handler ran inside the first's, nested in its join of a thread,
    # and an idle worker took 6 s to stop at --grace 2 (once it did not stop at all).
    server = server_process("--database-url", db_url, "--workers", "2", "--grace", "2")
    pids = sorted(wait_for(lambda: worker_pids(server.proc.pid), 10))
    assert len(pids) == 2
    start = time.monotonic()
    for pid in (server.proc.pid, *pids):
        os.kill(pid, signum)
    returncode = server.wait(timeout=60)
    took = time.monotonic() - start
    assert returncode == 0, server.log
    assert took < 4, f"stopped after {took:.1f} s at --grace 2"


@pytest.mark.databases("sqlite")
def test_a_worker_that_dies_stops_the_server_with_an_error(db_url, server_process):
    server = server_process("--database-url", db_url, "--workers", "2")
    pids = sorted(wait_for(lambda: worker_pids(server.proc.pid), 10))
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    returncode = server.wait(timeout=60)
    out = server.log
    assert returncode == 1, out
    assert "exited with signal SIGKILL; stopping the others" in out
    assert wait_for(lambda: not Path(f"/proc/{pids[1]}").exists(), 10)


@pytest.mark.databases("sqlite")
def test_workers_refuse_a_port_already_in_use(db_url, server_process):
    first = server_process("--database-url", db_url, "--workers", "1")
    second = subprocess.run(
        [SERVER, "serve", "--address", first.address, "--database-url", db_url, "--workers", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"cannot listen on {first.address}" in second.stderr


# --------------------------------------------------------------------------- outages


@pytest.mark.databases("postgresql", "mysql")
def test_database_outage_fails_fast_reports_not_serving_and_recovers(db_url, record_property):
    target = urlsplit(db_url)
    proxy = TcpProxy((target.hostname, target.port))
    config = ServerConfig(
        address="127.0.0.1:0",
        database_url=through(proxy, db_url),
        database_timeout=2.0,
        pool_timeout=2.0,
        health_interval=0.5,
    )
    running = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status

        student = new_student(stub)
        assert status() == SERVING

        proxy.cut()
        cut_at = time.monotonic()
        expect_error(
            stub.GetStudent,
            pb.GetStudentRequest(student_id=student.id),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        time_to_fail = time.monotonic() - cut_at
        assert time_to_fail < 5, "a call must fail well within its deadline"
        assert wait_for(lambda: status() == NOT_SERVING, 10)
        time_to_not_serving = time.monotonic() - cut_at
        # Later calls fail fast too, each within the client's deadline.
        started = time.monotonic()
        expect_error(
            stub.CreateStudent,
            pb.CreateStudentRequest(name="During", email="during@example.com"),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        assert time.monotonic() - started < 5

        proxy.restore()
        restored_at = time.monotonic()

        def serves():
            try:
                stub.GetStudent(pb.GetStudentRequest(student_id=student.id), timeout=5)
                return True
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                return False

        assert wait_for(serves, 15, step=0.1)
        time_to_recover = time.monotonic() - restored_at
        assert wait_for(lambda: status() == SERVING, 10)
        time_to_serving = time.monotonic() - restored_at
        new_student(stub)  # writes work again, without a restart
        figures = {
            "time_to_fail_s": round(time_to_fail, 3),
            "time_to_not_serving_s": round(time_to_not_serving, 3),
            "time_to_first_ok_after_restore_s": round(time_to_recover, 3),
            "time_to_serving_after_restore_s": round(time_to_serving, 3),
        }
        record_property("outage", figures)
        print(f"\noutage figures ({databases.kind_of(db_url)}): {json.dumps(figures)}")
    finally:
        channel.close()
        running.stop(None).wait(10)
        running.wait_idle()
        engine.close_pool()
        proxy.close()


# --------------------------------------------------------------------------- migrations


def at_001_with_explicit_ids(url: str) -> pw.Database:
    """A database migrated to 001 holding rows with explicit, large ids."""
    db = engine.open_pool(url, max_connections=2, create=True)
    with db.connection_context():
        migrator.router(db).run(M001)
        base = dt.datetime(2024, 1, 31, 8, 0, 0)
        students = [
            (BIG_ID - 40 + i, f"{UNICODE[i % len(UNICODE)]} #{i}", f"S{i}@Example.org",
             f"s{i}@example.org", base + dt.timedelta(minutes=i))
            for i in range(40)
        ]  # fmt: skip
        courses = [
            (BIG_ID + i, f"CS-{100 + i}", f"cs-{100 + i}", f"{UNICODE[i % 5]}: topic {i}",
             i % 4, 0, base + dt.timedelta(hours=i))
            for i in range(6)
        ]  # fmt: skip
        with db.atomic():
            insert(db, "students", ("id", "name", "email", "email_key", "create_time"), students)
            insert(db, "courses", ("id", "code", "code_key", "title", "capacity",
                                   "enrolled_count", "create_time"), courses)  # fmt: skip
    return db


def insert(db: pw.Database, name: str, columns: tuple[str, ...], values: list[tuple]) -> None:
    table = pw.Table(name, columns).bind(db)
    table.insert([dict(zip(columns, row, strict=True)) for row in values]).execute()


# The columns of v1.0 (004 adds more, with defaults that mean v1.0).
V1_COLUMNS = {
    "students": "id, name, email, email_key, create_time",
    "courses": "id, code, code_key, title, capacity, enrolled_count, create_time",
}


def rows(db: pw.Database, table: str) -> list[tuple]:
    with db.connection_context():
        cursor = db.execute_sql(f"SELECT {V1_COLUMNS[table]} FROM {table} ORDER BY id")
        return [tuple(row) for row in cursor.fetchall()]


def test_rows_written_at_001_survive_every_migration_and_rollback(new_database):
    db = at_001_with_explicit_ids(new_database())
    try:
        before = {t: rows(db, t) for t in ("students", "courses")}
        assert len(before["students"]) == 40 and len(before["courses"]) == 6

        assert migrator.migrate(db) == [M002, M003, M004, M005, M006]
        assert {t: rows(db, t) for t in before} == before
        with db.connection_context(), db.atomic():
            enrollments = [(BIG_ID - 40 + i, BIG_ID, dt.datetime(2024, 2, 1)) for i in range(3)]
            insert(db, "student_courses", ("student_id", "course_id", "enroll_time"), enrollments)

        assert migrator.rollback(db) == M006
        assert migrator.rollback(db) == M005
        assert migrator.rollback(db) == M004
        assert {t: rows(db, t) for t in before} == before
        assert migrator.rollback(db) == M003
        assert {t: rows(db, t) for t in before} == before
        # Dropping student_courses would lose its rows: refused, and nothing changes
        # (MariaDB commits DDL at once, so the refusal comes before any of it runs).
        with pytest.raises(migrator.DataLossRefused, match="student_courses"):
            migrator.rollback(db)
        with db.connection_context():
            assert migrator.applied_migrations(db) == [M001, M002]
            assert len(db.execute_sql("SELECT * FROM student_courses").fetchall()) == 3
        assert migrator.rollback(db, allow_data_loss=True) == M002
        assert {t: rows(db, t) for t in before} == before
        assert migrator.migrate(db) == [M002, M003, M004, M005, M006]
        assert {t: rows(db, t) for t in before} == before

        # New rows get fresh ids above every explicit one (sequences in step).
        student = students.create_student(name="Fresh", email="fresh@example.org")
        assert student.id > BIG_ID - 1
        course = courses.create_course(code="NEW-1", title="New", capacity=0)
        assert course.id > BIG_ID + 5
    finally:
        engine.close_pool()


def introspect(db: pw.Database) -> dict:
    with db.connection_context():
        shape = {}
        for table in ("students", "courses", "student_courses"):
            shape[table] = {
                "columns": sorted(
                    (c.name, c.data_type.lower(), c.null, c.primary_key)
                    for c in db.get_columns(table)
                ),
                "indexes": sorted((tuple(i.columns), i.unique) for i in db.get_indexes(table)),
                "foreign_keys": sorted(
                    (f.column, f.dest_table, f.dest_column) for f in db.get_foreign_keys(table)
                ),
            }
        return shape


def test_the_migrated_schema_equals_the_models(new_database):
    migrated_db = engine.open_pool(new_database(), max_connections=2, create=True)
    migrator.migrate(migrated_db)
    from_migrations = introspect(migrated_db)
    engine.close_pool()
    modeled = engine.open_pool(new_database(), max_connections=2, create=True)
    with modeled.connection_context():
        modeled.create_tables(MODELS)
    from_models = introspect(modeled)
    engine.close_pool()
    assert from_migrations == from_models


@contextlib.contextmanager
def schema_lock_held(url: str):
    """The schema lock, taken by the test on a connection of its own."""
    db = engine.open_pool(url, max_connections=1, create=True)
    try:
        with db.connection_context(), migrator.schema_lock(db):
            yield
    finally:
        engine.close_pool()


def test_two_migrates_at_once_leave_one_correct_history(new_database):
    url = new_database()
    with schema_lock_held(url):
        commands = [
            subprocess.Popen(
                [SERVER, "migrate", "--database-url", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        time.sleep(1.0)
        # Both wait for the lock rather than racing each other.
        assert [c.poll() for c in commands] == [None, None]
    outputs = [c.communicate(timeout=60) for c in commands]
    assert [c.returncode for c in commands] == [0, 0], outputs
    said = sorted(out for out, _ in outputs)
    said_all = f"applied {M001}, {M002}, {M003}, {M004}, {M005}, {M006}\n"
    assert said == [said_all, "schema is up to date\n"]
    rows_ = databases.query(url, "SELECT name, COUNT(*) FROM migratehistory GROUP BY name")
    assert sorted(rows_) == [(M, 1) for M in (M001, M002, M003, M004, M005, M006)]


# --------------------------------------------------------------------------- deployment


def image_commands() -> dict:
    """What the Dockerfile and compose.yaml run, read from the files themselves."""
    dockerfile = (ROOT / "Dockerfile").read_text()

    def instruction(name: str) -> list[str]:
        match = re.search(rf"^{name}\s+(\[.*\])\s*$", dockerfile, re.M)
        assert match, f"Dockerfile has no exec-form {name}"
        return json.loads(match.group(1))

    health = re.search(r"^\s*CMD\s+(\[.*\])\s*$", dockerfile.split("HEALTHCHECK", 1)[1], re.M)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    return {
        "entrypoint": instruction("ENTRYPOINT"),
        "cmd": instruction("CMD"),
        "healthcheck": json.loads(health.group(1)),
        "migrate": services["migrate"]["command"],
        "server": services["server"].get("command"),
        "server_env": services["server"]["environment"],
        "depends_on": services["server"]["depends_on"],
    }


@pytest.mark.databases("postgresql")
def test_the_image_commands_migrate_then_serve_against_postgresql(
    new_database, tmp_path, server_process
):
    commands = image_commands()
    assert commands["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    url = new_database()
    port = free_port()
    env = {
        **os.environ,
        **{k: str(v) for k, v in commands["server_env"].items()},
        "ENROLLMENT_DATABASE_URL": url,
        "ENROLLMENT_ADDRESS": f"0.0.0.0:{port}",
    }

    def argv(command: list[str]) -> list[str]:
        entry = commands["entrypoint"]
        assert entry[0] == "enrollment-server"
        return [SERVER, *entry[1:], *command]

    migrate = subprocess.run(argv(commands["migrate"]), env=env, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr
    serve_command = commands["server"] or commands["cmd"]
    server = server_process(argv=argv(serve_command), port=port, host="0.0.0.0", env=env,
                            cwd=tmp_path)  # fmt: skip

    def healthy():
        probe = subprocess.run(argv(commands["healthcheck"][1:]), env=env,
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        return probe.returncode == 0 and "SERVING" in probe.stdout

    assert commands["healthcheck"][0] == "enrollment-server"
    assert wait_for(healthy, 30, step=0.3), shlex.join(commands["healthcheck"])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        assert new_student(stub).id >= 1
    assert server.stop() == 0, server.log


def _alive(pid: int) -> bool:
    """pid runs (a zombie no one has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.databases("sqlite")
def test_workers_stop_when_their_parent_is_killed(db_url, server_process):
    # SIGKILL to the supervisor left its workers serving the port, orphaned: a restart
    # then failed with "Address already in use".
    server = server_process("--database-url", db_url, "--workers", "2")
    pids = sorted(wait_for(lambda: worker_pids(server.proc.pid), 10))
    assert len(pids) == 2
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    assert wait_for(lambda: not any(_alive(pid) for pid in pids), 15), server.log
    again = server_process("--database-url", db_url, "--workers", "2", port=server.port)
    assert again.proc.poll() is None


@pytest.mark.databases("sqlite")
def test_sigterm_as_the_workers_start_is_a_clean_stop(db_url):
    # A worker got its parent's SIGTERM before it had its own handler, died of it, and
    # the parent logged it as a crash and exited 1.
    process = subprocess.Popen(
        [SERVER, "serve", "--address", "127.0.0.1:0", "--database-url", db_url, "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "with 2 workers" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines.extend(process.stderr)
    assert process.wait(timeout=60) == 0, "".join(lines)
    assert not [line for line in lines if "ERROR" in line], "".join(lines)
