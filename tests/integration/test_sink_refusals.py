"""A record the Kafka client refuses with any exception fails alone, never hangs.

Issue #10 defect 1: ``Producer.produce()`` raised ``OverflowError`` for a
partition beyond int32; only ``BufferError``/``KafkaException`` were caught, so
the record stayed "direct open" forever: with the spool on the replayer stopped
at it for good, with the spool off its bytes never left flow control.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.buffer.queue import MemoryBuffer
from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Cluster
from gateway.config.schema import Spool as SpoolConfig
from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Ack, Delivery, Outcome, Record
from gateway.sinks.kafka import KafkaSink
from tests.helpers import Broker
from tests.integration.http_support import tenant

pytestmark = pytest.mark.integration

BAD_PARTITION = 2**31  # librdkafka's partition is an int32: OverflowError in produce()


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def record(topic: str, value: bytes, outcomes: dict[bytes, Outcome],
           partition: int | None = None) -> Record:
    rec = Record(cluster="default", topic=topic, value=value, key=b"k", partition=partition)
    rec.ack = Ack(lambda o: outcomes.__setitem__(value, o), 1)
    return rec


async def test_sink_fails_only_the_refused_record(broker: Broker) -> None:
    topic = f"refuse.sink.{tenant()}"
    sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap))
    await sink.start()
    results: dict[bytes, tuple[Delivery | None, GatewayError | None]] = {}

    def on_result(rec: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        results[rec.value] = (delivery, error)

    sink.produce(Record(cluster="default", topic=topic, value=b"bad",
                        partition=BAD_PARTITION), on_result)
    sink.produce(Record(cluster="default", topic=topic, value=b"bad-header",
                        headers=[("\ud800", b"x")]), on_result)  # not encodable as UTF-8
    sink.produce(Record(cluster="default", topic=topic, value=b"good"), on_result)
    await until(lambda: len(results) == 3)
    for value in (b"bad", b"bad-header"):
        delivery, error = results[value]
        assert delivery is None and isinstance(error, DeliveryFailed)
        assert not error.retriable and error.kafka_code == "invalid_record"
    assert results[b"good"][1] is None
    await until(lambda: sink.in_flight == 0)
    assert await sink.close(5) == 0
    assert [m.value() for m in broker.read(topic, 1)] == [b"good"]


@pytest.mark.parametrize("mode", ["kafka", "write-ahead"])
async def test_spool_on_later_records_still_reach_kafka(tmp_path: Path, broker: Broker,
                                                        mode: str) -> None:
    topic = f"refuse.spool.{tenant()}"
    sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap))
    await sink.start()
    buf = SpoolBuffer({"default": sink}, SpoolConfig(mode=mode),  # type: ignore[arg-type]
                      BufferConfig(), tmp_path / "spool")
    await buf.start()
    outcomes: dict[bytes, Outcome] = {}
    buf.submit(record(topic, b"bad", outcomes, partition=BAD_PARTITION))
    for i in range(5):
        buf.submit(record(topic, b"later-%d" % i, outcomes))
    await until(lambda: len(outcomes) == 6)
    later = [b"later-%d" % i for i in range(5)]
    assert all(outcomes[v].ok for v in later)
    if mode == "kafka":  # refused before any ack: the client is told
        assert not outcomes[b"bad"].ok
        assert isinstance(outcomes[b"bad"].error, DeliveryFailed)
    # Nothing stays stuck: every later record reaches Kafka and the spool drains.
    got = await asyncio.to_thread(broker.read, topic, 5, 30)
    assert sorted(m.value() for m in got) == later
    await until(lambda: buf.stats()["spool_records"] == 0 and buf.mem_bytes == 0)
    await buf.close(5)
    await sink.close(5)


async def test_spool_off_flow_control_bytes_are_released(broker: Broker) -> None:
    topic = f"refuse.mem.{tenant()}"
    sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap))
    await sink.start()
    buf = MemoryBuffer({"default": sink}, 1 << 20, 1 << 19)
    outcomes: dict[bytes, Outcome] = {}
    buf.submit(record(topic, b"bad", outcomes, partition=BAD_PARTITION))
    buf.submit(record(topic, b"good", outcomes))
    await until(lambda: len(outcomes) == 2)
    assert not outcomes[b"bad"].ok and outcomes[b"good"].ok
    assert buf.flow.pending_bytes == 0 and sink.in_flight == 0
    await sink.close(5)
