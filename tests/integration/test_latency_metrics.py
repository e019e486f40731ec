"""The latency histograms in /metrics after real traffic (issue 15).

``lastmile_ack_latency_seconds{listener}``: receive -> ack, per listener (MQTT over
TCP and WebSocket, HTTP); ``lastmile_kafka_delivery_latency_seconds{cluster}``:
produce -> delivery report.  Observations, not speeds, are asserted.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.helpers import Broker, wait_until
from tests.integration.test_metrics import get

pytestmark = pytest.mark.integration


def histogram(text: str, name: str, label: str) -> dict[str, float]:
    """Buckets (by ``le``), ``count`` and ``sum`` of one labelled histogram series."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{name}_(bucket|count|sum)\{{(.*)\}} (\S+)$', line)
        if m is None or f'{label}' not in m.group(2).split(","):
            continue
        le = re.search(r'le="([^"]+)"', m.group(2))
        out[le.group(1) if le else m.group(1)] = float(m.group(3))
    return out


def test_ack_and_delivery_latency_histograms(gateway_factory, broker: Broker) -> None:
    import paho.mqtt.client as mqtt

    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['metrics']}"

    tcp = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lat-tcp")
    tcp.connect("127.0.0.1", ports["mqtt"])
    tcp.loop_start()
    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lat-ws",
                     transport="websockets")
    ws.ws_set_options(path="/mqtt")
    ws.connect("127.0.0.1", ports["http"])
    ws.loop_start()
    try:
        for i in range(5):
            tcp.publish("bench/lat-tcp/x", str(i), qos=1).wait_for_publish(10)
        for i in range(3):
            ws.publish("bench/lat-ws/x", str(i), qos=1).wait_for_publish(10)
        tcp.publish("bench/lat-tcp/q0", b"no ack", qos=0).wait_for_publish(10)
        for i in range(2):
            req = urllib.request.Request(
                f"http://127.0.0.1:{ports['http']}/v1/publish/bench/lat-http/x",
                data=str(i).encode(), method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200

        def scraped() -> str | None:
            _, text = get(f"{base}/metrics")
            mq = histogram(text, "lastmile_ack_latency_seconds", 'listener="mqtt"')
            http = histogram(text, "lastmile_ack_latency_seconds", 'listener="http"')
            kafka = histogram(text, "lastmile_kafka_delivery_latency_seconds",
                              'cluster="default"')
            done = (mq.get("count", 0) >= 5 and http.get("count", 0) >= 2
                    and kafka.get("count", 0) >= 11)
            return text if done else None

        # The pump copies once a second: wait for the copy, not for a second.
        text = wait_until(scraped, 30, what="latency observations in /metrics")
    finally:
        for client in (tcp, ws):
            client.disconnect()
            client.loop_stop()

    mq = histogram(text, "lastmile_ack_latency_seconds", 'listener="mqtt"')
    assert mq["count"] == 5  # the QoS 0 message has no ack: not observed
    assert mq["+Inf"] == mq["count"] and mq["sum"] > 0
    buckets = [v for k, v in mq.items() if k not in ("count", "sum")]
    assert buckets == sorted(buckets)  # cumulative, Prometheus style
    assert histogram(text, "lastmile_ack_latency_seconds", 'listener="ws"')["count"] == 3
    assert histogram(text, "lastmile_ack_latency_seconds", 'listener="http"')["count"] == 2
    kafka = histogram(text, "lastmile_kafka_delivery_latency_seconds", 'cluster="default"')
    # Every record went to Kafka (QoS 0 too): 5 + 3 + 1 + 2 (a spilled one may count twice).
    assert kafka["count"] >= 11 and kafka["sum"] > 0
    assert "# TYPE lastmile_ack_latency_seconds histogram" in text
