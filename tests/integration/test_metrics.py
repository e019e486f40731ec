"""The metrics listener shows what an operator watches: traffic, Kafka, rules, health."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gateway.protocols.mqtt import packets as p
from tests.helpers import Broker, child_pids, log_events, one_per_worker, wait_until
from tests.integration.test_mqtt_e2e import RawClient

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def metrics_when(base: str, name: str, at_least: float) -> str | None:
    """The /metrics text once ``name`` has reached ``at_least`` (else None)."""
    _, text = get(f"{base}/metrics")
    try:
        return text if sample(text, name) >= at_least else None
    except AssertionError:  # not exported yet
        return None


def test_metrics_health_and_readiness(gateway_factory, broker: Broker) -> None:
    import paho.mqtt.client as mqtt

    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['metrics']}"
    assert get(f"{base}/healthz")[0] == 200
    # Ready once every stage is up (shortly after the listeners open).
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 30, what="/readyz 200")
    assert json.loads(get(f"{base}/readyz")[1])["ready"] is True

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="metrics-1")
    client.connect("127.0.0.1", ports["mqtt"])
    client.loop_start()
    for i in range(5):
        client.publish("bench/metrics-1/x", str(i), qos=1).wait_for_publish(10)
    client.publish("metrics/unrouted", b"?", qos=1).wait_for_publish(10)  # dead-lettered
    # The pump copies counters once a second: wait for the copy, not for a second.
    text = wait_until(lambda: metrics_when(base, "lastmile_messages_received_total", 6),
                      30, what="the counters in /metrics")
    assert sample(text, "lastmile_messages_received_total") >= 5
    assert sample(text, 'lastmile_records_total{cluster="default",result="delivered"}') >= 5
    assert sample(text, "lastmile_mqtt_connections") == 1
    assert sample(text, 'lastmile_messages_total{outcome="routed"}') >= 5
    assert sample(text, 'lastmile_refused_total{reason="no_matching_rule"}') >= 1
    assert 'lastmile_rules_info{version="' in text
    client.disconnect()
    client.loop_stop()


def test_metrics_are_summed_over_workers(gateway_factory, broker: Broker) -> None:
    """With two workers any worker's /metrics shows the sum: 3 messages through one
    worker and 4 through the other read 7, whichever worker answers."""
    gw, ports = gateway_factory(workers=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    wait_until(lambda: len(log_events(gw.log_text(), "gateway_started")) == 2, 60,
               what="both workers started")
    workers = child_pids(gw.proc.pid)
    by_worker = one_per_worker(lambda n: RawClient(ports["mqtt"], f"sum-{n}"), workers)
    for count, raw in zip((3, 4), by_worker.values(), strict=True):
        for i in range(count):
            raw.send(p.Publish(topic="bench/sum/x", payload=b"%d" % i, qos=1, packet_id=i + 1))
            assert raw.recv(30) == p.Puback(packet_id=i + 1)
    base = f"http://127.0.0.1:{ports['metrics']}"

    def summed() -> bool:
        _, text = get(f"{base}/metrics")
        try:
            return (sample(text, "lastmile_messages_received_total") == 7
                    and sample(text, "lastmile_mqtt_connections") == 2)
        except AssertionError:
            return False

    wait_until(summed, 30, what="/metrics to show the sum over both workers")
    for _ in range(3):  # the supervisor answers: the same sum every time
        assert summed()
    for raw in by_worker.values():
        raw.close()
