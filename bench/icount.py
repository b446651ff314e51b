"""`python -m bench icount` (`make bench-icount`): instructions per call of the servicer
in-process, as valgrind's callgrind counts them.

`make bench-micro`'s CPU times move by a fifth between runs on a shared VM, more than
most single changes save. Instructions repeat within about 1% for the same code and
inputs, whatever else the machine is doing, so this tells a 5% change from the noise.
They are the process's user-space instructions only: not the kernel's work (the fsyncs,
the WAL's writes), not waiting, not what a cache miss costs; compare them between two
trees, not with seconds.

A call's figure is (instructions of a run making N calls - those of a run making none)
/ N. Each run is a new process under valgrind on a fresh copy of one seeded SQLite file
and makes one unmeasured call first (it compiles the statements), so start-up, imports
and that call cancel out. The calls are bench/micro.py's, their rows drawn from one
seeded generator; the enroll/drop pair is counted also without the change feed and
with the feed's Python but none of its statements (bench/nofeed.py), which splits what
the feed costs into its Python and its SQL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import procs
from bench.micro import workload
from bench.nofeed import without_feed, without_feed_statements
from bench.seed import Shape, seed

PAIR = "EnrollStudent + DropCourse"
# The change feed in a child run: as it is, without (bench/nofeed.py), or its Python
# without its statements; the pair's rows for the last two.
FEEDS = {
    "on": contextlib.nullcontext,
    "off": without_feed,
    "no-statements": without_feed_statements,
}
FEED_ROWS = (
    ("off", "  the same, no change feed"),
    ("no-statements", "  the feed's Python, no SQL"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls in the measured run")
    parser.add_argument("--child", nargs=3, metavar=("URL", "CALL", "N"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--feed", choices=FEEDS, default="on", help=argparse.SUPPRESS
    )  # of a child run


def _child(url: str, name: str, count: int, *, feed: str) -> int:
    """In the process valgrind runs: one call unmeasured, then count more."""
    from enrollment.server.persistence import engine, unit_of_work

    engine.open_pool(url, max_connections=4)
    call = workload(Shape(), random.Random(1))[name]
    # As the server's SQLite threads run them: keeping their connection.
    with unit_of_work.connection_kept(), FEEDS[feed]():
        for _ in range(count + 1):
            call()
    engine.close_pool()
    return 0


def _instructions(seeded: Path, name: str, count: int, *, feed: str = "on") -> int:
    """The instructions valgrind counted in a new process making count calls."""
    run = seeded.with_name("run.db")
    for leftover in (run, run.with_name("run.db-wal"), run.with_name("run.db-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(seeded, run)
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "bench", "icount", "--child", f"sqlite:///{run}", name, str(count),
        "--feed", feed,
    ]  # fmt: skip
    # One hash seed for every run: with a random one, start-up's instructions moved by
    # millions between runs, which a run's calls then divide (up to ~10% of a read).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run of {name!r} failed: {done.stderr[-2000:]}")
    return int(found.group(1))


def main(args: argparse.Namespace) -> int:
    if args.child:
        url, name, count = args.child
        return _child(url, name, int(count), feed=args.feed)
    if shutil.which("valgrind") is None:
        print("valgrind is missing (Debian's package valgrind): cannot count instructions")
        return 1
    shape = Shape()
    print(
        f"{'call':30} {'instructions/call':>17}   (in-process, callgrind: "
        f"runs of {args.calls} calls less runs of none)"
    )
    with tempfile.TemporaryDirectory(prefix="enrollment-icount-") as tmp:
        seeded = Path(tmp) / "seeded.db"
        url = f"sqlite:///{seeded}"
        procs.migrate(url)
        seed(url, shape)
        rows = [(name, "on", name) for name in workload(shape, random.Random(1))]
        rows += [(PAIR, feed, label) for feed, label in FEED_ROWS]
        for name, feed, label in rows:
            base = _instructions(seeded, name, 0, feed=feed)
            total = _instructions(seeded, name, args.calls, feed=feed)
            print(f"{label:30} {(total - base) / args.calls:17,.0f}", flush=True)
    return 0
