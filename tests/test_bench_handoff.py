"""`make bench-handoff` (bench/handoff.py) on the tests' PostgreSQL server: both ways of
reading answer every read with its own row, and the database it made is gone after."""

from __future__ import annotations

import argparse
import re

import pytest

from bench import handoff
from tests import databases


@pytest.mark.databases("postgresql")
def test_both_ways_read_their_rows_and_the_database_goes(backend, capsys):
    assert handoff.main(argparse.Namespace(reads=640, rounds=1)) == 0
    out = capsys.readouterr().out
    for mode in ("pool", "loop"):
        # Each mode's round and its median: reads/s, CPU and switches a read.
        line = rf"^ .*{mode} +[\d,]+ reads/s  CPU +[\d.]+ us a read  switches "
        found = re.findall(line, out, re.M)
        assert len(found) == 2, out
    assert re.search(r"^the loop's own read costs -?[\d.]+ us less CPU", out, re.M), out
    with databases.connection(databases.admin_url("postgresql")) as db:
        left = databases.sql(
            db,
            "SELECT datname FROM pg_database WHERE datname LIKE ?",
            ("enrollment_bench_handoff%",),
        )
    assert left == []
