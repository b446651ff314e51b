"""`make bench`: the real server against the bare grpcio ceilings, rounds alternating.

The ceiling of a mix is the cheaper per call of two bare servers on the same proto
(grpcio's sync server and grpc.aio, bench/ceiling.py), measured in the same rounds; the
targets are those of the performance issue (server CPU per call as a multiple of the
ceiling's, `--workers 2` read throughput, memory per idle watcher).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import h2, load, measure, memory, procs
from bench.seed import Shape, seed
from enrollment.server.startup.config import ServerConfig
from tests import databases
from tests.servers import free_port

PROJECT, WORKERS, THREADS = "enrollment", "enrollment-w", "enrollment-t"
CEILING, CEILING_AIO = "ceiling", "ceiling-aio"  # grpcio's sync server; grpc.aio
CEILINGS = (CEILING, CEILING_AIO)
BOUNDED = "aio-bounded"  # --bound-check: grpc.aio with the request-arrival bound (ceiling.py)
POSTGRESQL = "enrollment-pg"  # the same server on a PostgreSQL database, in `mixed`
OTHER = "other"
# `read` driven by h2load: one student per round, ListCourses and GetStudent in turn.
H2_READ = "read-h2"
EXPECTED_CODES = {"OK"}
H2_CONNECTIONS = 8

# The performance issue's targets: server CPU per call as a multiple of the ceiling's.
CPU_TARGETS = (
    ("read", PROJECT, 2.1),
    ("write", PROJECT, 3.5),
    ("mixed", PROJECT, 2.3),
    ("mixed", POSTGRESQL, 3.0),
)
WORKERS_TARGET = 1.8  # `--workers 2` read throughput over one process's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixes", default=",".join(load.MIXES), help="comma-separated mixes")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server and mix")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument(
        "--coroutines", type=int, default=32, help="concurrent calls per process (64 in all)"
    )
    parser.add_argument(
        "--threads",
        "--max-workers",  # the old name, as serve's
        dest="threads",
        type=int,
        default=ServerConfig().threads,
        help="thread pool size of both servers (default: serve's, %(default)s; "
        "--max-workers is the old name)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="an empty database to migrate, seed and serve (default: a fresh SQLite file)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="passed to `serve --workers` (when it exists)"
    )
    parser.add_argument(
        "--workers-check",
        type=int,
        default=2,
        help="also run `read` with `serve --workers N` against one process (0: skip)",
    )
    parser.add_argument(
        "--threads-check",
        type=int,
        default=0,
        help="also run every mix against a server with --threads N, in the same rounds",
    )
    parser.add_argument(
        "--bound-check",
        action="store_true",
        help="also run every mix against grpc.aio's bare server with the methods "
        "registered as the enrollment server registers them, request-streaming with "
        "the bound on a request's arrival (bench/ceiling.py, aio-bounded): what that "
        "bound costs before any of the server's own work",
    )
    parser.add_argument(
        "--other-server",
        default="",
        metavar="PATH",
        help="also run every mix against the enrollment-server executable of another "
        "checkout (its .venv/bin/enrollment-server), in the same rounds: before/after "
        "figures that one machine's drift cannot tell apart",
    )
    parser.add_argument(
        "--h2load",
        choices=("auto", "on", "off"),
        default="auto",
        help="also drive `read` with h2load, a client cheaper than Python (auto: when installed)",
    )
    parser.add_argument(
        "--postgresql",
        choices=("auto", "on", "off"),
        default="auto",
        help="also run `mixed` against a PostgreSQL database created for the run and dropped "
        "after it (auto: when the server at TEST_POSTGRESQL_URL answers)",
    )
    parser.add_argument(
        "--watchers",
        type=int,
        default=memory.WATCHERS,
        help="idle WatchEvents streams for the memory figure (0: skip)",
    )
    parser.add_argument("--log-level", default="INFO", help="the server's --log-level")
    parser.add_argument("--students", type=int, default=10_000)
    parser.add_argument("--courses", type=int, default=500)
    parser.add_argument("--per-student", type=int, default=5)
    parser.add_argument("--json", default="", help="results file (default bench/results/…)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server"], capture_output=True, text=True
        ).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(args: argparse.Namespace) -> int:
    mixes = [m for m in args.mixes.split(",") if m]
    for mix in mixes:
        if mix not in load.MIXES:
            raise SystemExit(f"unknown mix {mix!r}; choose from {', '.join(load.MIXES)}")
    shape = Shape(args.students, args.courses, args.per_student)
    has_workers = procs.serve_has_workers_flag()
    if args.h2load == "on" and not h2.available():
        raise SystemExit("--h2load on: h2load is not installed (Debian: nghttp2-client)")
    if "read" in mixes and args.h2load != "off":
        if h2.available():
            mixes.insert(mixes.index("read") + 1, H2_READ)
        else:
            print("h2load not found: the aio client drives every mix", file=sys.stderr)
    if args.workers != 1 and not has_workers:
        raise SystemExit("this checkout's `enrollment-server serve` has no --workers flag")
    postgresql = _postgresql(args) if "mixed" in mixes else None
    pg_url = ""
    with (
        contextlib.ExitStack() as cleanup,
        tempfile.TemporaryDirectory(prefix="enrollment-bench-") as tmp,
    ):
        tmpdir = Path(tmp)
        url = args.database_url or f"sqlite:///{tmpdir / 'bench.db'}"
        started = time.monotonic()
        procs.migrate(url)
        seed(url, shape)
        print(
            f"seeded {shape.students} students, {shape.courses} courses, "
            f"{shape.enrollments} enrollments in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        if postgresql is not None:
            pg_url = postgresql.create(prefix="enrollment_bench")
            cleanup.callback(postgresql.drop, pg_url)
            procs.migrate(pg_url)
            seed(pg_url, shape)

        def project(log_name: str, *, threads: int, workers: int, executable: str = ""):
            return procs.enrollment_server(
                free_port(),
                url,
                tmpdir / log_name,
                threads=threads,
                workers=workers,
                log_level=args.log_level,
                executable=executable,
            )

        servers = {
            PROJECT: project("server.log", threads=args.threads, workers=args.workers),
            **{
                name: procs.ceiling_server(
                    free_port(), tmpdir / f"{name}.log", threads=args.threads, kind=kind
                )
                for name, kind in ((CEILING, "sync"), (CEILING_AIO, "aio"))
            },
        }
        if pg_url:
            servers[POSTGRESQL] = procs.enrollment_server(
                free_port(),
                pg_url,
                tmpdir / "server-pg.log",
                threads=args.threads,
                workers=args.workers,
                log_level=args.log_level,
            )
        workers_check = args.workers_check if has_workers and "read" in mixes else 0
        if workers_check == args.workers:
            workers_check = 0
        if workers_check:
            servers[WORKERS] = project(
                "server-workers.log", threads=args.threads, workers=workers_check
            )
        if args.threads_check:
            servers[THREADS] = project(
                "server-threads.log", threads=args.threads_check, workers=args.workers
            )
        if args.bound_check:
            servers[BOUNDED] = procs.ceiling_server(
                free_port(), tmpdir / f"{BOUNDED}.log", threads=args.threads, kind=BOUNDED
            )
        if args.other_server:
            servers[OTHER] = project(
                "server-other.log",
                threads=args.threads,
                workers=1,
                executable=args.other_server,
            )
        try:
            for server in servers.values():
                server.start()
            time.sleep(memory.SETTLE_S)
            idle_kib = servers[PROJECT].rss_kib()
            results = _run_rounds(servers, mixes, shape, args, tmpdir)
            watchers = (
                memory.with_watchers(servers[PROJECT], shape, args.watchers)
                if args.watchers
                else None
            )
        finally:
            for server in servers.values():
                server.stop()
        log_tail = (tmpdir / "server.log").read_text(errors="replace").splitlines()[-3:]
        miscounted = databases.miscounted_courses(url)
        if pg_url:
            miscounted += [f"postgresql {m}" for m in databases.miscounted_courses(pg_url)]

    report = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": _git_commit(),
            "host": platform.node(),
            "cpus": measure.CPUS,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "database": args.database_url.split(":", 1)[0] if args.database_url else "sqlite",
            "concurrency": args.processes * args.coroutines,
            "command": " ".join(sys.argv),
            "args": vars(args),
            "workers_flag": has_workers,
            "postgresql": bool(pg_url),
        },
        "series": results,
        "memory": _memory(idle_kib, results, watchers),
    }
    report["targets"] = targets(report, workers_check)
    print(render(report))
    path = Path(args.json) if args.json else _default_json_path(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nresults: {path}")
    unexpected = {
        f"{mix}/{name}": {c: n for c, n in s["codes"].items() if c not in EXPECTED_CODES}
        for mix, by_server in results.items()
        for name, s in by_server.items()
    }
    unexpected = {k: v for k, v in unexpected.items() if v}
    if miscounted:
        print(f"FAILED: enrolled_count differs from the roster: {miscounted[:10]}")
        return 1
    if unexpected:
        print(f"FAILED: unexpected status codes {unexpected}", file=sys.stderr)
        print("server log ends:", *log_tail, sep="\n  ", file=sys.stderr)
        return 1
    if args.strict and any(t["verdict"] == "FAIL" for t in report["targets"]):
        return 1
    return 0


def _postgresql(args: argparse.Namespace) -> databases.Server | None:
    """The PostgreSQL server `mixed` also runs on, or None (said on stderr)."""
    if args.postgresql == "off":
        return None
    server = databases.Server("postgresql", databases.admin_url("postgresql"))
    try:
        server.check()
    except Exception as exc:  # noqa: BLE001 - the driver's reason, whatever it is
        if args.postgresql == "on":
            raise SystemExit(f"--postgresql on: cannot reach {server.url}: {exc}") from None
        print(f"PostgreSQL not reachable ({exc}): no PostgreSQL rows", file=sys.stderr)
        return None
    return server


def _memory(idle_kib: int, results: dict, watchers: memory.Watchers | None) -> dict:
    read = results.get("read", {}).get(PROJECT)
    found: dict = {"idle_kib": idle_kib, "read_kib": read["server_rss_kib"] if read else None}
    if watchers is not None:
        found.update(
            watchers=watchers.watchers,
            before_watchers_kib=watchers.rss_before_kib,
            with_watchers_kib=watchers.rss_with_kib,
            per_watcher_kib=watchers.per_watcher_kib,
        )
    return found


def _default_json_path(report: dict) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("bench/results") / f"bench-{stamp}-{report['meta']['commit']}.json"


def _run_rounds(servers, mixes, shape, args, tmpdir: Path) -> dict:
    results: dict[str, dict] = {}
    for mix in mixes:
        names = [PROJECT, *CEILINGS]
        # --workers is judged on the cheapest client: h2load's rows when they run.
        workers_mix = H2_READ if H2_READ in mixes else "read"
        if mix == workers_mix and WORKERS in servers:
            names.append(WORKERS)
        if mix == "mixed" and POSTGRESQL in servers:
            names.append(POSTGRESQL)
        if THREADS in servers:
            names.append(THREADS)
        if OTHER in servers:
            names.append(OTHER)
        if BOUNDED in servers:
            names.append(BOUNDED)
        rounds: dict[str, list] = {name: [] for name in names}
        for index in range(args.rounds):
            # Alternate which server goes first, so drift on a shared machine hits both.
            order = names if index % 2 == 0 else list(reversed(names))
            for name in order:
                server = servers[name]
                if mix == H2_READ:
                    result = h2.drive(
                        server,
                        tmpdir,
                        # The same 16 calls in flight, over 8 connections: SO_REUSEPORT
                        # spreads connections, so --workers N needs several of them.
                        connections=H2_CONNECTIONS,
                        streams=max(1, args.processes * args.coroutines // H2_CONNECTIONS),
                        duration=args.duration,
                        warmup=args.warmup,
                        student=1 + (index * 7919) % shape.students,
                        log_path=None if name in (*CEILINGS, BOUNDED) else server.log_path,
                    )
                else:
                    result = measure.drive(
                        server,
                        mix,
                        shape,
                        processes=args.processes,
                        coroutines=args.coroutines,
                        duration=args.duration,
                        warmup=args.warmup,
                        seed=index + 1,
                    )
                rounds[name].append(result)
                print(
                    f"  {mix:5} round {index + 1}/{args.rounds} {name:12} "
                    f"{result.calls_per_s:8.0f} calls/s  p99 {result.p99_ms:6.2f} ms  "
                    f"server {result.server_cpu_us_per_call:6.0f} us/call  "
                    + (
                        f"database {result.database_cpu_us_per_call:6.0f} us/call  "
                        if result.database_cpu_us_per_call
                        else ""
                    )
                    + f"codes {result.codes}",
                    file=sys.stderr,
                )
        results[mix] = {name: measure.summarize(r) for name, r in rounds.items()}
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ceiling_of(by_server: dict) -> str:
    """The mix's ceiling: the bare server cheaper per call in its rounds."""
    present = [name for name in CEILINGS if name in by_server]
    return min(present, key=lambda name: by_server[name]["server_cpu_us_per_call"])


