"""The Kafka checker's loss / duplicate / order accounting, on synthetic records."""

from __future__ import annotations

import pytest

from benchmarks.kafka_check import analyze
from benchmarks.mqttwire import make_payload
from benchmarks.stats import percentile, summarize

pytestmark = pytest.mark.unit

RUN = 7


def rec(client: int, seq: int, part: int = 0, run: int = RUN, send_ms: float = 1000.0,
        ts_ms: float = 1002.0) -> tuple[int, bytes, float]:
    return part, make_payload(run, client, seq, int(send_ms * 1e6), 100), ts_ms


def test_clean_run() -> None:
    clients = {"0": [3, []], "1": [2, []]}
    records = [rec(0, 0), rec(1, 0, 1), rec(0, 1), rec(1, 1, 1), rec(0, 2)]
    r = analyze(records, RUN, clients)
    assert r["expected"] == 5 and r["unique"] == 5
    assert r["missing"] == r["lost_acked"] == r["duplicates"] == r["order_violations"] == 0
    assert r["e2e_latency_ms"]["p50"] == 2.0


def test_missing_split_into_acked_and_unacked() -> None:
    # client 0 sent 5; seqs 3 and 4 never got a PUBACK; 1 and 4 are not in Kafka.
    clients = {"0": [5, [3, 4]]}
    r = analyze([rec(0, 0), rec(0, 2), rec(0, 3)], RUN, clients)
    assert r["missing"] == 2
    assert r["lost_acked"] == 1  # seq 1 was acknowledged and is gone


def test_whole_client_missing_counts_all_acked() -> None:
    r = analyze([], RUN, {"4": [10, [9]]})
    assert r["missing"] == 10 and r["lost_acked"] == 9


def test_duplicates_are_not_order_violations() -> None:
    clients = {"0": [3, []]}
    r = analyze([rec(0, 0), rec(0, 1), rec(0, 1), rec(0, 0), rec(0, 2)], RUN, clients)
    assert r["duplicates"] == 2 and r["order_violations"] == 0 and r["unique"] == 3


def test_order_violation_counted_once_per_late_record() -> None:
    clients = {"0": [4, []], "1": [2, []]}
    records = [rec(0, 0), rec(0, 2), rec(0, 1), rec(0, 3), rec(1, 1, 2), rec(1, 0, 2)]
    r = analyze(records, RUN, clients)
    assert r["order_violations"] == 2 and r["missing"] == 0


def test_foreign_other_run_and_unexpected_records() -> None:
    clients = {"0": [1, []]}
    records = [
        (0, b"hello", 1.0),
        (0, None, 1.0),
        rec(0, 0, run=RUN + 1),
        rec(0, 5),  # beyond what was sent
        rec(9, 0),  # unknown client
        rec(0, 0),
    ]
    r = analyze(records, RUN, clients)
    assert r["records_read"] == 6 and r["foreign_records"] == 2 and r["other_run_records"] == 1
    assert r["unexpected"] == 2 and r["unique"] == 1 and r["run_records"] == 3


def test_client_on_several_partitions_is_reported() -> None:
    r = analyze([rec(0, 0, 0), rec(0, 1, 3)], RUN, {"0": [2, []]})
    assert r["clients_on_several_partitions"] == 1


def test_percentiles_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile([], 50) is None
    s = summarize([3000, 1000, 2000], scale=0.001)
    assert s["count"] == 3 and s["p50"] == 2.0 and s["max"] == 3.0
