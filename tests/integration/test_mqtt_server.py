"""MqttServer in-process on loopback with a fake pipeline: flow control, sweep, takeover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.model import Message, Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.sources.mqtt_server import MqttServer

pytestmark = pytest.mark.integration


class Flow:
    def __init__(self) -> None:
        self.paused = False
        self.listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def set(self, paused: bool) -> None:
        self.paused = paused
        for listener in self.listeners:
            listener(paused)


class FakePipeline:
    def __init__(self) -> None:
        self.flow = Flow()
        self.received: list[tuple[Message, Callable[[Outcome], None]]] = []
        self.explode = False

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        if self.explode:
            raise RuntimeError("bug in the pipeline")
        self.received.append((message, on_done))


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 version: int) -> None:
        self.reader, self.writer, self.version, self.buf = reader, writer, version, b""
        self.pending: list[p.AnyPacket] = []

    def send(self, packet: p.AnyPacket) -> None:
        self.writer.write(encode(packet, self.version))

    async def recv(self, timeout: float = 5.0) -> p.AnyPacket | None:
        if self.pending:
            return self.pending.pop(0)
        while True:
            packets, used = decode_packets(self.buf, self.version, 1 << 20)
            if packets:
                # Several may come in one chunk (acks of one batch): keep the rest.
                self.buf = self.buf[used:]
                self.pending += packets[1:]
                return packets[0]
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            except TimeoutError:
                return None
            if not chunk:
                return None
            self.buf += chunk


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``predicate`` on the loop (the server runs on it too) until true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
async def server() -> AsyncIterator[tuple[MqttServer, FakePipeline]]:
    pipeline = FakePipeline()
    srv = MqttServer(pipeline, MqttLimits(receive_maximum=2), sweep_interval=0.1)
    await srv.start("127.0.0.1", 0)
    yield srv, pipeline
    await srv.close(0.1)


async def connect(srv: MqttServer, client_id: str, version: int = 5,
                  keep_alive: int = 60) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
    client = Client(reader, writer, version)
    client.send(p.Connect(protocol_level=version, client_id=client_id, keep_alive=keep_alive,
                          properties=Properties() if version == 5 else None))
    connack = await client.recv()
    assert isinstance(connack, p.Connack) and connack.reason_code == 0
    return client


def publish(client: Client, pid: int, payload: bytes = b"x") -> None:
    client.send(p.Publish(topic="a/b", payload=payload, qos=1, packet_id=pid,
                          properties=Properties(user_properties=[("k", "v")])))


async def test_message_shape_and_ack_after_on_done(server: Any) -> None:
    srv, pipeline = server
    client = await connect(srv, "shape")
    publish(client, 1, b"payload")
    assert await client.recv(0.3) is None
    message, on_done = pipeline.received[0]
    assert (message.source, message.topic, message.payload, message.qos, message.client_id) == (
        "mqtt", "a/b", b"payload", 1, "shape")
    assert message.user_properties == [("k", "v")]
    on_done(Outcome(ok=True))
    assert await client.recv() == p.Puback(packet_id=1)


async def test_reading_stops_at_the_inflight_bound_and_on_backpressure(server: Any) -> None:
    srv, pipeline = server
    client = await connect(srv, "bound")
    for pid in (1, 2):
        publish(client, pid)
    await until(lambda: len(pipeline.received) == 2)
    (conn,) = srv.connections
    assert len(pipeline.received) == 2 and not conn._reading
    pipeline.received[0][1](Outcome(ok=True))
    assert await client.recv() == p.Puback(packet_id=1)
    assert conn._reading
    pipeline.flow.set(True)
    assert not conn._reading
    pipeline.flow.set(False)
    assert conn._reading


async def test_qos0_answers_resume_reading_at_the_inflight_bound(server: Any) -> None:
    """A QoS 0 verdict writes nothing, but it frees a place under the bound: reading
    resumes (the server skips the ack flush for QoS 0 only while reading is on)."""
    srv, pipeline = server
    client = await connect(srv, "bound0")
    for _ in range(2):
        client.send(p.Publish(topic="a/b", payload=b"x", qos=0,
                              properties=Properties()))
    await until(lambda: len(pipeline.received) == 2)
    (conn,) = srv.connections
    assert not conn._reading
    pipeline.received[0][1](Outcome(ok=True))
    await until(lambda: conn._reading)
    client.send(p.Publish(topic="a/b", payload=b"y", qos=0, properties=Properties()))
    await until(lambda: len(pipeline.received) == 3)
    assert pipeline.received[2][0].payload == b"y"
    assert await client.recv(0.2) is None  # QoS 0: never an ack


async def test_keepalive_sweep_disconnects_idle_clients(server: Any) -> None:
    srv, _ = server
    client = await connect(srv, "idle", keep_alive=1)
    got = await client.recv(3.0)
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8D


async def test_takeover_disconnects_the_first_connection(server: Any) -> None:
    srv, _ = server
    first = await connect(srv, "same")
    await connect(srv, "same")
    got = await first.recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8E
    assert len(srv.registry) == 1


async def test_connections_are_every_live_one_with_one_entry_each(server: Any) -> None:
    """``connections`` is the registry's connected clients and the others (no CONNECT
    yet, or taken over and closing), each once: what the sweep, the flow and the
    max_connections bound go through."""
    srv, _ = server
    _reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
    await until(lambda: len(srv.connections) == 1)
    (waiting,) = srv.connections  # no CONNECT yet: not in the registry
    assert waiting.session.client_id == "" and not srv.registry
    first = await connect(srv, "same")
    assert len(srv.connections) == 2 and srv.registry["same"] in srv.connections
    old = srv.registry["same"]
    second = await connect(srv, "same")  # takes "same" over: the old one closes
    assert old is not srv.registry["same"]
    got = await first.recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x8E
    await until(lambda: old not in srv.connections)
    assert len(srv.connections) == 2 and set(srv.connections) == {waiting, srv.registry["same"]}
    writer.close()
    await until(lambda: len(srv.connections) == 1)
    assert list(srv.connections) == [srv.registry["same"]]
    second.writer.close()


async def test_a_crash_costs_one_connection_not_the_listener(server: Any) -> None:
    srv, pipeline = server
    client = await connect(srv, "crash")
    pipeline.explode = True
    publish(client, 1)
    assert await client.recv() is None  # closed
    pipeline.explode = False
    other = await connect(srv, "after-crash", version=4)
    other.send(p.Pingreq())
    assert await other.recv() == p.Pingresp()


class CountingTransport:
    """Wraps the real transport and counts writes."""

    def __init__(self, real: Any) -> None:
        self.real, self.writes = real, 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_acks_of_one_batch_leave_in_one_write(server: Any) -> None:
    srv, pipeline = server
    client = await connect(srv, "batch")
    publish(client, 1)
    publish(client, 2)
    await until(lambda: len(pipeline.received) == 2)
    (conn,) = srv.connections
    counting = CountingTransport(conn.transport)
    conn.transport = counting
    for _, on_done in pipeline.received:  # one batch of verdicts, as from one Kafka poll
        on_done(Outcome(ok=True))
    assert len(pipeline.received) == 2 and counting.writes == 0  # queued until the batch ends
    first = await client.recv()
    second = await client.recv()
    assert [first, second] == [p.Puback(packet_id=1), p.Puback(packet_id=2)], (
        counting.writes, conn.session.pending, conn.session._order)
    assert counting.writes == 1, client.buf
    assert conn.peer.startswith("127.0.0.1:")


async def test_background_starts_once_without_a_tcp_listener() -> None:
    """MQTT over WebSocket alone has no ``start``: the sweep and flow must still run."""
    pipeline = FakePipeline()
    srv = MqttServer(pipeline, MqttLimits(), sweep_interval=0.05)
    srv.start_background()
    srv.start_background()
    assert len(pipeline.flow.listeners) == 1  # subscribed once
    swept = asyncio.Event()
    srv.sweep = lambda now: swept.set()  # type: ignore[method-assign]
    await asyncio.wait_for(swept.wait(), 2.0)
    await srv.close(deadline=0.1)
    assert pipeline.flow.listeners == []


async def test_a_client_still_writing_reads_the_disconnect_reason(server: Any) -> None:
    """A client still writing when the gateway closes with a DISCONNECT (Paho's test
    client answers a PUBREC with a PUBREL after 0x93) can finish its writes and read
    the reason: the gateway half-closes and reads on until the client closes, instead
    of closing a socket that the next write would reset (a write error on the client,
    before it has read why)."""
    srv, _pipeline = server
    client = await connect(srv, "eager")
    for pid in (1, 2, 3):  # the fixture's receive maximum is 2: the third is one too many
        publish(client, pid)
    await until(lambda: not srv.connections or all(
        c.session.closing for c in srv.connections))
    await asyncio.sleep(0.05)  # the close has reached the sockets
    for _ in range(2):  # what a client does next, not knowing yet
        client.send(p.Pingreq())
        await client.writer.drain()
        await asyncio.sleep(0.2)  # time for a reset to come back, if there is one
    got = await client.recv()
    assert isinstance(got, p.Disconnect) and got.reason_code == 0x93
    assert await client.recv() is None  # then the end of the stream
    client.writer.close()
