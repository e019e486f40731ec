"""Sink doubles: the same ``gateway.buffer.sink.Sink`` interface the buffers use in production."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Delivery, Record

Callback = Callable[[Record, Delivery | None, GatewayError | None], None]


class PartitionedKafka:
    """Shaped like a partitioned Kafka behind librdkafka: one FIFO per partition, reports
    in hand-over order per partition, the test decides when and how each one ends."""

    def __init__(self, partitions: int = 2) -> None:
        self.queues: list[deque[tuple[Record, Callback]]] = [deque() for _ in range(partitions)]
        self.log: list[tuple[int, bytes]] = []  # (partition, value) as written, in order
        self.refusing = False

    def partition(self, record: Record) -> int:
        return (record.key or b"\0")[-1] % len(self.queues)

    def produce(self, record: Record, callback: Callback) -> None:
        if self.refusing:  # like KafkaSink while a restarted producer's reports are pending
            callback(record, None, DeliveryFailed("producer restarting", retriable=True))
            return
        self.queues[self.partition(record)].append((record, callback))

    def produce_many(self, records: list[Record], callback: Callback) -> None:
        for record in records:
            self.produce(record, callback)

    def queued(self) -> int:
        return sum(len(q) for q in self.queues)

    def deliver(self, partition: int | None = None) -> int:
        n = 0
        for p, queue in enumerate(self.queues):
            if partition is not None and p != partition:
                continue
            while queue:
                record, callback = queue.popleft()
                self.log.append((p, record.value))
                callback(record, Delivery(cluster=record.cluster, topic=record.topic,
                                          partition=p, offset=len(self.log)), None)
                n += 1
        return n

    def fail_front(self, partition: int, retriable: bool = True) -> Record:
        record, callback = self.queues[partition].popleft()
        callback(record, None, DeliveryFailed("Local: Purged in queue", retriable=retriable))
        return record

    def values(self) -> list[bytes]:
        return [v for _, v in self.log]


def assert_key_order(written: list[bytes], sent: list[bytes]) -> None:
    """Every sent value is written, and first appearances keep the sent order."""
    first: list[bytes] = []
    for value in written:
        if value not in first:
            first.append(value)
    wanted = [v for v in sent if v in first]
    assert wanted == sent, f"missing: {set(sent) - set(first)}"
    assert [v for v in first if v in sent] == sent, f"order broken: {first} (sent {sent})"
