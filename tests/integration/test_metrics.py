"""The metrics listener shows what an operator watches: traffic, Kafka, rules, health."""

from __future__ import annotations

import time
import urllib.request

import pytest

from tests.helpers import Broker

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


def test_metrics_health_and_readiness(gateway_factory, broker: Broker) -> None:
    import paho.mqtt.client as mqtt

    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['metrics']}"
    assert get(f"{base}/healthz")[0] == 200
    status, body = get(f"{base}/readyz")
    assert status == 200 and '"ready": true' in body

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="metrics-1")
    client.connect("127.0.0.1", ports["mqtt"])
    client.loop_start()
    for i in range(5):
        client.publish("bench/metrics-1/x", str(i), qos=1).wait_for_publish(10)
    client.publish("metrics/unrouted", b"?", qos=1).wait_for_publish(10)  # dead-lettered
    time.sleep(1.5)  # the pump copies counters once a second
    _, text = get(f"{base}/metrics")
    assert sample(text, 'lastmile_pipeline_total{event="messages"}') >= 5
    assert sample(text, 'lastmile_records_total{cluster="default",result="delivered"}') >= 5
    assert sample(text, "lastmile_mqtt_connections") == 1
    assert sample(text, 'lastmile_pipeline_total{event="routed"}') >= 5
    assert sample(text, 'lastmile_refused_total{reason="no_matching_rule"}') >= 1
    _, ready = get(f"{base}/readyz")
    assert '"no_matching_rule": 1' in ready
    assert "lastmile_rules_info{version=" in text
    client.disconnect()
    client.loop_stop()
