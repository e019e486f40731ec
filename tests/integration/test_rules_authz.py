"""Authorization by the rules against the real ``lastmile serve`` and broker.

The gateway runs the shipped rules (bridge-rules/) plus one test rule: the
REST Proxy allow-list, reserved headers over HTTP, and authorization refusals
over MQTT 3.1.1 / 5.0 with the log and the metrics an operator reads.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest

from tests.helpers import (
    ROOT,
    Broker,
    GatewayProcess,
    log_events,
    running,
    wait_until,
    write_config,
)
from tests.integration.test_shipped_rules import mqtt5_publish

pytestmark = pytest.mark.integration

JSON_V2 = "application/vnd.kafka.json.v2+json"
# A topic the test reads is unique per run: the broker is shared by the session.
TEST_RULES = """
rules:
  - name: authz-in
    match: {topic: "authz/{tenant}/#", source: http}
    kafka: {topic: "t.authz.{tenant}", headers: {tenant: "{tenant}"}}
"""


class Gw:
    def __init__(self, proc: GatewayProcess, ports: dict[str, int]) -> None:
        self.proc = proc
        self.ports = ports
        self.url = f"http://127.0.0.1:{ports['http']}"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("rules-authz")
    rules = tmp / "rules"
    rules.mkdir()
    for src in sorted((ROOT / "bridge-rules").glob("*.yaml")):
        (rules / src.name).write_text(src.read_text())
    (rules / "60-authz-test.yaml").write_text(TEST_RULES)
    config = tmp / "gateway.yaml"
    ports = write_config(config, bootstrap=broker.bootstrap, rules_dir=rules,
                         spool_dir=tmp / "spool", spool__enabled=False, rules__watch=False)
    proc = GatewayProcess(config, tmp / "gateway.log")
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield Gw(proc, ports)


def marker() -> str:
    return uuid.uuid4().hex[:10]


async def post(url: str, body: object, content_type: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=json.dumps(body), headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_rest_proxy_refuses_topics_not_on_the_allow_list(gw: Gw, broker: Broker) -> None:
    mark = marker()
    body = {"records": [{"value": {"forged": mark}}]}
    for topic in ("lastmile.dead-letter", "_schemas", "other-app.payments"):
        status, answer = await post(f"{gw.url}/topics/{topic}", body, JSON_V2)
        assert status == 403, (topic, answer)
        assert answer["error"] == "not_authorized" and answer["error_code"] == 40301
        assert answer["message"] == "topic not in the REST Proxy allow-list"
    # A listed topic (clicks.* in the shipped rule) is produced as before.
    listed = f"clicks.{mark}"
    status, answer = await post(f"{gw.url}/topics/{listed}",
                                {"records": [{"value": {"ok": mark}}]}, JSON_V2)
    assert status == 200, answer
    assert [m.value() for m in broker.read(listed, 1)] == [json.dumps({"ok": mark}).encode()]
    # Refused means nowhere in Kafka: not in the named topics, not dead-lettered as success.
    for topic in ("lastmile.dead-letter", "_schemas", "other-app.payments"):
        assert not [m for m in broker.read_all(topic) if mark.encode() in (m.value() or b"")]


async def test_client_headers_cannot_set_or_shadow_the_gateways(gw: Gw, broker: Broker) -> None:
    t = marker()
    broker.create_topic(f"t.authz.{t}", partitions=1)
    records = [
        {"topic": f"authz/{t}/a", "payload_text": "forged", "headers": {"lastmile-reason": "ok"}},
        {"topic": f"authz/{t}/a", "payload_text": "forged", "headers": {"Tenant": "other"}},
        # Unmatched, so it would be dead-lettered: the forged header must not get there.
        {"topic": f"nowhere/{t}", "payload_text": "forged", "headers": {"LastMile-Topic": "x"}},
        {"topic": f"authz/{t}/a", "payload_text": "clean", "headers": {"trace": "1"}},
    ]
    status, answer = await post(f"{gw.url}/v1/batch", records, "application/json")
    assert status == 207, answer
    results = answer["results"]
    assert [r["status"] for r in results] == [400, 400, 400, 200]
    assert [r.get("error") for r in results[:3]] == ["reserved_header"] * 3
    assert "'lastmile-reason'" in results[0]["message"]
    assert "'Tenant'" in results[1]["message"] and "authz-in" in results[1]["message"]
    # One forged record alone: refused the same way.
    status, answer = await post(f"{gw.url}/v1/batch", records[:1], "application/json")
    assert answer["results"][0]["status"] == 400 and answer["taken"] == 0
    [got] = broker.read(f"t.authz.{t}", 1)
    assert got.value() == b"clean"
    assert got.headers() == [("tenant", t.encode()), ("trace", b"1")]
    dead = [m for m in broker.read_all("lastmile.dead-letter")
            if dict(m.headers() or []).get("lastmile-topic") == f"nowhere/{t}".encode()]
    assert dead == []


def mqtt311_publish(port: int, client_id: str, topic: str, count: int) -> int:
    """Publish ``count`` QoS 1 messages over 3.1.1; return how many were acked."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311)
    acked: list[int] = []
    client.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for _ in range(count):
            client.publish(topic, b"!", qos=1).wait_for_publish(15)
        wait_until(lambda: len(acked) >= count, 15, what="the PUBACKs")
    finally:
        client.disconnect()
        client.loop_stop()
    return len(acked)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_mqtt_refusals_are_answered_counted_and_logged_boundedly(gw: Gw) -> None:
    # An anonymous device may not publish plant alarms (allow: plant-{plant} users only).
    topic = "energy/p1/inv-2/alarm/overheat"
    assert mqtt5_publish(gw.ports["mqtt"], topic, b"!") == 0x87
    # 3.1.1 cannot carry the code: acked (docs/mqtt.md), logged, counted.
    client_id = f"flood-{marker()}"
    assert mqtt311_publish(gw.ports["mqtt"], client_id, topic, 50) == 50
    name = 'lastmile_authorization_refused_total{rule="energy-alarms"}'
    wait_until(lambda: metric(gw.ports["metrics"], name) >= 51, 30, what="the counter")

    def lines() -> list[dict[str, Any]]:
        return [e for e in log_events(gw.proc.log_text(), "publish_not_authorized")
                if e.get("client_id") == client_id]

    [line] = wait_until(lines, 30, what="the log line")
    assert (line["topic"], line["rule"], line["source"]) == (topic, "energy-alarms", "mqtt")
    assert line["username"] is None and line["cert_identity"] is None
    # Each line is written (and flushed) before its PUBACK: all 50 are in the file by now.
    assert len(lines()) == 1  # 50 refusals, one line
    assert not [e for e in log_events(gw.proc.log_text(), "mqtt_publish_refused")
                if e.get("client_id") == client_id]

