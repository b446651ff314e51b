"""A stopped server can be started again at once on its port; a port something listens on
is refused, by `serve` and by `serve --workers N`."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.rpc import SERVER, TIMEOUT, free_port, new_student

pytestmark = pytest.mark.databases("sqlite")  # ports, not databases, are under test

SINGLE = ()
WORKERS = ("--workers", "2")


def serve(address: str, db_url: str, mode: tuple[str, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        [SERVER, "serve", "--address", address, "--database-url", db_url, *mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def serving(address: str, process: subprocess.Popen) -> grpc.Channel:
    """A channel to the server at address, once it answers (fails when the process exits)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, _ = process.communicate()
            pytest.fail(f"the server exited with {process.returncode}:\n{out[-3000:]}")
        channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            return channel
        except grpc.FutureTimeoutError:
            channel.close()
    pytest.fail(f"nothing serves on {address}")


def time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is port (/proc/net/tcp*, state 06)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "06" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def leave_time_wait(port: int) -> None:
    """Leave what a server that closed its connections first leaves: a socket of port
    in TIME_WAIT, and nothing listening."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server's side closes first
            assert client.recv(1) == b""
    assert time_wait_on(port) > 0


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_server_starts_on_a_port_with_sockets_in_time_wait(db_url, mode):
    port = free_port()
    leave_time_wait(port)
    process = serve(f"127.0.0.1:{port}", db_url, mode)
    try:
        with serving(f"127.0.0.1:{port}", process) as channel:
            new_student(pb_grpc.EnrollmentServiceStub(channel))
    finally:
        out = stop(process)
    assert process.returncode == 0, out


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_server_stopped_during_calls_starts_again_at_once(db_url, mode):
    """As a deployment restarts: several connections busy with calls, SIGTERM, start."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = serve(address, db_url, mode)
    serving(address, first).close()
    # A channel of its own per client: several connections, spread over the workers.
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(6)
    ]
    done = threading.Event()
    calls = []

    def client(n: int, channel: grpc.Channel) -> None:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        new_student(stub, email=f"s{n}@example.com")
        calls.append(n)
        while not done.is_set():
            with contextlib.suppress(grpc.RpcError):  # the server is going away
                stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
                calls.append(n)
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=item) for item in enumerate(channels)]
    try:
        for thread in threads:
            thread.start()
        assert wait_for(lambda: set(calls) == set(range(len(channels))), 30)
        out = stop(first)  # while the calls go on
        assert first.returncode == 0, out
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        for channel in channels:
            channel.close()
        stop(first)

    second = serve(address, db_url, mode)  # at once
    try:
        with serving(address, second) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            found = stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
            assert len(found.students) == len(channels)
    finally:
        out = stop(second)
    assert second.returncode == 0, out


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def listener(address: tuple[str, int], *options: int) -> socket.socket:
    sock = socket.socket()
    for option in options:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    sock.bind(address)
    sock.listen()
    return sock


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
@pytest.mark.parametrize(
    ("host", "options"),
    [
        ("127.0.0.1", ()),
        ("127.0.0.1", (socket.SO_REUSEADDR,)),
        ("0.0.0.0", (socket.SO_REUSEADDR,)),
    ],
    ids=["plain", "reuseaddr", "wildcard"],
)
def test_a_port_another_program_listens_on_is_refused(db_url, mode, host, options):
    port = free_port()
    with listener((host, port), *options):
        process = serve(f"127.0.0.1:{port}", db_url, mode)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out


@pytest.mark.parametrize("first_mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_port_a_running_server_holds_is_refused(db_url, first_mode):
    address = f"127.0.0.1:{free_port()}"
    first = serve(address, db_url, first_mode)
    try:
        serving(address, first).close()
        for mode in (SINGLE, WORKERS):
            second = serve(address, db_url, mode)
            out, _ = second.communicate(timeout=60)
            assert second.returncode == 2, out
            assert f"cannot listen on {address}" in out and "Traceback" not in out
        with serving(address, first) as channel:  # the first server is unharmed
            new_student(pb_grpc.EnrollmentServiceStub(channel))
    finally:
        out = stop(first)
    assert first.returncode == 0, out


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_port_reserved_by_a_starting_server_is_refused(db_url, mode):
    """Before its workers listen, `serve --workers N` holds its port with a socket bound
    with SO_REUSEPORT alone; another server must not start on that port meanwhile."""
    port = free_port()
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", port))
        process = serve(f"127.0.0.1:{port}", db_url, mode)
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out
