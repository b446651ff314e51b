"""Server processes for the benchmarks: start, wait for the port, read CPU time, stop."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent


def _stat(pid: int, task: int | None = None) -> list[str] | None:
    where = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        text = Path(where).read_text()
    except OSError:
        return None
    # The command name may hold spaces; fields after it are space separated.
    return text[text.rindex(")") + 2 :].split()


def _cpu(fields: list[str] | None) -> float:
    """User + system CPU time, in seconds, of a stat line's fields (0 once it is gone)."""
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    return _cpu(_stat(pid))


def descendants(pid: int) -> list[int]:
    """pid and every process below it (a server that forks workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


# The database servers' process names: their CPU is the database's share of a call.
DATABASE_COMMANDS = ("postgres", "mariadbd", "mysqld")


def database_pids() -> list[int]:
    """Every PostgreSQL and MariaDB process on the machine (their backends, writers,
    vacuum)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() in DATABASE_COMMANDS:
                    found.append(int(entry))
    return found


def database_cpu_seconds() -> float:
    """User + system CPU time of every PostgreSQL and MariaDB process: what a call
    costs the database, for a server on either (SQLite's share is in the server's own
    CPU). Machine-wide: figures are only meaningful when nothing else uses those
    databases."""
    return tree_cpu_seconds(database_pids())


def scheduled_seconds(pids: list[int]) -> float:
    """Time on a CPU of every thread of pids, to the nanosecond (schedstat), where
    cpu_seconds counts clock ticks of 10 ms: for small figures, such as an idle
    process's. A thread that ended before the call is not counted."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def thread_names(pid: int) -> dict[int, str]:
    """The Python name of each thread of a process, by its native id, as py-spy (the
    bench extra) dumps them; {} where py-spy is missing or may not attach."""
    spy = BIN / "py-spy"
    if not spy.exists():
        return {}
    done = subprocess.run(
        [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, check=False
    )
    names = {}
    for line in done.stdout.splitlines():
        # "Thread 326 (idle): "writer_0"": the native id, as /proc/<pid>/task lists it.
        found = re.match(r'Thread (\d+) \([^)]*\): "([^"]+)"', line)
        if found:
            names[int(found.group(1))] = found.group(2)
    return names


PYTHON_THREADS = "Python threads"  # thread_cpu_seconds' name for them without py-spy


def _comm(pid: int, task: int) -> str:
    """A thread's command name ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class ThreadStats:
    """What the threads of one name have spent so far: CPU (user + system, seconds),
    context switches (voluntary: waits; involuntary: preempted), and how many threads."""

    seconds: float = 0.0
    voluntary: int = 0
    involuntary: int = 0
    threads: int = 0


def _switches(pid: int, task: int) -> tuple[int, int]:
    """A thread's voluntary and involuntary context switches ((0, 0) once it is gone)."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in counts:
                counts[key] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def thread_stats(pids: list[int], names: dict[int, str]) -> dict[str, ThreadStats]:
    """CPU and context switches by thread: a Python thread by its name (names, from
    thread_names; without them all together as PYTHON_THREADS), any other by its
    command name (grpc's own threads, several of one name together)."""
    stats: dict[str, ThreadStats] = {}
    for pid in pids:
        try:
            tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        main = _comm(pid, pid)
        for task in tasks:
            name = names.get(task)
            if name is None:
                name = _comm(pid, task)
                if name == main:
                    # Python's threads keep the process's command name, which differs
                    # between `enrollment-server` and `python -m bench.nofeed`.
                    name = PYTHON_THREADS
            entry = stats.setdefault(name or str(task), ThreadStats())
            voluntary, involuntary = _switches(pid, task)
            entry.seconds += _cpu(_stat(pid, task))
            entry.voluntary += voluntary
            entry.involuntary += involuntary
            entry.threads += 1
    return stats


def thread_cpu_seconds(pids: list[int], names: dict[int, str]) -> dict[str, float]:
    """User + system CPU time by thread, named as thread_stats names them."""
    return {name: entry.seconds for name, entry in thread_stats(pids, names).items()}


def user_system_seconds(pid: int) -> tuple[float, float]:
    """A process's user and system CPU time apart (all its threads; (0, 0) once gone)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Server:
    """A server subprocess listening on 127.0.0.1:port."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] | None = None  # the whole environment (None: this process's)
    pids: list[int] = field(default_factory=list)
    # Whether it serves from a database server (PostgreSQL, MariaDB): then a round
    # measures the database's CPU too (measure.drive).
    remote_database: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen within {timeout}s; see {self.log_path}")
        return self

    def cpu_seconds(self) -> float:
        # Looked up each time: a server may fork its workers after it starts listening.
        self.pids = descendants(self.process.pid)
        return tree_cpu_seconds(self.pids)

    def rss_kib(self) -> int:
        """Resident memory of the server and the workers it forked, in KiB."""
        return sum(rss_kib(p) for p in descendants(self.process.pid))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def enrollment_server(
    port: int,
    database_url: str,
    log_path: Path,
    *,
    threads: int,
    workers: int,
    log_level: str,
    executable: str = "",
    command: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
) -> Server:
    """This checkout's server, or the `enrollment-server` executable of another one;
    command: what runs this checkout's server CLI instead (`python -m bench.nofeed`);
    options: more of `serve`'s options."""
    argv = [
        *(command or (executable or str(BIN / "enrollment-server"),)),
        "--log-level",
        log_level,
        "serve",
        "--address",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        # Another checkout (bench --other-server) may predate --threads; every one takes
        # --max-workers, its old name.
        "--max-workers" if executable else "--threads",
        str(threads),
        "--grace",
        "1",
    ]
    if workers != 1:
        argv += ["--workers", str(workers)]
    argv += options
    remote = not database_url.startswith("sqlite:")
    return Server("enrollment-server", argv, port, log_path, remote_database=remote)


def ceiling_server(port: int, log_path: Path, *, threads: int, kind: str = "sync") -> Server:
    """A bare server of bench/ceiling.py: grpcio's sync server (threads) or grpc.aio."""
    argv = [
        sys.executable,
        "-m",
        "bench.ceiling",
        "--address",
        f"127.0.0.1:{port}",
        "--kind",
        kind,
        "--threads",
        str(threads),
    ]
    return Server(f"ceiling ({kind})", argv, port, log_path)


def serve_has_workers_flag() -> bool:
    """Whether this checkout's `enrollment-server serve` accepts --workers."""
    result = subprocess.run(
        [str(BIN / "enrollment-server"), "serve", "--help"], capture_output=True, text=True
    )
    return "--workers" in result.stdout


def migrate(database_url: str) -> None:
    result = subprocess.run(
        [str(BIN / "enrollment-server"), "migrate", "--database-url", database_url],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(f"migrate failed:\n{result.stdout}{result.stderr}")
