"""Per-connection bounds (issue 13, "Topic aliases" and "Idle and partial input") on real
sockets, while a well-behaved QoS 1 publisher loses nothing.

- limits.topic_alias_max_bytes: a client registering aliases of 1 KB topics past the bound
  gets DISCONNECT 0x97; the alias bytes the gateway holds for it (counted from the session's
  own alias map, not RSS) never exceed the bound.
- limits.max_keepalive_s: keep alive 0 is capped (MQTT 5: CONNACK Server Keep Alive; 3.1.1:
  closed after 1.5 x the cap of silence).
- limits.partial_packet_timeout_s: half a packet, then nothing: closed after the timeout; an
  idle client whose packets all arrived whole is not.

Verdicts poll with deadlines; no fixed sleep decides anything.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.model import Message, Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.session import MqttSession
from tests.helpers import Broker, log_events, wait_until
from tests.integration.test_mqtt_server import Flow

pytestmark = pytest.mark.integration

RULES = """
rules:
  - {name: mqbounds, match: "mqbounds/{run}/#", kafka: {topic: "mqbounds.{run}"}}
"""


class Raw:
    """A hand-driven MQTT client on a blocking socket: it sends exactly what the test says."""

    def __init__(self, port: int, version: int) -> None:
        self.version = version
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.pending: list[p.AnyPacket] = []

    def send(self, packet: p.AnyPacket) -> None:
        self.sock.sendall(encode(packet, self.version))

    def connect(self, client_id: str, keep_alive: int) -> p.Connack:
        self.send(p.Connect(protocol_level=self.version, client_id=client_id,
                            keep_alive=keep_alive,
                            properties=Properties() if self.version == 5 else None))
        connack = self.recv()
        assert isinstance(connack, p.Connack) and connack.reason_code == 0, connack
        return connack

    def recv(self, timeout: float = 30.0) -> p.AnyPacket | None:
        """The next packet, or None once the gateway closed the connection."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            packets, used = decode_packets(self.buf, self.version, 1 << 20)
            if packets:
                self.buf = self.buf[used:]
                self.pending += packets[1:]
                return packets[0]
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for a packet or the close"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self.buf, self.buf
                return None
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def alias_topic(run: str, n: int) -> str:
    """A 1,000-byte topic of the test's rule."""
    head = f"mqbounds/{run}/alias/{n}/"
    return head + "x" * (1000 - len(head))


# --- in-process MqttServer: the session's own alias map ----------------------------------------


class AckingPipeline:
    """Every message is safe at once (the pipeline's verdict is not what is tested here)."""

    def __init__(self) -> None:
        self.flow = Flow()
        self.messages: list[Message] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        self.messages.append(message)
        asyncio.get_running_loop().call_soon(on_done, Outcome(ok=True))


async def read_packet(reader: asyncio.StreamReader, version: int) -> p.AnyPacket | None:
    """One packet (fixed header, remaining length, body), or None at the close."""
    try:
        head = await asyncio.wait_for(reader.readexactly(2), 30)
        data = head
        while data[-1] & 0x80:
            data += await reader.readexactly(1)
        length, shift = 0, 0
        for byte in data[1:]:
            length |= (byte & 0x7F) << shift
            shift += 7
        data += await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None
    packets, _ = decode_packets(data, version, 1 << 20)
    return packets[0]


def held_alias_bytes(session: MqttSession) -> int:
    return sum(len(t.encode()) for t in (session._aliases or {}).values())


