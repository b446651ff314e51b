"""A stopped server can be started again at once on its port; a port something listens on
is refused, by `serve` and by `serve --workers N`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time

import grpc
import pytest

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.rpc import TIMEOUT, new_student
from tests.servers import SERVER, free_port

pytestmark = pytest.mark.databases("sqlite")  # ports, not databases, are under test

SINGLE = ()
WORKERS = ("--workers", "2")


def refused(address: str, db_url: str, mode: tuple[str, ...]) -> None:
    """`serve` on address exits 2 with one clear line."""
    process = subprocess.run(
        [SERVER, "serve", "--address", address, "--database-url", db_url, *mode],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    out = process.stdout + process.stderr
    assert process.returncode == 2, out
    assert f"cannot listen on {address}" in out and "Traceback" not in out


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
def test_a_server_starts_on_a_port_with_sockets_in_time_wait(db_url, server_process, mode):
    port = free_port()
    leave_time_wait(port)
    server = server_process("--database-url", db_url, *mode, port=port)
    with grpc.insecure_channel(server.address) as channel:
        new_student(pb_grpc.EnrollmentServiceStub(channel))
    assert server.stop() == 0, server.log


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_server_stopped_during_calls_starts_again_at_once(db_url, server_process, mode):
    """As a deployment restarts: several connections busy with calls, SIGTERM, start."""
    first = server_process("--database-url", db_url, *mode)
    # A channel of its own per client: several connections, spread over the workers.
    channels = [
        grpc.insecure_channel(first.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(12)
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
        assert first.stop() == 0, first.log  # while the calls go on
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        for channel in channels:
            channel.close()

    second = server_process("--database-url", db_url, *mode, port=first.port)  # at once
    with grpc.insecure_channel(second.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        found = stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
        assert len(found.students) == len(channels)
    assert second.stop() == 0, second.log


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
        refused(f"127.0.0.1:{port}", db_url, mode)


@pytest.mark.parametrize("first_mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_port_a_running_server_holds_is_refused(db_url, server_process, first_mode):
    first = server_process("--database-url", db_url, *first_mode)
    for mode in (SINGLE, WORKERS):
        refused(first.address, db_url, mode)
    with grpc.insecure_channel(first.address) as channel:  # the first server is unharmed
        new_student(pb_grpc.EnrollmentServiceStub(channel))
    assert first.stop() == 0, first.log


@pytest.mark.parametrize("mode", [SINGLE, WORKERS], ids=["single", "workers"])
def test_a_port_reserved_by_a_starting_server_is_refused(db_url, mode):
    """Before its workers listen, `serve --workers N` holds its port with a socket bound
    with SO_REUSEPORT alone; another server must not start on that port meanwhile."""
    port = free_port()
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", port))
        refused(f"127.0.0.1:{port}", db_url, mode)
