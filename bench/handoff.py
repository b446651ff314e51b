"""`python -m bench handoff`: what handing a PostgreSQL read to a pool thread costs.

The server runs PostgreSQL's work in its pool threads (server/transport/pool.py): the
loop puts the call in the pool's queue, a thread runs the statement with psycopg2 (which
blocks that thread, not the loop), and hands the answer back with
call_soon_threadsafe. On SQLite the reads run on the loop itself. This measures, in
this process, the same one-row lookup by primary key both ways, 32 coroutines at once:

- `pool`: the server's WorkerPool with 4 threads, each with a connection of its own;
- `loop`: 4 psycopg2 asynchronous connections driven by the loop itself (the query is
  sent, the loop watches the socket, and the answer is read when it is there): no
  thread, no GIL hand-over.

It prints the process's CPU and context switches per read (the PostgreSQL server's own
work is not in them), in alternating rounds, and the medians. It is what a read on
PostgreSQL saves when the loop drives it (bench/PROFILE.md, "eighteenth session"),
as the server has done for its four one-statement reads since c64cd46
(server/persistence/loop_reads.py, with 2 connections by default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import select
import statistics
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions

from bench import procs
from enrollment.server.transport.pool import WorkerPool
from tests import databases

SQL = "SELECT id, name, email FROM handoff WHERE id = %s"
ROWS = 1000
LANES = 4  # the pool's threads (--threads' default) and the loop's connections
COROUTINES = 32
CONNECT_TIMEOUT = 10  # seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reads", type=int, default=20000, help="reads a round, per mode")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating")


class _PoolReads:
    """The server's way: a pool thread runs the statement on its own connection."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._local = threading.local()
        self._pool = WorkerPool(LANES, name="handoff", scope=self._connected)

    @contextlib.contextmanager
    def _connected(self) -> Iterator[None]:
        """A pool thread's connection, from its start to its end."""
        connection = self._local.connection = psycopg2.connect(self._url)
        connection.autocommit = True
        try:
            yield
        finally:
            connection.close()

    def _read(self, key: int) -> list[tuple[Any, ...]]:
        cursor = self._local.connection.cursor()
        cursor.execute(SQL, (key,))
        return cursor.fetchall()

    async def read(self, key: int) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._pool.run(self._read, key)
        return rows

    def close(self) -> None:
        self._pool.shutdown()


class _Lane:
    __slots__ = ("connection", "cursor", "answer")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.cursor = connection.cursor()
        self.answer: asyncio.Future[list[tuple[Any, ...]]] | None = None


def _wait_connected(connection: Any) -> None:
    """An asynchronous connection's start, waited for here (before the rounds)."""
    while (state := connection.poll()) != psycopg2.extensions.POLL_OK:
        socket = [connection.fileno()]
        if state == psycopg2.extensions.POLL_READ:
            ready = select.select(socket, [], [], CONNECT_TIMEOUT)[0]
        else:
            ready = select.select([], socket, [], CONNECT_TIMEOUT)[1]
        if not ready:
            raise TimeoutError(f"PostgreSQL did not answer within {CONNECT_TIMEOUT} s")