async def test_alias_bytes_never_exceed_the_bound_in_process() -> None:
    from gateway.sources.mqtt_server import MqttServer

    bound = 16 * 1024
    pipeline = AckingPipeline()
    srv = MqttServer(pipeline, MqttLimits(topic_alias_maximum=1000, topic_alias_max_bytes=bound),
                     sweep_interval=0.05)
    await srv.start("127.0.0.1", 0)
    port = srv.ports[0]
    try:
        good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
        good_w.write(encode(p.Connect(protocol_level=4, client_id="good", keep_alive=60), 4))
        assert await good_r.readexactly(4) == b"\x20\x02\x00\x00"
        bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
        bad_w.write(encode(p.Connect(protocol_level=5, client_id="aliases", keep_alive=60,
                                     properties=Properties()), 5))
        connack = await read_packet(bad_r, 5)
        assert isinstance(connack, p.Connack) and connack.properties is not None
        assert connack.properties.topic_alias_maximum == 1000
        (bad,) = [c for c in srv.connections if c.session.client_id == "aliases"]
        answers: list[p.AnyPacket | None] = []
        for n in range(1, 41):  # 40 aliases of 1,000 bytes: 40,000 bytes asked, 16,384 allowed
            bad_w.write(encode(p.Publish(topic=alias_topic("inproc", n), payload=b"a", qos=1,
                                         packet_id=n, properties=Properties(topic_alias=n)), 5))
            good_w.write(encode(p.Publish(topic="t/good", payload=b"%d" % n, qos=1,
                                          packet_id=n), 4))
            assert await good_r.readexactly(4) == b"\x40\x02" + n.to_bytes(2, "big")
            answer = await read_packet(bad_r, 5)
            # What the gateway holds for the client, counted from its alias map.
            held = held_alias_bytes(bad.session)
            assert held <= bound, f"{held} bytes of alias topics held"
            assert bad.session._alias_bytes == held  # the session's own count agrees
            answers.append(answer)
            if not isinstance(answer, p.Puback):
                break
        assert answers[:16] == [p.Puback(packet_id=n) for n in range(1, 17)]
        last = answers[16]
        assert isinstance(last, p.Disconnect) and last.reason_code == 0x97, answers[16:]
        assert last.properties is not None and "16384" in (last.properties.reason_string or "")
        assert await read_packet(bad_r, 5) is None  # and closed
        assert len(answers) == 17
        assert srv.limit_closes == {"topic_alias_bytes": 1}
        # The good publisher: every message acked and handed on, in order.
        assert [m.payload for m in pipeline.messages if m.client_id == "good"] == [
            b"%d" % n for n in range(1, 18)]
        good_w.close()
    finally:
        await srv.close(0.1)


async def test_the_partial_clock_waits_while_the_gateway_does_not_read() -> None:
    """Backpressure stops reading: a packet cut short then is not the client's stall."""
    from gateway.sources.mqtt_server import MqttServer

    pipeline = AckingPipeline()
    srv = MqttServer(pipeline, MqttLimits(partial_packet_timeout=0.5), sweep_interval=0.05)
    await srv.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
        writer.write(encode(p.Connect(protocol_level=4, client_id="slow", keep_alive=60), 4))
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
        (conn,) = srv.connections
        data = encode(p.Publish(topic="t/x", payload=b"y" * 100, qos=1, packet_id=1), 4)
        writer.write(data[:20])
        deadline = loop.time() + 30
        while conn.session._buf is None:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        pipeline.flow.set(True)  # the gateway stops reading
        assert conn.session.deadline > loop.time() + 60  # only the keep alive is left
        paused_at = loop.time()
        while loop.time() < paused_at + 1.5:  # three partial timeouts pass: still open
            assert conn in srv.connections
            await asyncio.sleep(0.05)
        pipeline.flow.set(False)  # reading again: the clock starts over, and runs out
        assert await read_packet(reader, 4) is None
        assert srv.limit_closes == {"partial_packet": 1}
    finally:
        await srv.close(0.1)


# --- `lastmile serve` with tansu -------------------------------------------------------------


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def limit_closes(port: int, limit: str) -> float:
    return metric(port, f'lastmile_mqtt_limit_closes_total{{limit="{limit}"}}') or 0.0


