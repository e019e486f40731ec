"""Acks against the real broker, with a fault-injecting Sink around the real KafkaSink.

- Dead letter after ack (issue 11, item 5): a record Kafka refuses for good
  after the spool acknowledged it reaches the dead-letter topic, end to end
  (MQTT and HTTP); before any ack, the refusal is an HTTP 502.
- Ack order (issue 11, item 6): a record held back while later ones are
  confirmed by Kafka keeps every later PUBACK waiting; QoS 2 PUBREC waits for
  Kafka while the broker is stopped (SIGSTOP).

The gateway runs in-process (``App``, its real listeners and sinks) so the test
can put the double between the buffer and the real sink: the same ``Sink``
interface the buffer uses in production (gateway/buffer/sink.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import App
from gateway.config import load_config
from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Delivery, Record
from tests.helpers import Broker, write_config
from tests.support.mqtt_raw import RawClient, publish, pubrel
from tests.unit.test_spool_buffer import until

pytestmark = pytest.mark.integration

DEAD_LETTER = "lastmile.dead-letter"
Callback = Callable[[Record, Delivery | None, GatewayError | None], None]


class FaultySink:
    """Around a real sink: refuses chosen records for good, holds others back."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.refuse: Callable[[Record], bool] = lambda r: False
        self.hold: Callable[[Record], bool] = lambda r: False
        self.held: list[tuple[Record, Callback]] = []
        self.confirmed: list[bytes] = []

    def __getattr__(self, name: str) -> Any:  # metrics read in_flight, delivered, ...
        return getattr(self.inner, name)

    def produce(self, record: Record, callback: Callback) -> None:
        if self.refuse(record):  # as Kafka answers MSG_SIZE_TOO_LARGE
            asyncio.get_running_loop().call_soon(
                callback, record, None,
                DeliveryFailed("Kafka refused the record: Broker: Message size too large",
                               kafka_code="MSG_SIZE_TOO_LARGE"))
            return
        if self.hold(record):
            self.held.append((record, callback))
            return
        self.inner.produce(record, self._seen(callback))

    def release(self) -> None:
        held, self.held = self.held, []
        for record, callback in held:
            self.inner.produce(record, self._seen(callback))

    def _seen(self, callback: Callback) -> Callback:
        def report(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
            if error is None:
                self.confirmed.append(record.value)
            callback(record, delivery, error)
        return report


class FaultyApp(App):
    async def _start_kafka(self) -> None:
        await super()._start_kafka()
        self.sinks = {name: FaultySink(sink) for name, sink in self.sinks.items()}  # type: ignore[misc]


@pytest.fixture
async def gateway(tmp_path: Path, rules_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    apps: list[App] = []

    async def start(bootstrap: str, **overrides: Any) -> tuple[FaultyApp, FaultySink, dict]:
        cfg = tmp_path / f"gateway-{len(apps)}.yaml"
        ports = write_config(cfg, bootstrap=bootstrap, rules_dir=rules_dir,
                             spool_dir=tmp_path / f"spool-{len(apps)}", **overrides)
        app = FaultyApp(load_config(cfg, env={}), str(rules_dir))
        apps.append(app)
        await app.start()
        sink = app.sinks["default"]
        assert isinstance(sink, FaultySink)
        return app, sink, ports

    yield start
    for app in apps:
        await app.stop()


async def dead_letters(broker: Broker, value: bytes, timeout: float = 15) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [m for m in await asyncio.to_thread(broker.read, DEAD_LETTER, 1 << 30, 2)
               if m.value() == value]
        if got:
            return got
    return []


@pytest.mark.timeout(120)
async def test_refused_after_a_spool_ack_reaches_the_dead_letter_topic(
        gateway: Any, broker: Broker) -> None:
    app, sink, ports = await gateway(broker.bootstrap, spool__mode="write-ahead")
    # With the spool on, librdkafka never times a record out (docs/spool.md, order).
    assert sink.inner._settings["message.timeout.ms"] == 0
    mqtt_value = b"refused-after-ack-mqtt-" + uuid.uuid4().hex.encode()
    http_value = b"refused-after-ack-http-" + uuid.uuid4().hex.encode()
    sink.refuse = lambda r: r.topic == "bench" and r.value in (mqtt_value, http_value)

    client = await RawClient.open(ports["mqtt"], "dl-" + uuid.uuid4().hex[:8])
    client.writer.write(publish("bench/dl/seq", mqtt_value, 1, 1))
    kind, body = await client.packet(20)
    assert (kind, body) == (0x40, b"\x00\x01")  # PUBACK success: safe in the spool
    client.close()
    url = f"http://127.0.0.1:{ports['http']}/v1/publish/bench/dl/http"
    async with aiohttp.ClientSession() as http, http.post(url, data=http_value) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["deliveries"][0]["spooled"] is True

    for value in (mqtt_value, http_value):
        got = await dead_letters(broker, value)
        assert got, f"{value!r}: acked, refused, not in {DEAD_LETTER}: {app.buffer.stats()}"
        headers = dict(got[0].headers())
        assert headers["lastmile-reason"] == b"kafka_refused"
        assert headers["lastmile-topic"] == b"bench"
        assert b"Message size too large" in headers["lastmile-detail"]
    assert app.buffer is not None
    stats = app.buffer.stats()
    assert stats["dead_lettered"] == 2 and stats["lost_after_ack"] == 0


@pytest.mark.timeout(60)
async def test_refused_before_any_ack_is_an_http_502(gateway: Any, broker: Broker) -> None:
    _, sink, ports = await gateway(broker.bootstrap)  # kafka mode: the ack waits for Kafka
    value = b"refused-direct-" + uuid.uuid4().hex.encode()
    sink.refuse = lambda r: r.value == value
    url = f"http://127.0.0.1:{ports['http']}/v1/publish/bench/dl/direct"
    async with aiohttp.ClientSession() as http, http.post(url, data=value) as resp:
        body = await resp.json()
        assert resp.status == 502, body
    assert "Message size too large" in str(body)


@pytest.mark.timeout(60)
async def test_pubacks_keep_arrival_order_when_kafka_confirms_later_records_first(
        gateway: Any, broker: Broker) -> None:
    _, sink, ports = await gateway(broker.bootstrap, spool__enabled=False)
    assert sink.inner._settings["message.timeout.ms"] == 30_000  # spool off: it fails acks
    sink.hold = lambda r: r.value == b"first"
    client = await RawClient.open(ports["mqtt"], "order-" + uuid.uuid4().hex[:8])
    values = [b"first", b"second", b"third", b"fourth"]
    for packet_id, value in enumerate(values, 1):
        client.writer.write(publish("bench/order/seq", value, 1, packet_id))
    await until(lambda: len(sink.confirmed) >= 3, timeout=30)
    assert sink.confirmed == values[1:]  # Kafka has the later three; "first" is held
    # Their acks ran on the loop already; a PUBACK sent for them would be on the wire.
    assert await client.nothing_within(0.5), "PUBACK before the held record was safe"
    sink.release()
    acks = [await client.packet(20) for _ in values]
    assert acks == [(0x40, bytes([0, i])) for i in range(1, 5)]
    client.close()


@pytest.mark.timeout(90)
async def test_qos2_pubrec_only_after_kafka_with_the_broker_stopped(
        gateway: Any, fresh_broker: Broker) -> None:
    _, sink, ports = await gateway(fresh_broker.bootstrap, spool__enabled=False)
    client = await RawClient.open(ports["mqtt"], "qos2-" + uuid.uuid4().hex[:8])
    value = b"qos2-" + uuid.uuid4().hex.encode()
    fresh_broker.pause()
    try:
        client.writer.write(publish("bench/qos2/seq", value, 2, 7))
        await until(lambda: sink.inner.in_flight > 0, timeout=20)
        assert sink.inner.in_flight == 1  # handed to librdkafka; Kafka cannot answer
        assert await client.nothing_within(1.0), "PUBREC while Kafka was stopped"
    finally:
        fresh_broker.resume()
    assert await client.packet(30) == (0x50, b"\x00\x07")  # PUBREC once Kafka has it
    assert sink.confirmed == [value]
    client.writer.write(pubrel(7))
    assert await client.packet(10) == (0x70, b"\x00\x07")  # PUBCOMP
    client.close()
    got = [m.value() for m in await asyncio.to_thread(fresh_broker.read, "bench", 1, 20)]
    assert got == [value]