def targets(report: dict, workers_check: int) -> list[dict]:
    series = report["series"]
    found = []

    def add(name: str, value: float | None, limit: float, better: str, unit: str, note=""):
        if value is None:
            verdict = "SKIP"
        else:
            ok = value <= limit if better == "max" else value >= limit
            verdict = "PASS" if ok else "FAIL"
        found.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "better": better,
                "unit": unit,
                "verdict": verdict,
                "note": note,
            }
        )

    cpu = "server_cpu_us_per_call"
    for mix, name, limit in CPU_TARGETS:
        by_server = series.get(mix, {})
        ours = by_server.get(name)
        value, note = None, "not run"
        if ours is not None:
            ceiling = ceiling_of(by_server)
            value = _ratio(ours[cpu], by_server[ceiling][cpu])
            note = f"ceiling: {ceiling}"
        elif name == POSTGRESQL and mix in series:
            note = "no PostgreSQL server (--postgresql)"
        label = f"{mix}{' (PostgreSQL)' if name == POSTGRESQL else ''}: server CPU/call vs ceiling"
        add(label, value, limit, "max", "x", note)
    # The workers check wants the cheapest client: h2load's rows when they were run.
    workers_mix = H2_READ if WORKERS in series.get(H2_READ, {}) else "read"
    workers = series.get(workers_mix, {}).get(WORKERS)
    single = series.get(workers_mix, {}).get(PROJECT)
    note = (
        ""
        if workers
        else (
            "serve has no --workers flag yet" if not report["meta"]["workers_flag"] else "not run"
        )
    )
    if workers and workers_mix != H2_READ:
        note = "no h2load: the Python client's rows"
    if workers and single and single["server_cpu_share"] > 0:
        # What the machine's cores allow at one process's CPU per call: the share the
        # two-process row's client left over, over the share one process used.
        bound = (1 - workers["client_cpu_share"]) / single["server_cpu_share"]
        used = single["server_cpu_share"] * measure.CPUS
        note = (note + "; " if note else "") + (
            f"one process used {used:.2f} of {measure.CPUS} cores: "
            f"at its CPU per call the cores allow {bound:.2f}x"
        )
    add(
        f"{workers_mix}: --workers {workers_check or 2} throughput vs one process",
        workers and _ratio(workers["calls_per_s"], single["calls_per_s"]),
        WORKERS_TARGET,
        "min",
        "x",
        note,
    )
    per_watcher = report["memory"].get("per_watcher_kib")
    add(
        "memory: RSS per idle WatchEvents stream",
        per_watcher,
        memory.PER_WATCHER_LIMIT_KIB,
        "max",
        " KiB",
        "" if per_watcher is not None else "--watchers 0",
    )
    return found


