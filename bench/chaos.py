"""Kill the server's database connections under a write load and check every answer.

`make chaos` (DATABASE=postgresql|mysql, CHAOS_SECONDS=60). A server subprocess serves a
fresh database; writer threads create students, enroll them and drop courses, each key
(an email, a student/course pair) written once and never again; every INTERVAL seconds
the database is told to kill the server's connections (pg_terminate_backend, or KILL on
MariaDB). At the end the database is read back and each answer checked against it:

- an OK must have changed the data, and DATABASE_UNAVAILABLE (or any other failure
  but COMMIT_OUTCOME_UNKNOWN) must have changed nothing;
- COMMIT_OUTCOME_UNKNOWN may have gone either way: how many did commit is reported.

Exits 1 when any answer lied.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bench import procs
from enrollment.server.persistence import engine
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.servers import free_port

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", choices=sorted(ADMIN_URLS), default="postgresql")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--threads", type=int, default=8, help="writer threads")
    parser.add_argument("--json", help="also write the figures to this file")


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason
    return error.code().name


def _admin(url: str):
    db = engine.open_probe(url, timeout=5)
    db.connect()
    if engine.parse(url).kind == "postgresql":
        db.connection().autocommit = True
    return db


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class Killer(threading.Thread):
    """Every interval, kills every connection of the server's database but its own."""

    def __init__(self, kind: str, url: str, name: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.kind, self.url, self.name, self.interval = kind, url, name, interval
        self.stop = threading.Event()
        self.rounds = self.killed = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.killed += self._kill()
                self.rounds += 1
            except Exception as exc:  # noqa: BLE001 - reported, the load goes on
                print(f"kill failed: {exc}", file=sys.stderr)

    def _kill(self) -> int:
        db = _admin(self.url)
        try:
            if self.kind == "postgresql":
                rows = db.execute_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.name,),
                ).fetchall()
                return sum(1 for (done,) in rows if done)
            ids = db.execute_sql(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = %s AND id <> CONNECTION_ID()",
                (self.name,),
            ).fetchall()
            killed = 0
            for (ident,) in ids:
                try:
                    db.execute_sql(f"KILL {int(ident)}")
                    killed += 1
                except Exception:  # noqa: BLE001 - gone already
                    pass
            return killed
        finally:
            db.close()


