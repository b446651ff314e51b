"""The soak's verdict: growth that levels off passes, growth that goes on fails."""

from __future__ import annotations

from bench.soak import verdict


def samples(rss, fds, threads):
    return [
        {"rss_mib": r, "fds": f, "threads": t} for r, f, t in zip(rss, fds, threads, strict=True)
    ]


def test_growth_that_levels_off_passes():
    ok, problems = verdict(
        samples([60, 80, 95, 96, 96, 97, 97], [12, 20, 21, 21, 20, 21, 21], [12, 13, 13] + [13] * 4)
    )
    assert ok, problems


def test_growth_that_goes_on_fails():
    ok, problems = verdict(samples([60, 70, 80, 90, 100, 110, 120], [12] * 7, [12] * 7))
    assert not ok and "rss_mib" in problems[0]
    ok, problems = verdict(samples([60] * 7, [12, 14, 16, 18, 20, 22, 24], [12] * 7))
    assert not ok and "fds" in problems[0]
    ok, problems = verdict(samples([60] * 7, [12] * 7, [12, 13, 14, 15, 16, 17, 18]))
    assert not ok and "threads" in problems[0]


def test_too_short_a_run_cannot_pass():
    ok, problems = verdict(samples([60, 61], [12, 12], [12, 12]))
    assert not ok and "too few" in problems[0]
