"""Latency histograms kept as plain integers on hot objects.

The hot path calls ``observe(seconds)``: one ``bisect`` and two additions, no
lock and no prometheus-client call.  The metrics pump copies the counts into a
prometheus-client ``Histogram`` once a second as deltas (``metrics.Pump``), the
same way it copies counters, so multiprocess mode sums the workers as usual.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (seconds, "le") shared by the ack and delivery histograms: fine below
# 10 ms where the floors are (fdatasync ~0.2 ms, Kafka ~5 ms), coarse above.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015,
                              0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latency:
    """Observation counts per bucket of ``BUCKETS`` (the last slot: above them all)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0  # sum of observed seconds

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
