"""Fixtures: a fresh migrated SQLite file and a real server on a free port over a real channel."""

from __future__ import annotations

from collections.abc import Iterator
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
    db = database.connect(url, max_connections=2)
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
def live(db_url: str) -> Iterator[LiveServer]:
    """A real server on 127.0.0.1:<free port> over the fresh database, with a stub."""
    running = create_server(ServerConfig(address="127.0.0.1:0", database_url=db_url))
    address = f"127.0.0.1:{running.port}"
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    try:
        yield LiveServer(running, address, db_url, channel, pb_grpc.EnrollmentServiceStub(channel))
    finally:
        channel.close()
        running.stop(None).wait(10)
        database.close()


@pytest.fixture
def stub(live: LiveServer) -> pb_grpc.EnrollmentServiceStub:
    return live.stub
