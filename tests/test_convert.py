"""Proto conversion: the fast timestamp path equals protobuf's own FromDatetime."""

from __future__ import annotations

import datetime as dt
import random

from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.server.transport.convert import timestamp


def test_timestamp_matches_from_datetime():
    rng = random.Random(5)
    span = int((dt.datetime(9999, 12, 31) - dt.datetime(1, 1, 1)).total_seconds() * 1e6)
    edges = [dt.datetime(1970, 1, 1), dt.datetime(1969, 12, 31, 23, 59, 59, 999999)]
    values = edges + [
        dt.datetime(1, 1, 1) + dt.timedelta(microseconds=rng.randrange(span)) for _ in range(2000)
    ]
    for value in values:
        expected = Timestamp()
        expected.FromDatetime(value.replace(tzinfo=dt.UTC))
        assert timestamp(value) == expected, value
