"""The hostile-neighbour benchmark runs end to end at a tiny size (no speed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_neighbours
from benchmarks.servers import mosquitto_bin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_bin() is None, reason="mosquitto binary not installed"),
]


def test_every_case_reported(tmp_path: Path) -> None:
    out = tmp_path / "neighbours.json"
    rc = bench_neighbours.main([
        "--quick", "--duration", "2", "--rate", "200", "--connections", "4",
        "--churn-cycles", "30", "--slow-heads", "10", "--head-timeout", "2",
        "--json", str(out), "--no-docs"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["lastmile"]) == set(bench_neighbours.LASTMILE_CASES)
    assert set(data["mosquitto"]) == set(bench_neighbours.MOSQUITTO_CASES)
    runs = [*data["lastmile"].items(), *(("mosquitto " + k, v)
                                          for k, v in data["mosquitto"].items())]
    for case, r in runs:
        assert "error" not in r, (case, r)
        assert r["server_alive_after"], case
        assert r["good"]["sent"] > 0 and r["good"]["acked"] is not None, (case, r["good"])
        assert isinstance(r["rss_growth_mb"], float), case
        if not case.endswith("quiet") and not case.endswith("quiet_after"):
            assert "error" not in r["neighbour"], (case, r["neighbour"])
    assert data["lastmile"]["session_churn"]["neighbour"]["started"] == 30
    assert data["lastmile"]["slow_heads"]["neighbour"]["opened"] == 10
    assert set(data["targets"]) == set(bench_neighbours.LASTMILE_CASES[1:-1])
