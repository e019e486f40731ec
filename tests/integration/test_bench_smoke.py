"""The load generator runs end to end against a real Mosquitto on a free port."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import loadgen
from benchmarks.servers import Mosquitto, mosquitto_bin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_bin() is None, reason="mosquitto binary not installed"),
]


@pytest.fixture
def mosquitto(tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Mosquitto(tmp_path)
    m.start()
    yield m
    m.stop()


@pytest.mark.parametrize("qos, version", [(1, 4), (0, 5)])
def test_publish_two_seconds(mosquitto: Mosquitto, tmp_path: Path, qos: int,
                             version: int) -> None:
    clients = tmp_path / "clients.json"
    s = loadgen.Settings(mode="publish", port=mosquitto.port, connections=8, procs=2, qos=qos,
                         version=version, duration=2.0, rate=2000)
    res = loadgen.run(s, str(clients))
    assert res["error_count"] == 0, res["errors"]
    assert res["connect"]["connected"] == 8
    assert res["sent"] > 0
    if qos:
        assert res["acked"] == res["sent"] and res["puback_latency_ms"]["count"] == res["sent"]
    assert clients.exists()


def test_connect_and_hold(mosquitto: Mosquitto) -> None:
    s = loadgen.Settings(mode="connect", port=mosquitto.port, connections=200, procs=2,
                         source_ips=2, hold=1.0)
    res = loadgen.run(s)
    assert res["error_count"] == 0, res["errors"]
    assert res["connect"]["connected"] == 200 and res["held_at_end"] == 200
    assert res["lost_during_hold"] == 0
