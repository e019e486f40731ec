"""benchmarks/bench_fanout.py --quick runs end to end (Kafka -> Lastmile -> 500
subscribers, Mosquitto, Kafka's floor) and writes numbers; no speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_fanout
from benchmarks.servers import lastmile_available, mosquitto_bin

pytestmark = pytest.mark.integration


@pytest.mark.skipif(mosquitto_bin() is None, reason="mosquitto binary not installed")
@pytest.mark.skipif(lastmile_available() is not None, reason="lastmile not runnable")
def test_fanout_quick_produces_numbers(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    assert bench_fanout.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for server in ("lastmile", "mosquitto"):
        r = res[server]
        assert r["connected"] == 500
        assert r["unicast"]["received"] == r["unicast"]["sent"] > 0
        assert r["broadcast"]["received"] == r["broadcast"]["expected"] == 2500
        assert r["unicast"]["latency_ms"]["p99"] is not None
        assert r["broadcast"]["deliveries_per_s"] is not None
        assert r["foreign"] == 0
    assert res["lastmile"]["kafka_floor_latency_ms"]["count"] > 0
    assert {"latency_met", "throughput_met"} <= set(res["targets"])