class _LoopReads:
    """The loop's way: asynchronous connections, each socket watched by the loop."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._free: collections.deque[_Lane] = collections.deque()
        self._waiting: collections.deque[asyncio.Future[_Lane]] = collections.deque()
        self._lanes = []
        for _ in range(LANES):
            connection = psycopg2.connect(url, async_=1)
            _wait_connected(connection)
            lane = _Lane(connection)
            loop.add_reader(connection.fileno(), self._readable, lane)
            self._lanes.append(lane)
            self._free.append(lane)

    def _readable(self, lane: _Lane) -> None:
        if lane.answer is None:
            return
        try:
            if lane.connection.poll() != psycopg2.extensions.POLL_OK:
                return  # part of the answer: the rest comes with the next readable
            rows = lane.cursor.fetchall()
        except psycopg2.Error as exc:  # the round fails with it instead of waiting forever
            lane.answer.set_exception(exc)
            lane.answer = None
            return
        answer, lane.answer = lane.answer, None
        answer.set_result(rows)
        if self._waiting:
            self._waiting.popleft().set_result(lane)
        else:
            self._free.append(lane)

    async def read(self, key: int) -> list[tuple[Any, ...]]:
        if self._free:
            lane = self._free.popleft()
        else:
            waiting = self._loop.create_future()
            self._waiting.append(waiting)
            lane = await waiting
        answer = lane.answer = self._loop.create_future()
        lane.cursor.execute(SQL, (key,))
        state = lane.connection.poll()  # sends what execute queued
        if state == psycopg2.extensions.POLL_OK:  # the answer was already read
            self._readable(lane)
        elif state == psycopg2.extensions.POLL_WRITE:
            raise RuntimeError("a one-row lookup did not fit the socket's buffer")
        return await answer

    def close(self) -> None:
        for lane in self._lanes:
            self._loop.remove_reader(lane.connection.fileno())
            lane.connection.close()


def _switches() -> tuple[int, int]:
    stats = procs.thread_stats([os.getpid()], {})
    return (
        sum(s.voluntary for s in stats.values()),
        sum(s.involuntary for s in stats.values()),
    )


async def _round(mode: str, url: str, reads: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    reader: _PoolReads | _LoopReads = _PoolReads(url) if mode == "pool" else _LoopReads(url, loop)
    keys = iter(range(10**12))
    each = reads // COROUTINES

    async def caller() -> None:
        for _ in range(each):
            key = next(keys) % ROWS + 1
            rows = await reader.read(key)
            if rows[0][0] != key:
                raise AssertionError(f"read {key}, got {rows}")

    try:
        # Warm up: every connection open, the statement planned.
        await asyncio.gather(*(reader.read(k + 1) for k in range(COROUTINES)))
        times, switches, start = os.times(), _switches(), loop.time()
        await asyncio.gather(*(caller() for _ in range(COROUTINES)))
        times_after, switches_after, end = os.times(), _switches(), loop.time()
    finally:
        reader.close()
    done = each * COROUTINES
    return {
        "reads_per_s": done / (end - start),
        "cpu_us": ((times_after.user - times.user) + (times_after.system - times.system))
        / done
        * 1e6,
        "voluntary": (switches_after[0] - switches[0]) / done,
        "involuntary": (switches_after[1] - switches[1]) / done,
    }


def _line(mode: str, found: dict[str, float]) -> str:
    return (
        f"{mode:<5} {found['reads_per_s']:>8,.0f} reads/s  CPU {found['cpu_us']:6.1f} us a read  "
        f"switches {found['voluntary']:.2f} + {found['involuntary']:.2f} a read"
    )


def _setup(url: str) -> None:
    connection = psycopg2.connect(url)
    connection.autocommit = True
    cursor = connection.cursor()
    cursor.execute("CREATE TABLE handoff (id integer PRIMARY KEY, name text, email text)")
    cursor.execute(
        "INSERT INTO handoff SELECT g, 'name ' || g, 'e' || g || '@example.org'"
        " FROM generate_series(1, %s) g",
        (ROWS,),
    )
    cursor.execute("ANALYZE handoff")
    connection.close()


def main(args: argparse.Namespace) -> int:
    server = databases.Server("postgresql", databases.admin_url("postgresql"))
    url = server.create("enrollment_bench_handoff")
    try:
        _setup(url)
        found: dict[str, list[dict[str, float]]] = {"pool": [], "loop": []}
        print(
            f"handoff: a one-row read by key, {COROUTINES} at once, {LANES} threads or "
            f"connections, {args.reads} reads a round; process CPU (PostgreSQL's not in it)"
        )
        for number in range(1, args.rounds + 1):
            for mode in ("pool", "loop"):
                result = asyncio.run(_round(mode, url, args.reads))
                found[mode].append(result)
                print(f"  round {number}/{args.rounds}  {_line(mode, result)}")
        medians = {
            mode: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            for mode, rounds in found.items()
        }
        print("medians:")
        for mode, result in medians.items():
            print(f"  {_line(mode, result)}")
        saved = medians["pool"]["cpu_us"] - medians["loop"]["cpu_us"]
        print(
            f"the loop's own read costs {saved:.1f} us less CPU than a pool thread's "
            f"({saved / medians['pool']['cpu_us']:.0%} of it)"
        )
    finally:
        server.drop(url)
    return 0
