"""Rules end to end: MQTT publishes land where the rules say, and rules change live.

A rules edit while a client publishes must take effect without dropping the
connection or a message, and with a clean cut-over (every record before the
swap on the old topic, every one after on the new).  A broken edit is refused
and the rules in force keep routing.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import Broker, running, wait_until

pytestmark = pytest.mark.integration

RULES = """\
rules:
  - name: e2e
    match: "e2e/{{run}}/{{device}}/#"
    kafka:
      topic: "e2e.{{run}}.{version}"
      key: "{{device}}"
      headers: {{client: "{{client_id}}", mqtt-topic: "{{topic}}", prop: "{{user_property.p}}"}}
"""
BROKEN = RULES.replace('"{{device}}"', '"{{devise}}"')


def write_atomically(path: Path, text: str) -> None:
    # What editors and Kubernetes do; a half-written file is refused anyway.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def connect(port: int, client_id: str) -> tuple[paho.Client, list[Any]]:
    disconnects: list[Any] = []
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.on_disconnect = lambda *args: disconnects.append(args)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, disconnects


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def gateway(gateway_factory: Any, rules_dir: Path) -> Any:
    (rules_dir / "05-e2e.yaml").write_text(RULES.format(version="v1"))
    proc, ports = gateway_factory()
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield proc, ports["mqtt"], rules_dir


def test_publish_lands_on_templated_topic_key_and_headers(gateway: Any, broker: Broker) -> None:
    _, port, _ = gateway
    run = uuid.uuid4().hex[:8]
    client, _ = connect(port, f"c-{run}")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("p", "42")
    try:
        info = client.publish(f"e2e/{run}/dev-1/temp", b"21.5", qos=1, properties=props)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    [record] = broker.read(f"e2e.{run}.v1", 1)
    assert (record.key(), record.value()) == (b"dev-1", b"21.5")
    assert dict(record.headers()) == {
        "client": f"c-{run}".encode(),
        "mqtt-topic": f"e2e/{run}/dev-1/temp".encode(),
        "prop": b"42",
    }


def test_live_edit_and_broken_edit(gateway: Any, broker: Broker) -> None:
    proc, port, rules_dir = gateway
    run = uuid.uuid4().hex[:8]
    client, disconnects = connect(port, f"pub-{run}")
    sent: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            client.publish(f"e2e/{run}/dev/x", str(seq).encode(), qos=1).wait_for_publish(10)
            sent.append(seq)
            seq += 1
            time.sleep(0.005)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_for(lambda: len(sent) > 50)
        write_atomically(rules_dir / "05-e2e.yaml", RULES.format(version="v2"))
        wait_for(lambda: broker.read(f"e2e.{run}.v2", 1, timeout=2))
        write_atomically(rules_dir / "05-e2e.yaml", BROKEN.format(version="v3"))
        wait_for(lambda: "rules_reload_failed" in proc.log_text())
        after_broken = len(sent)
        wait_for(lambda: len(sent) > after_broken + 50)
    finally:
        stop.set()
        publisher.join(30)
        dropped = list(disconnects)  # before our own, normal disconnect
        client.disconnect()
        client.loop_stop()

    assert "05-e2e.yaml:6: e2e: kafka.key: unknown variable {devise}" in proc.log_text()

    def landed() -> tuple[list[int], list[int]]:
        return ([int(m.value()) for m in broker.read_all(f"e2e.{run}.v1")],
                [int(m.value()) for m in broker.read_all(f"e2e.{run}.v2")])

    # Acks may come from the spool a moment before Kafka has the record.
    def all_landed() -> tuple[list[int], list[int]] | None:
        v1, v2 = landed()
        return (v1, v2) if len(v1) + len(v2) >= len(sent) else None

    v1, v2 = wait_until(all_landed, 30, what="every acked publish in Kafka")
    assert dropped == [], "a rules reload must not drop a connection"
    assert sorted(v1 + v2) == sent, "every acknowledged publish lands exactly once"
    assert v1 and v2 and max(v1) < min(v2), "clean cut-over in publish order"
    assert max(v2) >= after_broken, "the old rules kept routing after the broken edit"
