"""The Kafka sink against a real Kafka-protocol broker (tansu)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.config.schema import Cluster
from gateway.errors import DeliveryFailed, GatewayError, Unavailable
from gateway.model import Delivery, Record
from gateway.sinks.kafka import KafkaSink
from tests.helpers import Broker, free_port

pytestmark = pytest.mark.integration


async def test_10k_records_with_keys_and_headers_round_trip(broker: Broker) -> None:
    topic = "sink-roundtrip"
    broker.create_topic(topic, partitions=3)
    sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap))
    await sink.start()
    calls: Counter[int] = Counter()
    done = asyncio.Event()
    failures: list[GatewayError] = []
    # The callback runs inside the sink's dispatch, which logs and swallows exceptions:
    # keep what it saw and assert on it here.
    deliveries: dict[int, Delivery | None] = {}
    n = 10_000

    def on_result(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        seq = int(record.value.split(b"-")[1])
        calls[seq] += 1
        deliveries[seq] = delivery
        if error is not None:
            failures.append(error)
        if sum(calls.values()) >= n:
            done.set()

    for i in range(n):
        sink.produce(Record(cluster="default", topic=topic, value=f"value-{i}".encode(),
                            key=f"device-{i % 50}".encode(),
                            headers=[("seq", str(i).encode()), ("src", b"test")]), on_result)
    await asyncio.wait_for(done.wait(), 60)
    assert sink.in_flight == 0 and sink.delivered == n
    await sink.close(10)
    assert not failures
    assert len(calls) == n and set(calls.values()) == {1}  # each ack exactly once
    for seq, delivery in deliveries.items():
        assert delivery is not None and delivery.topic == topic and delivery.offset >= 0, seq

    got = await asyncio.to_thread(broker.read_all, topic, 60)
    assert len(got) == n  # read to the end: a duplicate or an extra would show here
    by_seq = {}
    for msg in got:
        headers = dict(msg.headers())
        by_seq[int(headers["seq"])] = msg
        assert headers["src"] == b"test"
    assert sorted(by_seq) == list(range(n))
    for i in (0, 1, 4999, 9999):
        assert by_seq[i].value() == f"value-{i}".encode()
        assert by_seq[i].key() == f"device-{i % 50}".encode()
    # Same key -> same partition, in production order (offsets rise with seq per key),
    # and each delivery report names where Kafka put the record.
    partitions: dict[bytes, set[int]] = {}
    for msg in got:
        partitions.setdefault(msg.key(), set()).add(msg.partition())
    assert all(len(p) == 1 for p in partitions.values())
    assert len({msg.partition() for msg in got}) == 3
    by_key: dict[bytes, list[tuple[int, int]]] = {}
    for msg in got:
        by_key.setdefault(msg.key(), []).append((msg.offset(), int(dict(msg.headers())["seq"])))
    for key, pairs in by_key.items():
        seqs = [seq for _, seq in sorted(pairs)]
        assert seqs == sorted(seqs), f"{key!r}: not in production order"
    for seq, msg in by_seq.items():
        delivery = deliveries[seq]
        assert delivery is not None
        assert (delivery.partition, delivery.offset) == (msg.partition(), msg.offset())


async def test_unreachable_at_start_is_a_clear_error() -> None:
    sink = KafkaSink("edge", Cluster(bootstrap_servers=f"127.0.0.1:{free_port()}",
                                     connect_timeout_s=1.5))
    with pytest.raises(Unavailable, match=r"edge.*did not answer within 1.5s"):
        await asyncio.wait_for(sink.start(), 60)  # gives up on its own: no hang


async def test_broker_gone_fails_acks_with_reason_after_timeout(fresh_broker: Broker) -> None:
    sink = KafkaSink("default", Cluster(bootstrap_servers=fresh_broker.bootstrap,
                                        message_timeout_ms=2000))
    await sink.start()
    fresh_broker.stop()
    results: list[GatewayError | None] = []
    done = asyncio.Event()

    def on_result(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        results.append(error)
        if len(results) == 5:
            done.set()

    for i in range(5):
        sink.produce(Record(cluster="default", topic="gone", value=b"x%d" % i), on_result)
    assert sink.in_flight == 5
    await asyncio.wait_for(done.wait(), 20)
    assert sink.in_flight == 0 and sink.failed == 5
    assert all(isinstance(e, DeliveryFailed) for e in results)
    first = results[0]
    assert isinstance(first, DeliveryFailed)
    assert first.retriable and first.kafka_code  # a timeout: worth retrying later
    assert await sink.close(2) == 0


async def test_recovers_after_an_outage_longer_than_the_message_timeout(
    fresh_broker: Broker,
) -> None:
    """Records time out during a long hang; afterwards, retried records get through.

    (The idempotent producer bumps its epoch after a timeout and tansu then fences
    it; the sink must replace the producer rather than fail every retry forever.)
    """
    sink = KafkaSink("default", Cluster(bootstrap_servers=fresh_broker.bootstrap,
                                        message_timeout_ms=1500))
    await sink.start()
    outcome: asyncio.Queue[GatewayError | None] = asyncio.Queue()

    def on_result(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        outcome.put_nowait(error)

    sink.produce(Record(cluster="default", topic="long-hang", value=b"warm"), on_result)
    assert await asyncio.wait_for(outcome.get(), 20) is None
    fresh_broker.pause()
    try:
        sink.produce(Record(cluster="default", topic="long-hang", value=b"during"), on_result)
        error = await asyncio.wait_for(outcome.get(), 20)
        assert isinstance(error, DeliveryFailed) and error.retriable
    finally:
        fresh_broker.resume()
    # Retry as the buffer does: a retriable failure is sent again.
    deadline = time.monotonic() + 30
    delivered = False
    while not delivered and time.monotonic() < deadline:
        sink.produce(Record(cluster="default", topic="long-hang", value=b"after"), on_result)
        error = await asyncio.wait_for(outcome.get(), 20)
        delivered = error is None
        if error is not None:
            assert isinstance(error, DeliveryFailed) and error.retriable, error
            await asyncio.sleep(0.5)
    assert delivered, "the sink never recovered after the outage"
    await sink.close(5)
    values = [m.value() for m in await asyncio.to_thread(fresh_broker.read, "long-hang", 2, 10)]
    assert values.count(b"after") == 1 and b"warm" in values


@pytest.mark.parametrize("bad", [2, 12])  # refused in the one call / from the backlog
async def test_produce_many_keeps_order_through_a_full_queue_and_a_refusal(
        broker: Broker, bad: int) -> None:
    """One ``produce_many`` call: librdkafka's queue takes 5 records, the rest wait in the
    backlog; a record librdkafka cannot take (a header name it cannot encode) fails
    alone; every other record reaches Kafka in the order given, each reported once."""
    topic = f"sink-produce-many-{bad}"
    sink = KafkaSink("default", Cluster(bootstrap_servers=broker.bootstrap,
                                        queue_max_messages=5))
    await sink.start()
    reports: list[tuple[int, Delivery | None, GatewayError | None]] = []
    done = asyncio.Event()
    n = 30

    def on_result(record: Record, delivery: Delivery | None, error: GatewayError | None) -> None:
        reports.append((int(record.value), delivery, error))
        if len(reports) == n:
            done.set()

    records = [Record(cluster="default", topic=topic, value=str(i).encode(), key=b"one",
                      headers=[("bad\udc80" if i == bad else "ok", b"v")]) for i in range(n)]
    sink.produce_many(records, on_result)
    # 5 handed to librdkafka, the rest waiting in order; refused at once when it came first
    assert sink.in_flight == (n - 1 if bad < 5 else n)
    await asyncio.wait_for(done.wait(), 30)
    await sink.close(10)
    assert sorted(i for i, _, _ in reports) == list(range(n))  # each exactly once
    failed = [(i, e) for i, _, e in reports if e is not None]
    assert [i for i, _ in failed] == [bad]
    assert isinstance(failed[0][1], DeliveryFailed) and not failed[0][1].retriable
    offsets = [d.offset for i, d, _ in sorted(reports, key=lambda r: r[0]) if d is not None]
    assert offsets == sorted(offsets) and len(set(offsets)) == n - 1
    got = await asyncio.to_thread(broker.read_all, topic, 30)
    assert [int(m.value()) for m in got] == [i for i in range(n) if i != bad]
