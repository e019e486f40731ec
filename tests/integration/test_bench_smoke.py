"""The load generator runs end to end against a real Mosquitto on a free port; the
Kafka intake floor runs against a real tansu (no speed assertions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import loadgen
from benchmarks.run import Scenario, kafka_intake, run_loadgen
from benchmarks.servers import Mosquitto, Tansu, mosquitto_bin

pytestmark = pytest.mark.integration
needs_mosquitto = pytest.mark.skipif(mosquitto_bin() is None,
                                     reason="mosquitto binary not installed")


@pytest.fixture
def mosquitto(tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Mosquitto(tmp_path)
    m.start()
    yield m
    m.stop()


@needs_mosquitto
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


@needs_mosquitto
def test_connect_and_hold(mosquitto: Mosquitto) -> None:
    s = loadgen.Settings(mode="connect", port=mosquitto.port, connections=200, procs=2,
                         source_ips=2, hold=1.0)
    res = loadgen.run(s)
    assert res["error_count"] == 0, res["errors"]
    assert res["connect"]["connected"] == 200 and res["held_at_end"] == 200
    assert res["lost_during_hold"] == 0


@needs_mosquitto
def test_runner_splits_the_cpu_of_server_load_generator_and_others(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The load generator's CPU counts its workers, which it has joined (reaped) by the
    time it reports; a pid given as another process is sampled over the same window."""
    sc = Scenario("qos1_max", "publish", {"connections": 8, "procs": 2, "qos": 1,
                                          "duration": 2.0, "rate": 2000, "payload-size": 100})
    res = run_loadgen(sc, mosquitto, 7, None, log=lambda _: None,
                      others={"also_mosquitto": mosquitto.pid})
    assert res["error_count"] == 0, res["errors"]
    cpu = res["cpu_cores"]
    assert set(cpu) == {"server", "loadgen", "also_mosquitto", "box", "other", "wall_s"}
    assert cpu["wall_s"] >= 2.0
    # 4,000 QoS 1 messages sent and acked by two worker processes: not nothing.
    assert cpu["loadgen"] * cpu["wall_s"] >= 0.05
    assert cpu["also_mosquitto"] == cpu["server"]
    assert cpu["box"] >= cpu["loadgen"]


def test_kafka_intake_floor_against_tansu(tmp_path: Path) -> None:
    t = Tansu(tmp_path)
    t.start()
    try:
        res = kafka_intake(t, 1.5, burn=0.3, log=lambda _: None)
    finally:
        t.stop()
    assert "error" not in res, res
    assert res["failed"] == 0 and 0 < res["delivered"] <= res["produced"]
    assert res["delivered_per_s"] > 0
    # The gateway's producer settings, not a hand-copied subset.
    assert res["settings"]["acks"] == "all" and res["settings"]["enable.idempotence"] is True
    assert res["settings"]["linger.ms"] == 5 and res["settings"]["compression.type"] == "lz4"
    cpu = res["cpu_cores"]
    assert {"producer", "tansu", "burn", "box", "other", "wall_s"} <= set(cpu)
    assert cpu["producer"] > 0 and cpu["burn"] > 0
