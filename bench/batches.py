"""In-process cost of batches of 1000, this checkout's batch code against another
revision's, interleaved in one process so that the machine's load falls on both alike.

python -m bench.batches [--database-url URL] [--before REV] [--rounds 7]: a fresh
database (a new SQLite file, or an empty database at URL), 1000 students and 2 courses;
each round runs BatchEnrollStudents then BatchDropCourses of 1000 items through the
domain functions (no gRPC), first with server/domain/batches.py and enrollments.py as
they are at REV (read with git show, loaded as modules of their own), then with this
checkout's. Prints the median and minimum per side: wall milliseconds, or on SQLite,
which runs in this process, its CPU milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from enrollment.server.domain import batches, courses, students
from enrollment.server.persistence import engine, migrator

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, rev: str, path: str, replace: tuple[tuple[str, str], ...] = ()):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    for old, new in replace:
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own code
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batches", description=__doc__)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--before", default="3917860", help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=7, help="the first is not counted")
    args = parser.parse_args(argv)
    _load("bench_before_enrollments", args.before, "server/domain/enrollments.py")
    before = _load(
        "bench_before_batches",
        args.before,
        "server/domain/batches.py",
        (
            (
                "from enrollment.server.domain.enrollments import",
                "from bench_before_enrollments import",
            ),
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/batches.db"
        migrator.migrate(engine.open_pool(url, max_connections=4, create=True))
        try:
            course_ids = [
                courses.create_course(code=f"B-{i}", title="Batches", capacity=0).id
                for i in range(2)
            ]
            student_ids = [
                students.create_student(name="S", email=f"b{i}@example.com").id for i in range(1000)
            ]
            clock = time.process_time if url.startswith("sqlite") else time.perf_counter
            unit = "CPU ms" if url.startswith("sqlite") else "ms"
            took: dict[str, list[tuple[float, float]]] = {args.before: [], "this checkout": []}
            for round_ in range(args.rounds):
                for name, module in ((args.before, before), ("this checkout", batches)):
                    items = [module.Item(s, course_ids[i % 2]) for i, s in enumerate(student_ids)]
                    started = clock()
                    module.batch_enroll(items=items, allow_partial_success=False)
                    enrolled = clock()
                    module.batch_drop(items=items, allow_partial_success=False)
                    dropped = clock()
                    if round_:
                        took[name].append(
                            ((enrolled - started) * 1000, (dropped - enrolled) * 1000)
                        )
        finally:
            engine.close_pool()
    for name, figures in took.items():
        enroll, drop = [f[0] for f in figures], [f[1] for f in figures]
        print(
            f"{name:>14}: enroll 1000 median {statistics.median(enroll):6.0f} "
            f"min {min(enroll):6.0f} {unit}; drop 1000 median {statistics.median(drop):6.0f} "
            f"min {min(drop):6.0f} {unit}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
