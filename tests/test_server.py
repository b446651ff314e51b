"""The server process: configuration, health, logging, busy ports and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.proxy import TcpProxy, through
from tests.rpc import TIMEOUT, new_student
from tests.servers import SERVER, free_port

SERVICE = "enrollment.v1.EnrollmentService"


def test_health_is_serving_for_the_server_and_the_service(live):
    health = health_pb2_grpc.HealthStub(live.channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_turns_not_serving_when_shutdown_starts(live):
    health = health_pb2_grpc.HealthStub(live.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    live.running.stop(2)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_one_log_line_per_rpc(live, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    new_student(live.stub)
    with pytest.raises(grpc.RpcError):
        live.stub.GetStudent(pb.GetStudentRequest(student_id=99), timeout=TIMEOUT)
    lines = [r.getMessage() for r in caplog.records if r.name == "enrollment.rpc"]
    assert len(lines) == 2
    assert lines[0].startswith("rpc method=CreateStudent code=OK reason=- duration_ms=")
    assert lines[1].startswith(
        "rpc method=GetStudent code=NOT_FOUND reason=STUDENT_NOT_FOUND duration_ms="
    )


def test_serve_from_env_then_refuse_a_port_already_in_use(db_url, server_process):
    port = free_port()
    first = server_process(
        argv=[SERVER, "serve"],
        port=port,
        env={"ENROLLMENT_ADDRESS": f"127.0.0.1:{port}", "ENROLLMENT_DATABASE_URL": db_url},
    )
    with grpc.insecure_channel(first.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        student = new_student(stub)
        second = subprocess.run(
            [SERVER, "serve", "--address", f"127.0.0.1:{port}", "--database-url", db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
        )
        out = second.stdout
        assert second.returncode == 2, out
        assert f"cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out
        # Only the clean message: no grpc core log line (E1129 ... add_port.cc) before it.
        assert not re.search(r"^[IWE]\d{4} ", out, re.M), out
        # The first server is unharmed.
        stub.GetStudent(pb.GetStudentRequest(student_id=student.id), timeout=TIMEOUT)


def _serve_beside_a_listener(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`enrollment-server serve *args` while another program listens on 127.0.0.1:port;
    its output, stdout and stderr together."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        return subprocess.run(
            [SERVER, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
        )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_localhost_is_refused_when_its_ipv4_port_is_taken(db_url, workers):
    # grpc binds "localhost" as 127.0.0.1 and [::1] and serves when either binds: with
    # 127.0.0.1:PORT another program's, the server started on [::1] alone, and clients
    # dialling 127.0.0.1 reached that other program.
    port = free_port()
    result = _serve_beside_a_listener(
        port, "--address", f"localhost:{port}", "--database-url", db_url, "--workers", workers
    )
    out = result.stdout
    assert result.returncode == 2, out
    assert f"cannot listen on localhost:{port}" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("oracle://localhost/test", "unsupported database URL scheme"),
        ("postgresql://localhost", "must name a database"),
        ("mysql://localhost:port/x", "cannot be read"),
        ("sqlite:///no/such/dir/x.db", "does not exist"),
        ("sqlite:///:memory:", "must name a file"),
        ("postgresql://localhost/db?prepare=sometimes", "prepare=true or prepare=false"),
        ("sqlite:///x.db?prepare=false", "prepare option is for postgresql"),
        ("sqlite:///x.db?bogus=1", "the SQLite URL takes no options"),
        ("sqlite:///x.db?timeout=abc", "the SQLite URL takes no options"),
        # Two slashes make "relative.db" the URL's host: it was told "takes no options".
        ("sqlite://relative.db", "sqlite:///relative.db for a file relative"),
        ("sqlite://localhost/x.db", "sqlite:///x.db for a file relative"),
        ("mysql://root@127.0.0.1:3306/test?sslca=x", "unknown option 'sslca'"),
        ("mysql://root@127.0.0.1:3306/test?ssl_ca=/no/such/ca.pem", "ssl_ca names no file"),
        ("mysql://root@127.0.0.1:3306/test?charset=utf8", "charset must be utf8mb4"),
        ("mysql://root@127.0.0.1:3306/test?charset=latin9", "charset must be utf8mb4"),
        ("mysql://root@127.0.0.1:3306/test?autocommit=true", "option 'autocommit' is the server's"),
        # PyMySQL's own words were "'<' not supported between instances of 'int' and 'str'".
        ("mysql://root@127.0.0.1:3306/test?connect_timeout=abc", "option 'connect_timeout'"),
        # libpq's "invalid dsn" came only when connecting, as exit 1 from migrate or status.
        ("postgresql://127.0.0.1:5432/test?bogus=1", "unknown option 'bogus'"),
        # SQLite's own "unable to open database file".
        ("sqlite:////tmp", "names a folder, not a file"),
        ("postgresql://localhost/db?client_encoding=latin1", "client_encoding must be UTF8"),
    ],
)
def test_unusable_database_url_is_a_clear_error(url, expected):
    for command in (["serve", "--address", "127.0.0.1:0"], ["status"]):
        result = subprocess.run(
            [SERVER, *command, "--database-url", url], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
@pytest.mark.parametrize(
    "password",
    ["q7Vx3kP9/Lm2+Zt8", "8841/Lm2+Zt8", "q7Vx3kP9?Lm2", "8841?Lm2", "q7Vx#Lm2", "8841#Lm2"],
)
def test_a_password_that_is_not_percent_encoded_is_never_echoed(scheme, password):
    # The URL parser ends the host part at "/", "?" or "#": the password's head was read
    # as a port and echoed ("Port could not be cast to integer value as 'q7Vx3kP9'"), or,
    # all digits, made the user a host name and the rest of the password part of the
    # database name or the options.
    url = f"{scheme}://enrollment:{password}@127.0.0.1:1/enrollment"
    for command in (["serve", "--address", "127.0.0.1:0"], ["status"], ["migrate"]):
        result = subprocess.run(
            [SERVER, *command, "--database-url", url], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert "percent-encoded" in result.stderr and "Traceback" not in result.stderr
        for part in re.split(r"[/?#]", password):
            assert part not in result.stderr, result.stderr


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("this is not SQLite\n" * 100)
    result = subprocess.run(
        [SERVER, "serve", "--address", "127.0.0.1:0", "--database-url", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot read the database schema" in result.stderr
    assert "Traceback" not in result.stderr
    for command in ("migrate", "status"):
        result = subprocess.run(
            [SERVER, command, "--database-url", f"sqlite:///{path}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1, result.stderr
        assert f"{command} failed: file is not a database" in result.stderr
        assert "Traceback" not in result.stderr


def test_sigterm_drains_in_flight_calls_then_exits(db_url, server_process):
    server = server_process("--database-url", db_url, "--grace", "20", "--database-timeout", "20")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        outcome = {}
        # The next write waits for what the blocker holds.
        with databases.write_blocked(db_url, "late@example.com") as blocker:

            def in_flight():
                request = pb.CreateStudentRequest(name="Late", email="late@example.com")
                outcome["student"] = stub.CreateStudent(request, timeout=30).student

            caller = threading.Thread(target=in_flight)
            caller.start()
            time.sleep(0.5)  # the call is now inside the server, waiting for the lock
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert server.proc.poll() is None, "the server must wait for the in-flight call"
            blocker.release()  # rolled back: the write goes ahead
            caller.join(timeout=30)
        assert outcome["student"].name == "Late"
        returncode = server.wait(timeout=30)
        out = server.log
        assert returncode == 0, out
        assert "SIGTERM: draining" in out and "stopped" in out
        assert "rpc method=CreateStudent code=OK" in out


def test_python_dash_m_server_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "enrollment.server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for command in ("serve", "health", "migrate", "rollback", "status", "hash-token"):
        assert command in result.stdout


def test_the_server_process_helper_fails_with_the_log_when_the_server_exits(tmp_path):
    with pytest.raises(AssertionError, match=r"exited \(2\) before serving") as raised:
        servers.start(tmp_path / "server.log", "--database-url", "oracle://localhost/test")
    assert "unsupported database URL scheme" in str(raised.value)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_exits_2_however_many_workers(db_url, workers):
    # One process exited 2 (cannot start), two workers 1 (a worker crashed).
    port = free_port()
    result = _serve_beside_a_listener(
        port, "--address", "127.0.0.1:0", "--database-url", db_url,
        "--metrics-address", f"127.0.0.1:{port}", "--workers", workers,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("command", ["serve", "migrate", "status"])
def test_ctrl_c_while_the_database_does_not_answer_is_one_line(command):
    # KeyboardInterrupt left every command of enrollment-server as a 40-line traceback.
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        args = ["--address", "127.0.0.1:0"] if command == "serve" else []
        process = subprocess.Popen(
            [SERVER, command, *args, "--database-url", url],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)  # started, and waiting for the database's first answer
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    assert err.strip() == f"enrollment-server: {command} interrupted", err


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to serve as nobody")
@pytest.mark.parametrize("mode", [0o644, 0o600])
@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_sqlite_side_files_this_user_cannot_write_are_refused_at_start_up(suffix, mode):
    # Left by a crash of a server run as another user (root): the server started and
    # said SERVING, then refused every write, its log blaming a failover or a replica.
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's root-only folder
    try:
        folder.chmod(0o777)
        database = folder / "x.db"
        url = f"sqlite:///{database}"
        assert (
            subprocess.run([SERVER, "migrate", "--database-url", url], timeout=60).returncode == 0
        )
        database.chmod(0o666)
        side = folder / f"x.db{suffix}"
        side.touch()
        side.chmod(mode)  # root's: readable by others or not
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [SERVER, "serve", "--address", "127.0.0.1:0", "--database-url", url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert f"x.db{suffix}" in result.stderr and "not writable by this user" in result.stderr
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signal_after_the_drain_does_not_kill_the_exiting_server(db_url, server_process, workers):
    # A supervisor's second SIGTERM (or a second Ctrl-C) landing after "stopped", while
    # the interpreter exited, killed it: exit -15 instead of 0, for a clean stop.
    server = server_process("--database-url", db_url, "--grace", "1", "--workers", workers)
    if workers == "2":
        server.wait_workers(2)
    server.proc.send_signal(signal.SIGTERM)
    pid = server.proc.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and f"[{pid}] enrollment.server stopped" not in server.log:
        time.sleep(0.001)
    while server.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # again and again until it has exited
        time.sleep(0.002)
    assert server.wait(timeout=5) == 0, server.log


@pytest.mark.databases("postgresql", "mysql")
def test_a_stop_is_bounded_when_the_database_hangs(db_url, server_process):
    # A database (or pooler, or proxy) that keeps its connections open but never
    # answers: its statement timeouts are its own, so nothing ended the wait, and
    # SIGTERM never stopped a PostgreSQL server (a pool thread inside a read, the feed
    # listener inside UNLISTEN). The README promises --grace + --database-timeout.
    target = urlsplit(db_url)
    proxy = TcpProxy((target.hostname, target.port))
    try:
        server = server_process(
            "--database-url", through(proxy, db_url), "--grace", "1", "--database-timeout", "1"
        )  # fmt: skip
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            student = new_student(stub)
            watch = stub.WatchEvents(pb.WatchEventsRequest(), timeout=30)  # LISTENs on PG
            stub.GetStudent(pb.GetStudentRequest(student_id=student.id), timeout=TIMEOUT)
            proxy.freeze()
            hung = stub.GetStudent.future(pb.GetStudentRequest(student_id=student.id), timeout=30)
            time.sleep(0.5)  # the read is inside the database
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.wait(timeout=30)
            took = time.monotonic() - started
            hung.cancel()
            watch.cancel()
        # --grace 1 + --database-timeout 1 + the 3 s margin, and a second for slow CI
        assert took < 6, (took, server.log)
        assert "Traceback" not in server.log
        if code != 0:  # it could not finish cleanly: it says why, and fails the exit
            assert code == 1, server.log
            assert "stop overdue" in server.log, server.log
    finally:
        proxy.close()


def test_the_event_loop_closes_async_generators_left_suspended(caplog):
    # A WatchEvents stream grpc dropped at the end of the grace leaves its generator
    # suspended; the loop was stopped without closing it, so its clean-up never ran
    # and each was logged "Task was destroyed but it is pending!".
    from enrollment.server.startup.server import EventLoopThread

    cleaned = threading.Event()
    kept = []

    async def stream():
        try:
            yield 1
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    async def start():
        generator = stream()
        await generator.__anext__()
        kept.append(generator)

    events = EventLoopThread()
    events.run(start())
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        events.close()
        kept.clear()
    assert cleaned.is_set()
    assert "destroyed" not in caplog.text
