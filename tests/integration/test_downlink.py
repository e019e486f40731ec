"""Kafka -> `lastmile serve` -> real MQTT subscribers (issue #17, docs/downlink.md).

Each test writes its own downlink rules over Kafka topics of its own, starts the
gateway as a process against the session's tansu broker, and checks what paho
subscribers (3.1.1 and 5.0) receive from records a Kafka producer writes.
"""

from __future__ import annotations

import queue
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from confluent_kafka import Producer

from tests.helpers import Broker, running

pytestmark = pytest.mark.integration

VERSIONS = [paho.MQTTv311, paho.MQTTv5]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def downlink_rules(rules_dir: Path, commands: str, config: str) -> None:
    (rules_dir / "60-downlink.yaml").write_text(f"""
downlink:
  - name: commands
    kafka: {{topic: {commands}}}
    mqtt: {{topic: "cmd/{{key}}", qos: 1}}
  - name: config
    kafka: {{topic: {config}}}
    mqtt: {{topic: "cfg/{{key}}", qos: 2, retain: true}}
""")


@pytest.fixture
def topics(broker: Broker, rules_dir: Path) -> tuple[str, str]:
    commands, config = unique("commands"), unique("device-config")
    broker.create_topic(commands, 2)
    broker.create_topic(config, 1)
    downlink_rules(rules_dir, commands, config)
    return commands, config


@pytest.fixture
def gateway(gateway_factory: Any, topics: tuple[str, str]) -> Any:
    proc, ports = gateway_factory()
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield proc, ports["mqtt"]


def produce(broker: Broker, topic: str, key: str, value: bytes | None) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, value=value, key=key.encode())
    assert producer.flush(10) == 0


class Subscriber:
    """A paho client whose messages land in a queue."""

    def __init__(self, port: int, protocol: int, client_id: str | None = None,
                 clean: bool = True) -> None:
        self.messages: queue.Queue[Any] = queue.Queue()
        self.granted: queue.Queue[list[int]] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or unique("sub"), protocol=protocol,
                                  clean_session=clean if protocol != paho.MQTTv5 else None)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _props: self.granted.put(
            [c.value for c in codes])
        props = None
        if protocol == paho.MQTTv5 and not clean:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        kwargs: dict[str, Any] = {}
        if protocol == paho.MQTTv5:
            kwargs = {"clean_start": clean, "properties": props}
        self.client.connect("127.0.0.1", port, **kwargs)
        self.client.loop_start()

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.granted.get(timeout=15)

    def next(self, timeout: float = 20) -> Any:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_command_reaches_every_matching_subscription(
        gateway: Any, broker: Broker, topics: tuple[str, str], protocol: int) -> None:
    _, port = gateway
    subs = [Subscriber(port, protocol) for _ in range(3)]
    try:
        for sub, filt, qos in zip(subs, ["cmd/dev-1", "cmd/+", "cmd/#"], [1, 0, 2], strict=True):
            assert sub.subscribe(filt, qos) == [min(qos, 1)]
        produce(broker, topics[0], "dev-1", b"reboot")
        for sub, qos in zip(subs, [1, 0, 1], strict=True):
            msg = sub.next()
            assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("cmd/dev-1", b"reboot",
                                                                     qos, False)
    finally:
        for sub in subs:
            sub.close()
