"""Real MQTT clients -> `lastmile serve` -> a real Kafka-protocol broker.

The shipped rules route ``bench/#`` to topic ``bench`` keyed by client id, and
``energy/{plant}/{unit}/alarm/#`` to ``edge.energy.alarms`` with headers.
Every test uses its own client id and reads back only its own records.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from tests.helpers import Broker, GatewayProcess, running

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(gateway_factory: Any, tmp_path: Any) -> Any:
    # Anonymous clients are let in (these tests are not about authentication); a client
    # that gives a username proves it against the password file.
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "plant-north", "north-pw"],
                   check=True)
    proc, ports = gateway_factory(auth__password_file=str(passwd))
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        yield proc, ports["mqtt"]


def cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def records_for(broker: Broker, topic: str, key: bytes, count: int, timeout: float = 30) -> list:
    """Every record of ``key`` in ``topic`` once at least ``count`` are there (read to the
    end of the topic, so an extra or a duplicate is in the result too)."""
    deadline = time.monotonic() + timeout
    mine: list[Any] = []
    while time.monotonic() < deadline:
        mine = [m for m in broker.read_all(topic) if m.key() == key]
        if len(mine) >= count:
            break
        time.sleep(0.2)
    return mine


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub(gateway: Any, broker: Broker, version: str, qos: int) -> None:
    _, port = gateway
    client = cid(f"mp-{version}-{qos}")
    payload = f"reading {qos} \u00e9".encode()
    subprocess.run(["mosquitto_pub", "-p", str(port), "-V", version, "-i", client, "-q", str(qos),
                    "-t", f"bench/{client}/temp", "-m", payload.decode()], check=True, timeout=20)
    got = records_for(broker, "bench", client.encode(), 1)
    assert [m.value() for m in got] == [payload]


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_paho_all_qos(gateway: Any, broker: Broker, protocol: int) -> None:
    _, port = gateway
    client_id = cid(f"paho{protocol}")
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        payloads = [bytes([qos]) * 10 + b"\x00\xff" for qos in range(3)]
        for qos, payload in enumerate(payloads):
            info = client.publish(f"bench/{client_id}/q{qos}", payload, qos=qos)
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    got = records_for(broker, "bench", client_id.encode(), 3)
    assert sorted(m.value() for m in got) == sorted(payloads)


def test_paho_v5_headers_from_topic_and_user_properties(gateway: Any, broker: Broker) -> None:
    _, port = gateway
    # The shipped rule lets user plant-<plant> publish under energy/<plant>/ only; the
    # unit makes this test's key unique on the shared broker.
    plant, unit = "north", cid("u7")
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid("alarm"),
                         protocol=paho.MQTTv5)
    client.username_pw_set("plant-north", "north-pw")  # proven by the password file
    client.connect("127.0.0.1", port)
    client.loop_start()
    props = PahoProperties(PacketTypes.PUBLISH)
    props.UserProperty = ("severity", "high")
    try:
        client.publish(f"energy/{plant}/{unit}/alarm/overheat", b"hot!", qos=1,
                       properties=props).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    got = records_for(broker, "edge.energy.alarms", f"{plant}.{unit}".encode(), 1)
    assert [m.value() for m in got] == [b"hot!"]
    headers = dict(got[0].headers() or [])
    assert headers["plant"] == plant.encode() and headers["unit"] == unit.encode()
    assert headers["severity"] == b"high"


async def test_aiomqtt(gateway: Any, broker: Broker) -> None:
    _, port = gateway
    client_id = cid("aiomqtt")
    async with aiomqtt.Client("127.0.0.1", port, identifier=client_id) as client:
        for qos in range(3):
            await client.publish(f"bench/{client_id}/x", f"aio {qos}".encode(), qos=qos)
    got = await asyncio.to_thread(records_for, broker, "bench", client_id.encode(), 3)
    assert sorted(m.value() for m in got) == [b"aio 0", b"aio 1", b"aio 2"]


class RawClient:
    """A hand-driven MQTT client: it retransmits when the test says so."""

    def __init__(self, port: int, client_id: str, version: int = 4) -> None:
        self.version = version
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.pending: list[p.AnyPacket] = []
        self.send(p.Connect(protocol_level=version, client_id=client_id, keep_alive=60))
        connack = self.recv(10)
        assert isinstance(connack, p.Connack) and connack.reason_code == 0

    def send(self, packet: p.AnyPacket) -> None:
        self.sock.sendall(encode(packet, self.version))

    def recv(self, timeout: float) -> p.AnyPacket | None:
        self.sock.settimeout(timeout)
        while True:
            if self.pending:
                return self.pending.pop(0)
            packets, used = decode_packets(self.buf, self.version, 1 << 20)
            if packets:
                self.buf = self.buf[used:]
                self.pending.extend(packets)
                continue
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        self.send(p.Disconnect())
        self.sock.close()


def test_qos2_retransmissions_are_produced_once(gateway: Any, broker: Broker) -> None:
    _, port = gateway
    client_id = cid("dup")
    raw = RawClient(port, client_id)
    publish = p.Publish(topic=f"bench/{client_id}/x", payload=b"exactly once", qos=2,
                        packet_id=42)
    # One write, so the retransmission is read before the first can be acked even on a
    # loaded machine (two writes could be read apart, after the PUBREC went out).
    raw.sock.sendall(encode(publish, 4) + encode(
        p.Publish(topic=publish.topic, payload=publish.payload, qos=2, packet_id=42, dup=True),
        4))  # before PUBREC
    # Each PUBLISH may get its own PUBREC (the spec allows answering every copy), or
    # the session may answer both with one; nothing else may come back.
    assert raw.recv(10) == p.Pubrec(packet_id=42)
    extra = raw.recv(1.0)
    assert extra in (None, p.Pubrec(packet_id=42))
    raw.send(p.Publish(topic=publish.topic, payload=publish.payload, qos=2, packet_id=42,
                       dup=True))  # after PUBREC: answered again, not produced again
    assert raw.recv(10) == p.Pubrec(packet_id=42)
    raw.send(p.Pubrel(packet_id=42))
    assert raw.recv(10) == p.Pubcomp(packet_id=42)
    raw.close()
    got = records_for(broker, "bench", client_id.encode(), 1)
    assert [m.value() for m in got] == [b"exactly once"]


def test_puback_only_after_kafka_has_the_record(gateway_factory: Any,
                                                 fresh_broker: Broker) -> None:
    # The spool would make a message safe without Kafka; this test is about Kafka.
    proc, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__enabled=False)
    gw: GatewayProcess = proc
    with running(gw, ("127.0.0.1", ports["mqtt"])):
        client_id = cid("order")
        raw = RawClient(ports["mqtt"], client_id)
        # Warm up: topic created, producer connected, so the pause below is the only delay.
        raw.send(p.Publish(topic=f"bench/{client_id}/warm", payload=b"warm", qos=1, packet_id=1))
        assert raw.recv(20) == p.Puback(packet_id=1)
        fresh_broker.pause()
        try:
            raw.send(p.Publish(topic=f"bench/{client_id}/x", payload=b"after", qos=1,
                               packet_id=2))
            assert raw.recv(2.0) is None, "PUBACK before Kafka acknowledged the record"
        finally:
            fresh_broker.resume()
        assert raw.recv(30) == p.Puback(packet_id=2)
        raw.close()
    got = records_for(fresh_broker, "bench", client_id.encode(), 2)
    assert [m.value() for m in got] == [b"warm", b"after"]
