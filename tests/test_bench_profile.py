"""`make bench-profile`'s summary of the server's SQLite write groups (bench/profile.py)."""

from __future__ import annotations

from bench.profile import write_groups

NAME = "enrollment_sqlite_write_group_size"


def histogram(counts: dict[str, float], total: float) -> dict[tuple[str, tuple], float]:
    """Prometheus samples of the histogram: cumulative buckets, count and sum."""
    samples: dict[tuple[str, tuple], float] = {}
    cumulative = 0.0
    for bound, count in counts.items():
        cumulative += count
        samples[(f"{NAME}_bucket", (("le", bound),))] = cumulative
    samples[(f"{NAME}_count", ())] = cumulative
    samples[(f"{NAME}_sum", ())] = total
    return samples


def test_the_groups_are_told_by_size_with_the_pauses():
    metrics = histogram({"1.0": 2, "2.0": 0, "4.0": 5, "8.0": 2, "16.0": 1, "+Inf": 0}, 41)
    metrics[("enrollment_sqlite_write_pauses_total", ())] = 3
    assert write_groups(metrics) == (
        "write groups: 10 committed 41 writes (4.1 a group); groups by size 1: 2, 3-4: 5, "
        "5-8: 2, 9-16: 1; pauses (writes sent to the writer thread for a while) 3"
    )


def test_no_groups_are_said_to_be_none():
    assert write_groups({}).startswith("write groups: none")
