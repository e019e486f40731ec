"""What a real MQTT 3.1.1 client sees when a message fails (issue #10, defects 3 and 6).

MqttServer in-process on loopback, a pipeline that fails on purpose, and paho
(3.1.1) as the device.  A failure that may pass later closes the connection
without an ack and the retransmission is tried again; a failure that never
passes is acknowledged once (MQTT-3.3.5-2) and logged, with no reconnect loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.errors import GatewayError, NoMatchingRule, Unavailable
from gateway.model import Message, Outcome
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.sources.mqtt_server import MqttServer
from tests.helpers import running

pytestmark = pytest.mark.integration
DEADLINE = 30.0


class Flow:
    paused = False

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        return lambda: None


class ScriptedPipeline:
    """Answers the n-th message with ``script[n]`` (an error, or None for success);
    past the script, holds the verdict until ``release``."""

    def __init__(self, script: list[GatewayError | None], hold_after: bool = False) -> None:
        self.flow = Flow()
        self.script = script
        self.hold_after = hold_after
        self.messages: list[Message] = []
        self.held: list[Callable[[Outcome], None]] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        n = len(self.messages)
        self.messages.append(message)
        if n >= len(self.script) and self.hold_after:
            self.held.append(on_done)
            return
        error = self.script[n] if n < len(self.script) else None
        outcome = Outcome(ok=error is None, error=error)
        asyncio.get_running_loop().call_soon(on_done, outcome)  # later, like Kafka


class Log:
    """A structlog-shaped logger that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _line(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    info = debug = warning = exception = _line

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for event, kw in self.lines if event == name]


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    servers: list[MqttServer] = []

    async def start(pipeline: ScriptedPipeline) -> tuple[MqttServer, Log]:
        log = Log()
        srv = MqttServer(pipeline, MqttLimits(), log, sweep_interval=0.2)
        await srv.start("127.0.0.1", 0)
        servers.append(srv)
        return srv, log

    yield start
    for srv in servers:
        await srv.close(0.1)


def paho_311(port: int, client_id: str) -> tuple[paho.Client, list[int]]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311, clean_session=False)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    connects: list[int] = []
    lock = threading.Lock()

    def on_connect(*_: Any) -> None:
        with lock:
            connects.append(1)

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client, connects


@pytest.mark.parametrize("qos", [1, 2])
async def test_transient_failure_is_retried_by_the_device(started: Any, qos: int) -> None:
    pipeline = ScriptedPipeline([Unavailable("spool full")])
    srv, log = await started(pipeline)
    client, connects = paho_311(srv.ports[0], f"flaky-{qos}")
    try:
        info = client.publish("t", b"reading", qos=qos)
        # Closed without an ack; paho reconnects and sends it again; that copy goes through.
        await until(info.is_published, "the retransmission to be acknowledged")
        assert len(pipeline.messages) == 2 and len(connects) == 2
        # The Disconnected of the failed ack reached the server (defect 6): logged.
        (line,) = log.events("mqtt_disconnected")
        assert line["reason_code"] == "0x89" and line["client_id"] == f"flaky-{qos}"
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.parametrize("qos", [1, 2])
async def test_permanent_failure_is_acknowledged_once_no_reconnect_loop(
    started: Any, qos: int,
) -> None:
    pipeline = ScriptedPipeline([NoMatchingRule("no rule routes t"), None])
    srv, log = await started(pipeline)
    client, connects = paho_311(srv.ports[0], f"refused-{qos}")
    try:
        first = client.publish("t", b"never routed", qos=qos)
        await until(first.is_published, "the refused message's ack")
        second = client.publish("t", b"fine", qos=qos)
        await until(second.is_published, "the next message's ack")
        assert len(pipeline.messages) == 2 and len(connects) == 1  # no reconnect at all
        (line,) = log.events("mqtt_publish_refused")
        assert line["error"] == "no_matching_rule" and line["client_id"] == f"refused-{qos}"
    finally:
        client.loop_stop()
        client.disconnect()


async def test_pending_is_zero_after_a_moved_qos2_verdict(started: Any) -> None:
    """Defect 6: the moved token left pending at -1, so close() waited its whole deadline."""
    pipeline = ScriptedPipeline([], hold_after=True)
    srv, _ = await started(pipeline)
    props = Properties(session_expiry_interval=60)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.ports[0])
        writer.write(encode(p.Connect(protocol_level=5, client_id="mover", clean_start=False,
                                      properties=props), 5))
        await reader.readexactly(2)  # CONNACK fixed header ...
        return reader, writer

    reader, writer = await connect()
    writer.write(encode(p.Publish(topic="t", payload=b"x", qos=2, packet_id=3,
                                  properties=Properties()), 5))
    await until(lambda: len(pipeline.messages) == 1, "the message to reach the pipeline")
    writer.close()
    await until(lambda: not srv.connections, "the first connection to go")
    reader, writer = await connect()
    writer.write(encode(p.Publish(topic="t", payload=b"x", qos=2, packet_id=3, dup=True,
                                  properties=Properties()), 5))
    writer.write(b"\xc0\x00")  # PINGREQ: its PINGRESP says the retransmission was handled
    data = b""
    while b"\xd0\x00" not in data:
        data += await asyncio.wait_for(reader.read(1024), DEADLINE)
    (conn,) = srv.connections
    assert conn.session.pending == 1  # the verdict it now waits for
    pipeline.held[0](Outcome(ok=True))
    while b"\x50\x02\x00\x03" not in data:  # PUBREC, on the new connection
        data += await asyncio.wait_for(reader.read(1024), DEADLINE)
    assert len(pipeline.messages) == 1  # not produced twice
    assert conn.session.pending == 0  # what close() waits for: nothing in flight
    writer.write(encode(p.Pubrel(packet_id=3), 5))
    while b"\x70\x02\x00\x03" not in data:  # PUBCOMP
        data += await asyncio.wait_for(reader.read(1024), DEADLINE)
    writer.close()


def test_real_gateway_refused_qos2_does_not_block_the_device(
    gateway_factory: Any, broker: Any, rules_dir: Any,
) -> None:
    """`lastmile serve` with `unmatched: reject`: paho 3.1.1 QoS 2 to an unrouted topic is
    acknowledged once, and the device's next message reaches Kafka (no reconnect loop)."""
    globals_file = rules_dir / "00-globals.yaml"
    globals_file.write_text(globals_file.read_text().replace(
        "unmatched: dead-letter", "unmatched: reject"))
    proc, ports = gateway_factory()
    client_id = f"stuck-{uuid.uuid4().hex[:8]}"
    with running(proc, ("127.0.0.1", ports["mqtt"])):
        client, connects = paho_311(ports["mqtt"], client_id)
        try:
            client.publish("nowhere/at/all", b"refused", qos=2).wait_for_publish(DEADLINE)
            client.publish(f"bench/{client_id}/t", b"after", qos=2).wait_for_publish(DEADLINE)
            assert len(connects) == 1
        finally:
            client.loop_stop()
            client.disconnect()
        end = time.monotonic() + DEADLINE
        got: list[Any] = []
        while not got and time.monotonic() < end:
            got = [m for m in broker.read("bench", 1_000_000, timeout=2)
                   if m.key() == client_id.encode()]
        assert [m.value() for m in got] == [b"after"]
        assert "mqtt_publish_refused" in proc.log_text()
