"""The cheap client for fixed-body reads: h2load (Debian's nghttp2-client) speaking gRPC.

GetStudentRequest and ListCoursesRequest both carry the student id as field 1, so one
framed body serves both methods; h2load alternates between their paths. h2load cannot
read gRPC trailers, so the status codes are counted from the server's own log lines.
"""

from __future__ import annotations

import re
import shutil
import statistics
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

from bench.measure import Round, window_round
from bench.procs import Server, cpu_seconds
from enrollment.v1 import enrollment_pb2 as pb

PATHS = (
    "/enrollment.v1.EnrollmentService/ListCourses",
    "/enrollment.v1.EnrollmentService/GetStudent",
)
_CODE = re.compile(rb" rpc method=\w+ code=(\w+)")


def available() -> bool:
    return shutil.which("h2load") is not None


def _body(path: Path, student: int) -> Path:
    message = pb.GetStudentRequest(student_id=student).SerializeToString()
    assert message == pb.ListCoursesRequest(student_id=student).SerializeToString()
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    return path


def drive(
    server: Server,
    workdir: Path,
    *,
    connections: int,
    streams: int,
    duration: float,
    warmup: float,
    student: int,
    log_path: Path | None,
) -> Round:
    body = _body(workdir / "body.bin", student)
    requests_log = workdir / "h2load.tsv"
    log_offset = log_path.stat().st_size if log_path and log_path.exists() else 0
    argv = [
        "h2load",
        f"--clients={connections}",
        f"--max-concurrent-streams={streams}",
        "--threads=1",
        f"--duration={round(duration * 1000)}ms",
        f"--warm-up-time={round(warmup * 1000)}ms",
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={requests_log}",
        *(f"http://{server.address}{path}" for path in PATHS),
    ]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # h2load connects at once; the window starts when its warm-up ends.
    started = time.time()
    time.sleep(warmup)
    start = time.time()
    server0, client0 = server.cpu_seconds(), cpu_seconds(client.pid)
    time.sleep(duration)
    server1, client1 = server.cpu_seconds(), cpu_seconds(client.pid)
    rss = server.rss_kib()
    end = time.time()
    output, _ = client.communicate(timeout=60)
    if client.returncode:
        raise RuntimeError(f"h2load failed: {output.decode(errors='replace')[-500:]}")
    latencies, statuses = [], Counter()
    for line in requests_log.read_text().splitlines():
        fields = line.split("\t")
        begin_us, status, elapsed_us = int(fields[0]), fields[1], int(fields[2])
        finished = (begin_us + elapsed_us) / 1e6
        if started <= finished and start <= finished <= end:
            statuses[status] += 1
            if status == "200":
                latencies.append(elapsed_us * 1000)
    codes: Counter = Counter()
    if log_path is not None:
        # Every call of the run, warm-up included: only for spotting unexpected codes.
        with log_path.open("rb") as log:
            log.seek(log_offset)
            for match in _CODE.finditer(log.read()):
                codes[match.group(1).decode()] += 1
    else:
        codes["OK"] = statuses.get("200", 0)
    # h2load ends its run by resetting the streams still open: the server logs those
    # calls CANCELLED. Up to one per stream in flight is the end of the run, not an error.
    if codes.get("CANCELLED", 0) <= connections * streams:
        codes.pop("CANCELLED", None)
    for status, n in statuses.items():
        if status != "200":
            codes[f"HTTP_{status}"] += n
    calls = sum(statuses.values())
    latencies.sort()
    return window_round(
        latencies_ns=latencies,
        calls=calls,
        duration=duration,
        codes=codes,
        server_cpu_s=server1 - server0,
        client_cpu_s=client1 - client0,
        methods={"mean_ms": {"all": statistics.fmean(latencies) / 1e6}} if latencies else {},
        server_rss_kib=rss,
    )
