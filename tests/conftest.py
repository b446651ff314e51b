"""Fixtures: a fresh migrated database on each selected kind (SQLite, PostgreSQL, MariaDB)
and a real server on a free port over a real channel.

Which databases: `pytest --databases sqlite,postgresql` or TEST_DATABASES (default all
three), with TEST_POSTGRESQL_URL / TEST_MYSQL_URL naming the servers. A server that
cannot be reached skips its tests with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from enrollment.server.persistence import engine, migrator
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import RunningServer, create_server
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--databases",
        default=None,
        help="comma-separated databases to run on: sqlite,postgresql,mysql "
        "(default: TEST_DATABASES, else all three)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "databases(*kinds): run only on these kinds of database (e.g. 'sqlite')"
    )
    config.addinivalue_line(
        "markers", "own_database: the test gets a database of its own instead of the shared one"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    kinds = databases.selected(metafunc.config.getoption("--databases"))
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None:
        kinds = [k for k in kinds if k in marker.args]
    metafunc.parametrize("backend", kinds, indirect=True)


@pytest.fixture(scope="session")
def database_servers() -> dict[str, databases.Server | str]:
    """Each selected server, or why it cannot be used."""
    return {}


@pytest.fixture
def backend(request: pytest.FixtureRequest, database_servers) -> str:
    kind = request.param
    if kind != "sqlite":
        server_for(kind, database_servers)
    return kind


def server_for(kind: str, cache: dict) -> databases.Server:
    if kind not in cache:
        server = databases.Server(kind, databases.admin_url(kind))
        try:
            server.check()
            cache[kind] = server
        except Exception as exc:  # noqa: BLE001 - the reason is shown to the developer
            cache[kind] = f"{kind} at {server.url} cannot be reached: {exc}".strip()
    found = cache[kind]
    if isinstance(found, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{found} (CI=true requires every selected database)")
        pytest.skip(found)
    return found


@pytest.fixture(scope="session")
def shared_databases(database_servers) -> Iterator[dict[str, str]]:
    """One migrated database per server kind for the whole run, dropped at its end."""
    made: dict[str, str] = {}
    yield made
    for kind, url in made.items():
        server_for(kind, database_servers).drop(url)


@pytest.fixture
def new_database(backend, database_servers, tmp_path) -> Iterator[Callable[[], str]]:
    """Make empty (unmigrated) databases of the test's kind; dropped after the test."""
    made: list[str] = []

    def make() -> str:
        if backend == "sqlite":
            url = databases.sqlite_file(tmp_path, f"db{len(made)}.db")
        else:
            url = server_for(backend, database_servers).create()
        made.append(url)
        return url

    yield make
    engine.close_pool()
    if backend != "sqlite":
        for url in made:
            server_for(backend, database_servers).drop(url)


def migrated(url: str) -> str:
    db = engine.open_pool(url, max_connections=2, create=True)
    migrator.migrate(db)
    engine.close_pool()
    return url


@pytest.fixture
def db_url(request, backend, new_database, shared_databases, database_servers) -> str:
    """URL of a migrated database with no rows: a new SQLite file, or the run's shared
    PostgreSQL/MariaDB database emptied (a test marked own_database gets a new one)."""
    if backend == "sqlite" or request.node.get_closest_marker("own_database"):
        return migrated(new_database())
    if backend not in shared_databases:
        server = server_for(backend, database_servers)
        shared_databases[backend] = migrated(server.create("enrollment_shared"))
    databases.empty_tables(shared_databases[backend])
    return shared_databases[backend]


@dataclass
class LiveServer:
    running: RunningServer
    address: str
    database_url: str
    channel: grpc.Channel
    stub: pb_grpc.EnrollmentServiceStub


@pytest.fixture
def start_server(db_url: str) -> Iterator[Callable[..., LiveServer]]:
    """Start a real server on 127.0.0.1:<free port> with ServerConfig overrides; one at a time.

    credentials: channel credentials for the fixture's own channel (a TLS server needs them).
    """
    started: list[LiveServer] = []

    def start(credentials: grpc.ChannelCredentials | None = None, **overrides) -> LiveServer:
        config = ServerConfig(address="127.0.0.1:0", database_url=db_url, **overrides)
        running = create_server(config)
        address = f"127.0.0.1:{running.port}"
        if credentials is None:
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, credentials)
        grpc.channel_ready_future(channel).result(timeout=10)
        server = LiveServer(
            running, address, db_url, channel, pb_grpc.EnrollmentServiceStub(channel)
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.channel.close()
        server.running.stop(None).wait(10)
        server.running.wait_idle()
    engine.close_pool()


@pytest.fixture
def live(start_server) -> LiveServer:
    """A real server on a free port over the fresh database, with a stub."""
    return start_server()


@pytest.fixture
def stub(live: LiveServer) -> pb_grpc.EnrollmentServiceStub:
    return live.stub


@pytest.fixture
def server_process(tmp_path) -> Iterator[Callable[..., servers.ServerProcess]]:
    """Start `enrollment-server` processes (see servers.start: args, argv, port, host, env,
    cwd, credentials), each SERVING when returned; stopped with SIGTERM at teardown and
    killed when they do not exit in time."""
    started: list[servers.ServerProcess] = []

    def start(*args: str, **options) -> servers.ServerProcess:
        log_path = tmp_path / f"server-{len(started) + 1}.log"
        server = servers.start(log_path, *args, **options)
        started.append(server)
        return server

    yield start
    late = []
    for server in started:
        try:
            server.stop()
        except subprocess.TimeoutExpired:
            late.append(server.address)
    assert not late, f"servers that did not stop within {servers.STOP_TIMEOUT}s of SIGTERM: {late}"
