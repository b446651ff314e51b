"""Fixtures: a fresh migrated SQLite file and a real server on a free port over a real channel."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from server import db as database
from server import schema
from server.app import RunningServer, ServerConfig, create_server


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file with every migration applied."""
    url = f"sqlite:///{tmp_path / 'enrollment.db'}"
    db = database.connect(url, max_connections=2, create=True)
    schema.migrate(db)
    database.close()
    return url


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
    database.close()


@pytest.fixture
def live(start_server) -> LiveServer:
    """A real server on a free port over the fresh database, with a stub."""
    return start_server()


@pytest.fixture
def stub(live: LiveServer) -> pb_grpc.EnrollmentServiceStub:
    return live.stub