def render(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"enrollment bench  commit {meta['commit']}  {meta['date']}  host {meta['host']}  "
        f"{meta['cpus']} CPUs  {meta['database']}  concurrency {meta['concurrency']}  "
        f"medians of {meta['args']['rounds']} rounds x {meta['args']['duration']:g}s",
        "",
        f"{'mix':7} {'server':13} {'calls/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'srv us/call':>11} {'srv CPU':>7} {'cli CPU':>7}  {'% ceil':>6} {'cpu x':>5} "
        f"{'p99 x':>5}  codes",
    ]
    for mix, by_server in report["series"].items():
        best = ceiling_of(by_server)
        ceiling = by_server[best]
        for name, s in by_server.items():
            if name in CEILINGS:
                rel = f"{'':>6} {'':>5} {'':>5}"
            else:
                cpu = "server_cpu_us_per_call"
                rel = (
                    f"{_ratio(s['calls_per_s'], ceiling['calls_per_s']) * 100:5.0f}% "
                    f"{_ratio(s[cpu], ceiling[cpu]):5.2f} "
                    f"{_ratio(s['p99_ms'], ceiling['p99_ms']):5.2f}"
                )
            label = {
                WORKERS: f"enroll -w{meta['args']['workers_check']}",
                THREADS: f"enroll -t{meta['args'].get('threads_check')}",
                POSTGRESQL: "enroll pg",
            }.get(name, name)
            if name == best:
                label += " *"
            codes = " ".join(f"{c}={n}" for c, n in sorted(s["codes"].items()))
            lines.append(
                f"{mix:7} {label:13} {s['calls_per_s']:8.0f} {s['p50_ms']:7.2f} "
                f"{s['p90_ms']:7.2f} {s['p99_ms']:7.2f} {s['server_cpu_us_per_call']:11.0f} "
                f"{s['server_cpu_share'] * 100:6.0f}% {s['client_cpu_share'] * 100:6.0f}%  "
                f"{rel}  {codes}"
            )
    lines += [
        "",
        "ceiling (*): the cheaper per call of the two bare servers in that mix (grpcio sync, "
        "grpc.aio);",
        "srv/cli CPU: share of all the machine's cores over the window; "
        "% ceil, cpu x, p99 x: against that ceiling",
    ]
    mem = report["memory"]
    lines += ["", "memory (server RSS):"]
    lines.append(f"  idle, after start                      {mem['idle_kib'] / 1024:8.1f} MiB")
    if mem.get("read_kib") is not None:
        lines.append(f"  under the read mix (end of window)     {mem['read_kib'] / 1024:8.1f} MiB")
    if "per_watcher_kib" in mem:
        lines.append(
            f"  with {mem['watchers']} idle WatchEvents streams     "
            f"{mem['with_watchers_kib'] / 1024:8.1f} MiB (from "
            f"{mem['before_watchers_kib'] / 1024:.1f} MiB: "
            f"{mem['per_watcher_kib']:.1f} KiB per stream)"
        )
    lines += ["", "targets:"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        bound = "<=" if t["better"] == "max" else ">="
        note = f"  ({t['note']})" if t["note"] else ""
        lines.append(
            f"  {t['verdict']:4}  {t['target']:52} {value:>9} (want {bound} {t['limit']}){note}"
        )
    return "\n".join(lines)