class GoodPublisher:
    """A paho QoS 1 publisher: every message it got a PUBACK for must be in Kafka."""

    def __init__(self, port: int, run: str, keepalive: int = 60) -> None:
        self.run = run
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"good-{run}",
                                  protocol=paho.MQTTv311)
        self.infos: list[Any] = []
        self.client.connect("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        wait_until(self.client.is_connected, 30, what="the good publisher's CONNACK")

    def publish(self, n: int) -> None:
        payload = b"good-%d" % n
        self.infos.append((payload, self.client.publish(f"mqbounds/{self.run}/good", payload,
                                                        qos=1)))

    def finish(self) -> set[bytes]:
        for _, info in self.infos:
            info.wait_for_publish(30)
        acked = {payload for payload, info in self.infos if info.is_published()}
        assert len(acked) == len(self.infos)
        self.client.disconnect()
        self.client.loop_stop()
        return acked


def in_kafka(broker: Broker, run: str, expected: set[bytes]) -> None:
    got = {m.value() for m in broker.read(f"mqbounds.{run}", len(expected), timeout=60)}
    assert got >= expected, sorted(expected - got)[:5]


def test_serve_disconnects_an_alias_hog_with_0x97(gateway_factory: Any, rules_dir: Path,
                                                   broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__topic_alias_maximum=1000,
                                limits__topic_alias_max_bytes=16384, log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    hog = Raw(ports["mqtt"], 5)
    connack = hog.connect(f"hog-{run}", 60)
    assert connack.properties is not None and connack.properties.topic_alias_maximum == 1000
    acked: set[bytes] = set()
    answer: p.AnyPacket | None = None
    for n in range(1, 41):
        hog.send(p.Publish(topic=alias_topic(run, n), payload=b"hog-%d" % n, qos=1, packet_id=n,
                           properties=Properties(topic_alias=n)))
        good.publish(n)
        answer = hog.recv()
        if not isinstance(answer, p.Puback):
            break
        acked.add(b"hog-%d" % n)
        # Aliases in use work: an alias-only PUBLISH reaches Kafka under the full topic.
        hog.send(p.Publish(topic="", payload=b"hog-again-%d" % n, qos=1, packet_id=n,
                           properties=Properties(topic_alias=n)))
        assert hog.recv() == p.Puback(packet_id=n)
        acked.add(b"hog-again-%d" % n)
    assert len(acked) == 32  # 16 aliases of 1,000 bytes fit in 16,384, the 17th does not
    assert isinstance(answer, p.Disconnect) and answer.reason_code == 0x97, answer
    assert hog.recv() is None
    hog.close()
    for n in range(41, 61):
        good.publish(n)
    in_kafka(broker, run, good.finish() | acked)
    wait_until(lambda: limit_closes(ports["metrics"], "topic_alias_bytes") == 1, 30,
               what="the alias close counted")
    lines = [e for e in log_events(gw.log_text(), "mqtt_disconnected")
             if e.get("limit") == "topic_alias_bytes"]
    assert len(lines) == 1 and lines[0]["reason_code"] == "0x97"


def test_serve_caps_keep_alive_0(gateway_factory: Any, rules_dir: Path,
                                 broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__max_keepalive_s=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run, keepalive=1)  # within the cap: never closed
    v5 = Raw(ports["mqtt"], 5)
    connack = v5.connect(f"v5-{run}", 0)
    assert connack.properties is not None and connack.properties.server_keep_alive == 2
    v4 = Raw(ports["mqtt"], 4)
    v4.connect(f"v4-{run}", 0)  # 3.1.1 cannot be told: its silence is bounded all the same
    connected_at = time.monotonic()
    n = 0
    while True:  # the good publisher publishes while the silent ones wait
        good.publish(n)
        n += 1
        if n % 10 == 0 and wait_readable(v4.sock):
            break
        assert time.monotonic() < connected_at + 60, "the silent 3.1.1 client was never closed"
        time.sleep(0.05)
    assert v4.recv() is None  # 3.1.1: closed without a packet
    assert time.monotonic() - connected_at >= 2.5  # not before 1.5 x 2 s (minus the CONNACK)
    got = v5.recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8D
    v4.close()
    v5.close()
    in_kafka(broker, run, good.finish())
    wait_until(lambda: limit_closes(ports["metrics"], "keep_alive") >= 2, 30,
               what="the idle closes counted")


def wait_readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_serve_closes_a_stalled_partial_packet(gateway_factory: Any, rules_dir: Path,
                                               broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__partial_packet_timeout_s=2, log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    # Idle, but every packet it sent arrived whole: no partial clock runs for it.
    idle = Raw(ports["mqtt"], 5)
    idle.connect(f"idle-{run}", 60)
    idle.send(p.Publish(topic=f"mqbounds/{run}/idle", payload=b"idle", qos=1, packet_id=1,
                        properties=Properties()))
    assert idle.recv() == p.Puback(packet_id=1)
    idle_since = time.monotonic()
    stalled = []
    for version in (5, 4):
        client = Raw(ports["mqtt"], version)
        client.connect(f"stall{version}-{run}", 60)
        data = encode(p.Publish(topic=f"mqbounds/{run}/stalled", payload=b"z" * 500, qos=1,
                                packet_id=1, properties=Properties() if version == 5 else None),
                      version)
        client.sock.sendall(data[:len(data) // 2])  # half a packet, then nothing
        stalled.append(client)
    n = 0
    while not all(wait_readable(c.sock) for c in stalled):
        good.publish(n)
        n += 1
        assert time.monotonic() < idle_since + 60, "a stalled client was never closed"
        time.sleep(0.05)
    got = stalled[0].recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8D, got
    assert stalled[0].recv() is None
    assert stalled[1].recv() is None  # 3.1.1: closed without a packet
    # The idle client has been silent longer than the partial timeout: still served.
    assert time.monotonic() - idle_since > 2
    idle.send(p.Pingreq())
    assert idle.recv() == p.Pingresp()
    for c in (*stalled, idle):
        c.close()
    in_kafka(broker, run, good.finish() | {b"idle"})
    wait_until(lambda: limit_closes(ports["metrics"], "partial_packet") == 2, 30,
               what="the partial closes counted")
    lines = [e for e in log_events(gw.log_text(), "mqtt_disconnected")
             if e.get("limit") == "partial_packet"]
    assert len(lines) == 2
