"""`make bench-profile`: py-spy samples the server under one mix; prints the top functions."""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import load, measure, procs
from bench.seed import Shape, seed
from enrollment.server.startup.config import ServerConfig
from tests import databases
from tests.servers import free_port, scrape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mix", default="read", choices=load.MIXES)
    parser.add_argument(
        "--database",
        default="sqlite",
        choices=("sqlite", "postgresql"),
        help="a new SQLite file, or a new database on the PostgreSQL server the tests use",
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--coroutines", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample waiting threads too (default: only the thread holding the GIL, which is "
        "where a Python server's CPU goes)",
    )
    parser.add_argument("--output", default="", help="keep py-spy's raw stacks in this file")
    parser.add_argument(
        "--threads-cpu",
        action="store_true",
        help="instead of a profile: the mix without py-spy, and the server's CPU and "
        "context switches a call, in all and by thread (from /proc; the threads named by "
        "one `py-spy dump`)",
    )
    parser.add_argument(
        "--write-groups",
        action="store_true",
        help="instead of a profile: the mix without py-spy (which stops the server for "
        "each sample, and a stopped loop counts as waiting), the server's /metrics on, and "
        "how many SQLite writes committed together on the event loop and how often they "
        "went to the writer thread",
    )


def top_lines(raw: str, top: int) -> str:
    """Self and inclusive shares of the sampled stacks (py-spy --format raw)."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames[1:]):  # the first frame names the process
            inclusive[frame] += n
    out = [f"{total} samples", "", f"{'self':>6}  function"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    out += ["", f"{'total':>6}  function (with what it calls)"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


def write_groups(metrics: dict[tuple[str, tuple], float]) -> str:
    """What the server's /metrics say of its SQLite writes on the event loop, from its
    start (the warm-up second included)."""
    name = "enrollment_sqlite_write_group_size"
    count = metrics.get((f"{name}_count", ()), 0)
    if not count:
        return "write groups: none (no writes on the event loop: not SQLite, or no writes)"
    total = metrics[(f"{name}_sum", ())]
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in metrics.items()
        if sample == f"{name}_bucket"
    )
    parts, below, previous = [], 0.0, 0.0  # the count and the bound of the bucket before
    for bound, cumulative in buckets:
        if cumulative > below:
            low = int(previous) + 1  # sizes are whole numbers: (previous, bound]
            if bound == float("inf"):
                label = f"{low}+"
            else:
                label = f"{low}-{int(bound)}" if bound > low else f"{low}"
            parts.append(f"{label}: {cumulative - below:.0f}")
        below, previous = cumulative, bound
    pauses = metrics.get(("enrollment_sqlite_write_pauses_total", ()), 0)
    return (
        f"write groups: {count:.0f} committed {total:.0f} writes ({total / count:.1f} a group); "
        f"groups by size {', '.join(parts)}; pauses (writes sent to the writer thread "
        f"for a while) {pauses:.0f}"
    )


def threads_cpu(
    before: dict[str, procs.ThreadStats],
    after: dict[str, procs.ThreadStats],
    times: tuple[tuple[float, float], tuple[float, float]],
    calls: int,
) -> str:
    """The server's CPU and context switches a call over the window, in all and by
    thread (procs.thread_stats before and after; times: the process's user and system
    seconds before and after); threads of one name with a number (rpc_0, rpc_1) go
    together."""
    per_call = 1e6 / calls  # µs a call for one second
    (user0, system0), (user1, system1) = times
    groups: dict[str, procs.ThreadStats] = {}
    for name, now in after.items():
        then = before.get(name, procs.ThreadStats())
        group = groups.setdefault(re.sub(r"_\d+$", "_*", name), procs.ThreadStats())
        group.seconds += now.seconds - then.seconds
        group.voluntary += now.voluntary - then.voluntary
        group.involuntary += now.involuntary - then.involuntary
        group.threads += now.threads
    voluntary = sum(g.voluntary for g in groups.values())
    involuntary = sum(g.involuntary for g in groups.values())
    out = [
        f"server CPU a call: {(user1 - user0 + system1 - system0) * per_call:.0f} µs "
        f"(user {(user1 - user0) * per_call:.0f}, system {(system1 - system0) * per_call:.0f}); "
        f"context switches a call: {voluntary / calls:.1f} voluntary, "
        f"{involuntary / calls:.1f} involuntary",
        f"  {'thread':<36} {'µs a call':>9}  {'switches a call':>15}",
    ]
    for name, group in sorted(groups.items(), key=lambda item: -item[1].seconds):
        cpu = group.seconds * per_call
        if cpu < 0.5 and group.voluntary + group.involuntary < calls / 20:
            continue  # idle the whole window, or nearly
        label = f"{name} ({group.threads})" if group.threads > 1 else name
        out.append(
            f"  {label:<36} {cpu:9.0f}  "
            f"{group.voluntary / calls:7.2f} + {group.involuntary / calls:.2f}"
        )
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists() and not args.write_groups:  # --threads-cpu names threads with it
        raise SystemExit("py-spy is missing: `make bench-profile` installs the bench extra")
    shape = Shape()
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix="enrollment-profile-") as tmp,
    ):
        tmpdir = Path(tmp)
        url = f"sqlite:///{tmpdir / 'bench.db'}"
        if args.database == "postgresql":
            postgresql = databases.Server("postgresql", databases.admin_url("postgresql"))
            url = postgresql.create(prefix="enrollment_profile")
            cleanup.callback(postgresql.drop, url)
        procs.migrate(url)
        seed(url, shape)
        metrics_port = free_port() if args.write_groups else 0
        server = procs.enrollment_server(
            free_port(),
            url,
            tmpdir / "server.log",
            threads=ServerConfig().threads,
            workers=1,
            log_level=args.log_level,
            options=("--metrics-address", f"127.0.0.1:{metrics_port}") if metrics_port else (),
        ).start()
        raw_path = Path(args.output) if args.output else tmpdir / "stacks.txt"

        def drive(warmup: float = 1.0) -> measure.Round:
            return measure.drive(
                server,
                args.mix,
                shape,
                processes=args.processes,
                coroutines=args.coroutines,
                duration=args.duration - 1,
                warmup=warmup,
            )

        if args.threads_cpu:
            try:
                drive()  # warm; then the window measured, its calls and its CPU alone
                pid = server.process.pid
                names = procs.thread_names(pid)  # the Python threads are all up by now
                before, times0 = procs.thread_stats([pid], names), procs.user_system_seconds(pid)
                result = drive(warmup=0.0)
                after, times1 = procs.thread_stats([pid], names), procs.user_system_seconds(pid)
            finally:
                server.stop()
            print(f"mix {args.mix}: {result.calls_per_s:.0f} calls/s, codes {result.codes}")
            print(threads_cpu(before, after, (times0, times1), sum(result.codes.values())))
            return 0
        if args.write_groups:
            try:
                result = drive()
                groups = write_groups(scrape(metrics_port))
            finally:
                server.stop()
            print(f"mix {args.mix}: {result.calls_per_s:.0f} calls/s, codes {result.codes}")
            print(groups)
            return 0
        try:
            # Samples start with the warm-up second, which is as hot as the rest.
            sampler = subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(server.process.pid),
                    "--subprocesses",
                    "--nolineno",
                    "--format",
                    "raw",
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(int(args.duration)),
                    "--output",
                    str(raw_path),
                    *([] if args.all_threads else ["--gil"]),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            result = drive()
            _, errors = sampler.communicate(timeout=60)
            if sampler.returncode:
                raise SystemExit(f"py-spy failed: {errors.strip()}")
        finally:
            server.stop()
        print(
            f"mix {args.mix}: {result.calls_per_s:.0f} calls/s under py-spy, codes {result.codes}\n"
        )
        print(top_lines(raw_path.read_text(), args.top))
    return 0
