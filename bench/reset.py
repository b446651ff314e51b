"""`make bench-reset`: what grpc's count of a connection's streams costs and protects.

grpc counts a stream against --max-streams-per-connection until it has freed it (its
"overload protection", server/transport/options.py). Two runs against one server
process on a fresh SQLite file:

- at the limit: CALLERS grpc.aio callers on one connection of a server limited to 100
  streams, with a plain channel and with the client library's (its retry policy).
  Printed: the outcomes of each.
- flood: `tests/h2flood.py` opens and resets GetStudent streams as fast as it can on
  --flood-connections connections (HTTP/2 rapid reset, CVE-2023-44487) while another
  client, on a connection of its own, calls GetStudent every 20 ms. Printed: that
  client's outcomes and latency, the streams the flood sent, the server's CPU.

Run it against another build (`--server <a clone at 9023726>/.venv/bin/enrollment-server`,
streams counted as HTTP/2 counts them) to see the other side of the trade.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from bench import procs
from bench.measure import percentile
from enrollment.client.api import channel_options
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import servers
from tests.rpc import new_student

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def flood(server: servers.ServerProcess, student: int, connections: int, seconds: float) -> None:
    host, port = server.address.rsplit(":", 1)
    before = procs.cpu_seconds(server.proc.pid)
    sender = subprocess.Popen(
        [sys.executable, "-m", "tests.h2flood", host, port, str(connections), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        request = pb.GetStudentRequest(student_id=student)
        while sender.poll() is None:
            start = time.perf_counter()
            try:
                stub.GetStudent(request, timeout=5)
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1
            latencies.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    sent = int(sender.communicate()[0] or 0)
    cpu = procs.cpu_seconds(server.proc.pid) - before
    failed = sum(outcomes.values()) - outcomes["OK"]
    latencies.sort()
    print(
        f"flood: {sent:,} streams sent on {connections} connections in {seconds:g} s; "
        f"server CPU {cpu:.1f} s"
    )
    print(
        f"  another client: {failed} of {sum(outcomes.values())} calls failed {dict(outcomes)}; "
        f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms"
    )


async def _callers(
    address: str, student: int, callers: int, seconds: float, retrying: bool
) -> Counter[str]:
    options = [*OWN_CONNECTION, *(channel_options() if retrying else [])]
    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        request = pb.GetStudentRequest(student_id=student)
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                try:
                    await stub.GetStudent(request, timeout=10)
                    outcomes["OK"] += 1
                except grpc.RpcError as error:
                    outcomes[error.code().name] += 1

        await asyncio.gather(*(caller() for _ in range(callers)))
    return outcomes


def at_the_limit(
    server: servers.ServerProcess, student: int, callers: list[int], seconds: float
) -> None:
    print("at the limit (100 streams on one connection):")
    for count in callers:
        for retrying in (False, True):
            outcomes = asyncio.run(_callers(server.address, student, count, seconds, retrying))
            total = sum(outcomes.values())
            refused = total - outcomes["OK"]
            channel = "client library" if retrying else "plain channel "
            print(
                f"  {count:4d} callers, {channel}: {refused} of {total:,} failed "
                f"({100 * refused / total:.2f}%) {dict(outcomes)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reset", description=__doc__)
    parser.add_argument("--server", default=servers.SERVER, help="enrollment-server to run")
    parser.add_argument("--flood-connections", type=int, default=4)
    parser.add_argument("--flood-seconds", type=float, default=8)
    parser.add_argument("--callers", default="64,100,150,400", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=5, help="each at-the-limit run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-reset-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'reset.db'}"
        subprocess.run([args.server, "migrate", "--database-url", url], check=True,
                       capture_output=True)  # fmt: skip
        port = servers.free_port()
        server = servers.start(
            Path(tmp) / "server.log",
            argv=[args.server, "serve", "--address", f"127.0.0.1:{port}",
                  "--database-url", url, "--max-streams-per-connection", "100"],
            port=port,
        )  # fmt: skip
        try:
            print(f"server: {args.server}")
            with grpc.insecure_channel(server.address) as channel:
                student = new_student(pb_grpc.EnrollmentServiceStub(channel)).id
            # The limit first: a flood's backlog can outlast the flood.
            callers = [int(c) for c in args.callers.split(",")]
            at_the_limit(server, student, callers, args.seconds)
            flood(server, student, args.flood_connections, args.flood_seconds)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
