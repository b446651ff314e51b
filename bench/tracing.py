"""`python -m bench tracing` (in `make bench`): what tracing costs the server, off and on.

Three servers on one seeded SQLite file, driven by the read mix in interleaved rounds
(so drift on a shared machine hits each alike), server CPU per call compared:
- off: no OTEL_* variable. No tracing interceptor is installed and nothing of
  OpenTelemetry is imported (tests/test_tracing.py checks both), so the call path is
  the one without tracing except for one `is None` test per transaction (the unit of
  work's hook);
- off again: a second, identical off server. The two differ only by noise, and that
  difference is the smallest effect this machine can measure;
- on: OTEL_TRACES_EXPORTER=otlp (HTTP/protobuf) to a local receiver that decodes and
  counts the spans, every call sampled (a server span and a transaction span each);
- on, 1 in 10: the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio and
  OTEL_TRACES_SAMPLER_ARG=0.1, what a busy deployment might run.
"Off costs nothing measurable" PASSes when what off adds to a call (that one test,
timed in-process) is below both 1% of a call's CPU and the noise between the two off
servers. A server built without any tracing code cannot be run from this checkout;
this is its honest stand-in: the difference between it and `off` is exactly that test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

from bench import measure, procs
from bench.seed import Shape, seed
from enrollment.client import tracecontext
from enrollment.server.persistence import unit_of_work
from tests.otlp import Receiver
from tests.servers import free_port

OFF, OFF_AGAIN, ON, SAMPLED = "off", "off again", "on", "on, 1 in 10"
# Of a call's CPU: what off may add, at most, to count as nothing.
NOTHING_SHARE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=4, help="rounds per server")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--coroutines", type=int, default=8, help="concurrent calls per process")
    parser.add_argument("--students", type=int, default=2000)
    parser.add_argument("--courses", type=int, default=200)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")


def main(args: argparse.Namespace) -> int:
    shape = Shape(args.students, args.courses, 5)
    untraced = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with contextlib.ExitStack() as stack:
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="enrollment-")))
        # One receiver per traced server, so each one's spans are counted apart.
        receivers = {name: stack.enter_context(Receiver(keep=False)) for name in (ON, SAMPLED)}
        url = f"sqlite:///{tmpdir / 'bench.db'}"
        procs.migrate(url)
        seed(url, shape)
        environments = {OFF: untraced, OFF_AGAIN: untraced}
        for name, receiver in receivers.items():
            environments[name] = {
                **untraced,
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            }
        environments[SAMPLED]["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        environments[SAMPLED]["OTEL_TRACES_SAMPLER_ARG"] = "0.1"
        servers = {}
        for name, env in environments.items():
            server = procs.enrollment_server(
                free_port(),
                url,
                tmpdir / f"{name.replace(' ', '-').replace(',', '')}.log",
                threads=4,
                workers=1,
                log_level="WARNING",
            )
            server.env = env
            servers[name] = server
        rounds: dict[str, list[measure.Round]] = {name: [] for name in servers}
        try:
            for server in servers.values():
                server.start()
            names = list(servers)
            for index in range(args.rounds):
                # Each server goes first, second, ... and last in turn.
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    rounds[name].append(
                        measure.drive(
                            servers[name],
                            "read",
                            shape,
                            processes=args.processes,
                            coroutines=args.coroutines,
                            duration=args.duration,
                            warmup=args.warmup,
                            seed=index + 1,
                        )
                    )
        finally:
            for server in servers.values():
                server.stop()  # a traced one exports what it still holds
        deadline = time.monotonic() + 10
        traced_calls = sum(r.calls for r in rounds[ON])
        while receivers[ON].server_spans < traced_calls and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = {name: receiver.server_spans for name, receiver in receivers.items()}
    return report(rounds, spans, args)


def report(
    rounds: dict[str, list[measure.Round]], spans: dict[str, int], args: argparse.Namespace
) -> int:
    cpu = {
        name: statistics.median(r.server_cpu_us_per_call for r in rs) for name, rs in rounds.items()
    }
    p99 = {name: statistics.median(r.p99_ms for r in rs) for name, rs in rounds.items()}
    rate = {name: statistics.median(r.calls_per_s for r in rs) for name, rs in rounds.items()}
    bad = {
        name: {c: n for r in rs for c, n in r.codes.items() if c != "OK"}
        for name, rs in rounds.items()
    }
    noise = abs(cpu[OFF] - cpu[OFF_AGAIN])
    added_us = _off_hook_us()
    client_us = _client_us()
    base = cpu[OFF]
    print(
        f"\ntracing: read mix, {args.processes}x{args.coroutines} calls in flight, "
        f"medians of {args.rounds} interleaved rounds of {args.duration:g}s"
    )
    print(f"  {'server':<46} {'CPU us/call':>11} {'calls/s':>8} {'p99 ms':>7}")
    rows = (
        (OFF, "off (no OTEL_*: no interceptor, no import)", ""),
        (OFF_AGAIN, "off again (identical: the noise)", _delta(cpu[OFF_AGAIN], base)),
        (ON, "on (otlp/http, every call sampled)", _delta(cpu[ON], base)),
        (SAMPLED, "on, 1 in 10 calls sampled", _delta(cpu[SAMPLED], base)),
    )
    for name, label, delta in rows:
        line = f"  {label:<46} {cpu[name]:>11.1f} {rate[name]:>8.0f} {p99[name]:>7.2f}  {delta}"
        print(line.rstrip())
    print(f"  what off adds to a call (its hook's `is None` test, in-process): {added_us:.3f} us")
    print(
        "  client library, per call: "
        f"{client_us['absent']:.3f} us without OpenTelemetry, "
        f"{client_us['no span']:.3f} us with it and no current span, "
        f"{client_us['span']:.3f} us with a span (traceparent injected)"
    )
    traced_calls = sum(r.calls for r in rounds[ON])
    sampled_calls = sum(r.calls for r in rounds[SAMPLED])
    print(
        f"  server spans exported: {spans[ON]} by `on` ({traced_calls} measured calls), "
        f"{spans[SAMPLED]} by `on, 1 in 10` ({sampled_calls} measured calls)"
    )
    limit = min(NOTHING_SHARE * base, noise) if noise > 0 else NOTHING_SHARE * base
    targets = [
        (
            "tracing off costs nothing measurable",
            added_us < limit,
            f"off adds {added_us:.3f} us/call: < {NOTHING_SHARE:.0%} of a call "
            f"({NOTHING_SHARE * base:.1f} us) and < the noise between identical servers "
            f"({noise:.1f} us)",
        ),
        (
            "tracing on exports a span per call",
            spans[ON] >= traced_calls,
            f"{spans[ON]} server spans >= {traced_calls} measured calls",
        ),
        (
            "every call answered OK",
            not any(bad.values()),
            ", ".join(f"{n}: {b}" for n, b in bad.items() if b) or "all OK",
        ),
    ]
    print(
        f"  tracing on costs {cpu[ON] - base:+.1f} us/call ({(cpu[ON] - base) / base:+.1%}) "
        "of server CPU"
    )
    for name, ok, why in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {why}")
    failed = any(not ok for _, ok, _ in targets)
    return 1 if failed and args.strict else 0


def _delta(value: float, base: float) -> str:
    return f"{value - base:+.1f} ({(value - base) / base:+.1%})"


def _per_call_us(statement: str, namespace: dict, number: int = 2_000_000) -> float:
    """The least of 5 timings, less the loop's own cost, in microseconds per run."""
    empty = min(timeit.repeat("pass", number=number, repeat=5))
    taken = min(timeit.repeat(statement, number=number, repeat=5, globals=namespace))
    return max(0.0, taken - empty) / number * 1e6


def _off_hook_us() -> float:
    """The unit of work's hook with tracing off: `if _observer is None`, as it runs."""
    assert unit_of_work._observer is None
    return _per_call_us("_observer is None", vars(unit_of_work))


def _client_us() -> dict[str, float]:
    """tracecontext.call_metadata, the client library's only cost, in its three states."""
    from opentelemetry import context, trace

    namespace = {"call": tracecontext.call_metadata}
    figures = {}
    installed = tracecontext._INSTALLED
    try:
        tracecontext._INSTALLED = False
        figures["absent"] = _per_call_us("call(None)", namespace, 500_000)
    finally:
        tracecontext._INSTALLED = installed
    figures["no span"] = _per_call_us("call(None)", namespace, 200_000)
    span = trace.NonRecordingSpan(
        trace.SpanContext(1, 1, is_remote=False, trace_flags=trace.TraceFlags.SAMPLED)
    )
    token = context.attach(trace.set_span_in_context(span))
    try:
        figures["span"] = _per_call_us("call(None)", namespace, 50_000)
    finally:
        context.detach(token)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
