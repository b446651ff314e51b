"""python -m bench {run,bulk,scale,compare,profile,micro,icount,tracing,feed,handoff}:
`make bench*`."""

from __future__ import annotations

import argparse
import sys

from bench import bulk, compare, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run.add_arguments(commands.add_parser("run", help="the server against the grpcio ceiling"))
    bulk.add_arguments(
        commands.add_parser("bulk", help="CSV import rate, single calls during batches")
    )
    scale_parser = commands.add_parser("scale", help="latency at 10,000 vs 1,000,000 rows")
    from bench import scale

    scale.add_arguments(scale_parser)
    from bench import feed, handoff, icount, micro, profile

    feed.add_arguments(
        commands.add_parser("feed", help="change-feed delivery latency and the outbox's cost")
    )

    micro.add_arguments(commands.add_parser("micro", help="servicer CPU per call, in-process"))
    handoff.add_arguments(
        commands.add_parser("handoff", help="a PostgreSQL read in a pool thread vs on the loop")
    )
    icount.add_arguments(
        commands.add_parser("icount", help="servicer instructions per call, in-process")
    )

    profile.add_arguments(commands.add_parser("profile", help="py-spy the server under a mix"))
    from bench import tracing

    tracing.add_arguments(commands.add_parser("tracing", help="server CPU, tracing off vs on"))
    pair = commands.add_parser("compare", help="two result files side by side")
    pair.add_argument("a")
    pair.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run.main(args)
    if args.command == "bulk":
        return bulk.main(args)
    if args.command == "scale":
        return scale.main(args)
    if args.command == "profile":
        return profile.main(args)
    if args.command == "micro":
        return micro.main(args)
    if args.command == "icount":
        return icount.main(args)
    if args.command == "tracing":
        return tracing.main(args)
    if args.command == "feed":
        return feed.main(args)
    if args.command == "handoff":
        return handoff.main(args)
    print(compare.compare(args.a, args.b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
