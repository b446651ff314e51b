"""`enrollment-server` as a process of its own: a free port, started, SERVING, stopped.

The `server_process` fixture (conftest.py) starts these and stops whatever is left at
teardown; bench imports free_port from here too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from enrollment.server import addresses

SERVER = str(Path(sys.executable).parent / "enrollment-server")
READY_TIMEOUT = 30
STOP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A started server: proc, the port it listens on, the address to dial, and its log
    (stdout and stderr together, read from a file so that a chatty server never blocks)."""

    proc: subprocess.Popen
    port: int
    address: str
    log_path: Path
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)

    @property
    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def wait_workers(self, workers: int, timeout: float = READY_TIMEOUT) -> None:
        """With `--workers N`, return once every worker has logged that it serves: health
        answers from the first one up, and connections made before the others listen all
        land on it."""
        if workers <= 1:
            return
        deadline = time.monotonic() + timeout
        while self.log.count(" serving on ") < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"not all {workers} workers are serving:\n{self.log}")
            time.sleep(0.05)

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once grpc.health.v1 says SERVING; fail with the log when the process
        exits first or nothing serves within timeout seconds."""
        deadline = time.monotonic() + timeout
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, self.credentials)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise AssertionError(f"the server exited ({code}) before serving:\n{self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the server is not SERVING on {self.address} after {timeout}s:\n{self.log}"
                    )
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service=""),
                        timeout=min(left, 1.0),
                        wait_for_ready=True,
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send sig (SIGTERM: drain, then exit) unless it already exited; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Its exit code once it exits; killed, and TimeoutExpired raised, after timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _workers(command: list[str]) -> int:
    """N of a `--workers N` (or `--workers=N`) in the command; 1 without one."""
    for i, arg in enumerate(command):
        if arg == "--workers" and i + 1 < len(command) and command[i + 1].isdigit():
            return int(command[i + 1])
        if arg.startswith("--workers=") and arg[len("--workers=") :].isdigit():
            return int(arg[len("--workers=") :])
    return 1


def start(
    log_path: Path,
    *args: str,
    argv: list[str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Start `enrollment-server serve --address HOST:PORT *args` on a free port (or port);
    argv replaces the whole command, which must then listen on port itself. env is added
    to this process's environment. Waits until the server is SERVING (over credentials
    when given: a TLS server needs them)."""
    assert argv is None or port, "a whole command (argv) names its port: pass port too"
    port = port or free_port()
    command = argv or [SERVER, "serve", "--address", addresses.join(host, port), *args]
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    server = ServerProcess(proc, port, addresses.join(dial, port), log_path, credentials)
    try:
        server.wait_serving()
        server.wait_workers(_workers(command))
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return server


def scrape(port: int, timeout: float = 10) -> dict[tuple[str, tuple], float]:
    """Every sample on a server's /metrics (127.0.0.1:port), keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
