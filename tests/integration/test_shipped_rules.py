"""The sample rules in bridge-rules/ behave as their comments and the README say."""

from __future__ import annotations

import json
import time

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import Broker, wait_until

pytestmark = pytest.mark.integration


def mqtt5_publish(port: int, topic: str, payload: bytes, props: Properties | None = None) -> int:
    """Publish QoS 1 over MQTT 5; return the PUBACK reason code (or -1 if closed)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="shipped-rules",
                         protocol=mqtt.MQTTv5)
    codes: list[int] = []
    client.on_publish = lambda _c, _u, _mid, rc, _p: codes.append(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, payload, qos=1, properties=props).wait_for_publish(15)
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return codes[0] if codes else -1


async def test_sample_rules_end_to_end(gateway_factory, broker: Broker) -> None:
    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['http']}"
    async with aiohttp.ClientSession() as http:
        # REST Proxy v2 clients: the rest-proxy rule sends records to the named topic
        # when it is on the rule's allow-list (clicks.*), and refuses any other.
        async with http.post(f"{base}/topics/clicks.rest-sample",
                             data=json.dumps({"records": [{"value": {"n": 1}}]}),
                             headers={"Content-Type": "application/vnd.kafka.json.v2+json"}) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{base}/topics/rest-sample",
                             data=json.dumps({"records": [{"value": {"n": 1}}]}),
                             headers={"Content-Type": "application/vnd.kafka.json.v2+json"}) as r:
            assert r.status == 403, await r.text()
        # Mobile events over HTTP, keyed by the user id inside the JSON payload.
        async with http.post(f"{base}/v1/publish/app/shop/events/click",
                             data=b'{"user": {"id": "u-7"}}',
                             headers={"X-Client-Id": "phone-1"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
            assert answer["deliveries"][0]["topic"] == "mobile.events"
    assert [m.value() for m in broker.read("clicks.rest-sample", 1)] == [b'{"n": 1}']
    # (other tests on the session's broker post mobile events too: find this one's)
    mobile = [(m.key(), dict(m.headers())["event"]) for m in broker.read_all("mobile.events")]
    assert (b"u-7", b"click") in mobile

    # Devices may not post app events over MQTT: MQTT 5 sees the reject reason code.
    assert mqtt5_publish(ports["mqtt"], "app/shop/events/click", b"{}") == 0x83
    # Debug chatter is accepted and dropped.
    assert mqtt5_publish(ports["mqtt"], "debug/fw/trace", b"noise") == 0
    # Energy alarms: allowed only for plant-* users; anonymous devices get 0x87.
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("severity", "high")
    assert mqtt5_publish(ports["mqtt"], "energy/p1/inv-2/alarm/overheat", b"!", props) == 0x87
    # Unmatched topics go to the dead-letter topic with the reason.
    assert mqtt5_publish(ports["mqtt"], "nobody/routes/this", b"lost?") == 0

    def dead_letters() -> list:
        return [m for m in broker.read_all("lastmile.dead-letter")
                if dict(m.headers()).get("lastmile-topic") == b"nobody/routes/this"]

    dead = wait_until(dead_letters, 30, what="the dead letter")
    assert len(dead) == 1 and dict(dead[0].headers())["lastmile-reason"] == b"no_matching_rule"