class Ledger:
    """Every answer, by operation and key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.creates: list[tuple[str, str]] = []  # (email, outcome)
        self.enrolls: list[tuple[tuple[int, int], str]] = []
        self.drops: list[tuple[tuple[int, int], str]] = []

    def add(self, kind: str, key, outcome: str) -> None:
        with self.lock:
            getattr(self, kind).append((key, outcome))


def writer(stub, courses: list[int], ledger: Ledger, until: float, seed: int) -> None:
    rng = random.Random(seed)
    enrolled: list[tuple[int, int]] = []
    students: list[int] = []
    while time.monotonic() < until:
        roll = rng.random()
        try:
            if roll < 0.3 or not students:
                email = f"chaos-{uuid.uuid4().hex}@example.com"
                try:
                    reply = stub.CreateStudent(
                        pb.CreateStudentRequest(name="Chaos", email=email), timeout=10
                    )
                    students.append(reply.student.id)
                    ledger.add("creates", email, "OK")
                except grpc.RpcError as error:
                    ledger.add("creates", email, reason_of(error))
            elif roll < 0.75 or not enrolled:
                student = students.pop(rng.randrange(len(students)))
                for course in rng.sample(courses, 2):
                    pair = (student, course)
                    try:
                        stub.EnrollStudent(
                            pb.EnrollStudentRequest(student_id=student, course_id=course),
                            timeout=10,
                        )
                        enrolled.append(pair)
                        ledger.add("enrolls", pair, "OK")
                    except grpc.RpcError as error:
                        ledger.add("enrolls", pair, reason_of(error))
            else:
                pair = enrolled.pop(rng.randrange(len(enrolled)))
                try:
                    stub.DropCourse(
                        pb.DropCourseRequest(student_id=pair[0], course_id=pair[1]), timeout=10
                    )
                    ledger.add("drops", pair, "OK")
                except grpc.RpcError as error:
                    ledger.add("drops", pair, reason_of(error))
        except Exception as exc:  # noqa: BLE001 - a client bug must not hide the figures
            print(f"writer: {exc!r}", file=sys.stderr)


def check(url: str, ledger: Ledger) -> dict:
    """Compare every answer with what the database holds."""
    db = engine.open_probe(url, timeout=10)
    db.connect()
    try:
        emails = {e for (e,) in db.execute_sql("SELECT email FROM students").fetchall()}
        pairs = set(db.execute_sql("SELECT student_id, course_id FROM student_courses").fetchall())
    finally:
        db.close()
    dropped_keys = {pair for pair, _ in ledger.drops}
    answers: Counter = Counter()
    lies: list[str] = []
    unknown = Counter()

    def judge(op: str, key, outcome: str, changed: bool) -> None:
        answers[(op, outcome)] += 1
        if outcome == "COMMIT_OUTCOME_UNKNOWN":
            unknown["committed" if changed else "not committed"] += 1
        elif outcome == "OK" and not changed:
            lies.append(f"{op} {key}: OK but nothing changed")
        elif outcome != "OK" and changed:
            lies.append(f"{op} {key}: {outcome} but the change was made")

    for email, outcome in ledger.creates:
        judge("CreateStudent", email, outcome, email in emails)
    for pair, outcome in ledger.enrolls:
        if pair in dropped_keys and outcome == "OK":
            answers[("EnrollStudent", outcome)] += 1
            continue  # the drop's answer decides what the row says now
        judge("EnrollStudent", pair, outcome, pair in pairs)
    for pair, outcome in ledger.drops:
        judge("DropCourse", pair, outcome, pair not in pairs)
    return {
        "answers": {f"{op} {outcome}": n for (op, outcome), n in sorted(answers.items())},
        "database_unavailable": sum(
            n for (_, outcome), n in answers.items() if outcome == "DATABASE_UNAVAILABLE"
        ),
        "commit_outcome_unknown": dict(unknown),
        "lies": len(lies),
        "lie_examples": lies[:10],
    }


def main(args: argparse.Namespace) -> int:
    admin_url = ADMIN_URLS[args.database]
    name = f"enrollment_chaos_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = _admin(admin_url)
    admin.execute_sql(f"CREATE DATABASE {name}")
    admin.close()
    url = _with_database(admin_url, name)
    log_path = Path(tempfile.mkdtemp(prefix="chaos-")) / "server.log"
    server = None
    try:
        procs.migrate(url)
        port = free_port()
        server = procs.Server(
            "enrollment-server",
            [
                str(procs.BIN / "enrollment-server"),
                "--log-level",
                "WARNING",
                "serve",
                "--address",
                f"127.0.0.1:{port}",
                "--database-url",
                url,
                "--database-timeout",
                "2",
                "--pool-timeout",
                "2",
            ],
            port,
            log_path,
        ).start()
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.EnrollmentServiceStub(channel)
        courses = [
            stub.CreateCourse(
                pb.CreateCourseRequest(code=f"CH-{i}", title="Chaos", capacity=0), timeout=10
            ).course.id
            for i in range(20)
        ]
        ledger = Ledger()
        killer = Killer(args.database, admin_url, name, args.interval)
        until = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=writer, args=(stub, courses, ledger, until, seed))
            for seed in range(args.threads)
        ]
        killer.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        killer.stop.set()
        killer.join()
        channel.close()
        server.stop()
        figures = {
            "database": args.database,
            "seconds": args.seconds,
            "kill_rounds": killer.rounds,
            "connections_killed": killer.killed,
            **check(url, ledger),
        }
    finally:
        if server is not None:
            server.stop()
        admin = _admin(admin_url)
        suffix = " WITH (FORCE)" if args.database == "postgresql" else ""
        admin.execute_sql(f"DROP DATABASE IF EXISTS {name}{suffix}")
        admin.close()
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    verdict = "PASS" if figures["lies"] == 0 else "FAIL"
    print(
        f"{verdict}: {figures['lies']} answer(s) contradicted the database; "
        f"{figures['database_unavailable']} DATABASE_UNAVAILABLE checked, "
        f"COMMIT_OUTCOME_UNKNOWN {figures['commit_outcome_unknown']}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
