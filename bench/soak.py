"""Soak: a real server under mixed load for a long while; does anything keep growing?

`make soak` (SOAK_SECONDS=600, SOAK_ARGS for more). A server subprocess serves a fresh
SQLite file (or --database-url, migrated first); client threads mix reads, writes that
create and delete their own rows (so the data stays about the same size), calls that
fail (NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS), calls cut short by tiny deadlines,
and new connections opened and closed. Every --sample seconds the server's resident
memory, open descriptors and threads are printed; every minute, calls and p99.

Verdict: a measure that is still growing in the second half of the run fails it. RSS
may grow by at most max(8 MiB, 5%) from the middle sample to the last; descriptors by
4; threads by 2. Growth in the first half (caches warming, pools filling) is allowed.
Change-feed watchers (--watchers, default 4: the whole feed, one course, and the rest
alternating) follow WatchEvents the whole time, each reopening its stream every
--rewatch seconds from its last sequence, so stream setup and teardown are soaked too;
a watcher that ever sees a sequence not above the one before fails the run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc

from bench import procs
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.servers import free_port

PAGE = os.sysconf("SC_PAGE_SIZE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the run")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--threads", type=int, default=6, help="client threads")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--server-threads", type=int, default=4, help="serve --threads")
    parser.add_argument("--watchers", type=int, default=4, help="WatchEvents streams held")
    parser.add_argument(
        "--rewatch", type=float, default=20.0, help="seconds before a watcher reopens its stream"
    )


def resources(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


class Tally:
    """Latencies per minute and answers by code, shared by the client threads."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.lock = threading.Lock()
        self.latencies: dict[int, list[float]] = {}
        self.codes: Counter = Counter()

    def add(self, seconds: float, code: str) -> None:
        minute = int((time.monotonic() - self.started) // 60)
        with self.lock:
            self.latencies.setdefault(minute, []).append(seconds)
            self.codes[code] += 1


def client(address: str, until: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.EnrollmentServiceStub(channel)
    mine: list[int] = []
    courses = [c.id for c in stub.ListCourses(pb.ListCoursesRequest(), timeout=10).courses]
    calls = 0
    while time.monotonic() < until:
        calls += 1
        if calls % 500 == 0:  # a new connection now and then: descriptors must come back
            channel.close()
            channel = grpc.insecure_channel(address)
            stub = pb_grpc.EnrollmentServiceStub(channel)
        roll = rng.random()
        timeout = 0.0005 if roll < 0.01 else 10  # some calls end by their deadline
        try:
            started = time.perf_counter()
            if roll < 0.25:
                target = rng.choice(mine) if mine else rng.randint(1, 10**6)
                stub.GetStudent(pb.GetStudentRequest(student_id=target), timeout=timeout)
            elif roll < 0.40:
                stub.ListStudents(pb.ListStudentsRequest(page_size=50), timeout=timeout)
            elif roll < 0.50:
                course = rng.choice(courses)
                stub.ListStudents(
                    pb.ListStudentsRequest(course_id=course, page_size=20), timeout=timeout
                )
            elif roll < 0.55:
                stub.GetCourse(pb.GetCourseRequest(course_id=rng.choice(courses)), timeout=timeout)
            elif roll < 0.67 or len(mine) < 5:
                email = f"soak-{uuid.uuid4().hex[:12]}@example.com"
                reply = stub.CreateStudent(
                    pb.CreateStudentRequest(name="Soak Student", email=email), timeout=timeout
                )
                mine.append(reply.student.id)
            elif roll < 0.79:
                request = pb.EnrollStudentRequest(
                    student_id=rng.choice(mine), course_id=rng.choice(courses)
                )
                stub.EnrollStudent(request, timeout=timeout)
            elif roll < 0.85:
                request = pb.DropCourseRequest(
                    student_id=rng.choice(mine), course_id=rng.choice(courses)
                )
                stub.DropCourse(request, timeout=timeout)
            elif roll < 0.97:
                student = mine.pop(rng.randrange(len(mine)))
                request = pb.DeleteStudentRequest(student_id=student, force=True)
                stub.DeleteStudent(request, timeout=timeout)
            else:
                stub.CreateStudent(pb.CreateStudentRequest(name="", email="x"), timeout=timeout)
            tally.add(time.perf_counter() - started, "OK")
        except grpc.RpcError as error:
            tally.add(time.perf_counter() - started, error.code().name)
    channel.close()


class Watching:
    """What the watchers saw: events delivered, streams opened, order violations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events = 0
        self.streams = 0
        self.out_of_order: list[str] = []


def watcher(address: str, until: float, seen: Watching, course_id: int, rewatch: float) -> None:
    """Follows the feed (one course's, or all of it when course_id is 0) until `until`,
    reopening the stream every `rewatch` seconds after the last sequence received."""
    last = 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        while time.monotonic() < until:
            timeout = max(0.5, min(rewatch, until - time.monotonic()))
            stream = stub.WatchEvents(
                pb.WatchEventsRequest(after_sequence=last, course_id=course_id), timeout=timeout
            )
            with seen.lock:
                seen.streams += 1
            try:
                for response in stream:
                    for event in response.events:
                        if event.sequence <= last:
                            with seen.lock:
                                seen.out_of_order.append(f"{event.sequence} after {last}")
                        last = event.sequence
                    with seen.lock:
                        seen.events += len(response.events)
            except grpc.RpcError as error:
                # The deadline ends each stream on purpose; anything else is a finding,
                # but the watcher resumes as a real consumer would.
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def verdict(samples: list[dict[str, float]]) -> tuple[bool, list[str]]:
    """Still growing in the second half of the run?"""
    if len(samples) < 3:
        return False, ["too few samples to tell (run longer than 3 sample periods)"]
    middle, last = samples[len(samples) // 2], samples[-1]
    limits = {
        "rss_mib": max(8.0, 0.05 * middle["rss_mib"]),
        "fds": 4,
        "threads": 2,
    }
    problems = []
    for name, limit in limits.items():
        growth = last[name] - middle[name]
        if growth > limit:
            problems.append(f"{name} grew {growth:.1f} in the second half (limit {limit:.1f})")
    return not problems, problems


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    url = args.database_url or f"sqlite:///{workdir / 'soak.db'}"
    procs.migrate(url)
    port = free_port()
    server = procs.enrollment_server(
        port, url, workdir / "server.log", threads=args.server_threads, workers=1,
        log_level="WARNING",
    ).start()  # fmt: skip
    pid = server.process.pid
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            course_ids = [
                stub.CreateCourse(
                    pb.CreateCourseRequest(code=f"SOAK-{n}", title="Soak", capacity=50), timeout=10
                ).course.id
                for n in range(20)
            ]
        started = time.monotonic()
        until = started + args.seconds
        tally = Tally(started)
        threads = [
            threading.Thread(target=client, args=(server.address, until, tally, seed), daemon=True)
            for seed in range(args.threads)
        ]
        seen = Watching()
        watchers = [
            threading.Thread(
                target=watcher,
                args=(
                    server.address,
                    until,
                    seen,
                    0 if n % 2 == 0 else course_ids[n % 20],
                    args.rewatch,
                ),
                daemon=True,
            )  # fmt: skip
            for n in range(args.watchers)
        ]
        for thread in threads + watchers:
            thread.start()
        samples = [resources(pid)]
        print(
            f"soak: {args.seconds:.0f}s, {args.threads} client threads, server pid {pid}, {url}",
            flush=True,
        )
        print(_sample_line(0, samples[0], tally), flush=True)
        next_sample, minute_reported = started + args.sample, 0
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            now = time.monotonic()
            if now >= next_sample and now < until + 1:
                samples.append(resources(pid))
                print(_sample_line(now - started, samples[-1], tally), flush=True)
                next_sample += args.sample
            while (now - started) // 60 > minute_reported:
                print(_minute_line(minute_reported, tally), flush=True)
                minute_reported += 1
        for thread in threads + watchers:
            thread.join()
        samples.append(resources(pid))
        print(_sample_line(time.monotonic() - started, samples[-1], tally), flush=True)
        if minute_reported in tally.latencies:
            print(_minute_line(minute_reported, tally) + " (partial minute)", flush=True)
        if server.process.poll() is not None:
            print(f"FAIL: the server exited with {server.process.returncode}")
            return 1
    finally:
        server.stop()
    print("answers: " + ", ".join(f"{c} {n}" for c, n in tally.codes.most_common()))
    print(f"watchers: {args.watchers}, {seen.streams} streams opened, {seen.events} events")
    ok, problems = verdict(samples)
    if seen.out_of_order:
        ok, problems = False, [*problems, f"events out of order: {seen.out_of_order[:5]}"]
    first, middle, last = samples[0], samples[len(samples) // 2], samples[-1]
    summary = " ".join(
        f"{name} {first[name]:.1f}->{middle[name]:.1f}->{last[name]:.1f}"
        for name in ("rss_mib", "fds", "threads")
    )
    if ok:
        print(f"PASS: nothing grows in the second half (start->middle->end: {summary})")
        return 0
    print(f"FAIL: {'; '.join(problems)} (start->middle->end: {summary})")
    return 1


def _sample_line(elapsed: float, sample: dict[str, float], tally: Tally) -> str:
    calls = sum(tally.codes.values())
    return (
        f"t={elapsed:5.0f}s rss={sample['rss_mib']:.1f}MiB fds={sample['fds']:.0f} "
        f"threads={sample['threads']:.0f} calls={calls}"
    )


def _minute_line(minute: int, tally: Tally) -> str:
    with tally.lock:
        values = list(tally.latencies.get(minute, []))
    return (
        f"minute {minute + 1}: calls={len(values)} p50={percentile(values, 0.5) * 1000:.1f}ms "
        f"p99={percentile(values, 0.99) * 1000:.1f}ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
