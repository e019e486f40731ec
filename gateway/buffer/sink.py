"""The buffer's view of a sink: hand over a record, hear its fate later on the loop.

``gateway/sinks/kafka.KafkaSink`` satisfies it structurally; the buffer never
imports the Kafka module, so tests drive every buffer through a double of this
same interface (holding, reordering or failing records on purpose).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Delivery, Record

# (record, delivery or None, error or None), always called on the event loop.
DeliveryCallback = Callable[[Record, Delivery | None, GatewayError | None], None]


class Sink(Protocol):
    def produce(self, record: Record, callback: DeliveryCallback) -> None:
        """Take one record; ``callback`` runs exactly once, on the event loop (later, or
        before ``produce`` returns when the record is refused at once).

        Records of one partition are delivered in the order they were handed over.
        """

    def produce_many(self, records: list[Record], callback: DeliveryCallback) -> None:
        """``produce`` of each record in order, in one call (one callback per record)."""


Sinks = Mapping[str, Sink]


def unknown_cluster(record: Record) -> DeliveryFailed:
    return DeliveryFailed(f"no Kafka cluster named '{record.cluster}'")


def sink_for(sinks: Sinks, record: Record) -> Sink | None:
    """The sink of ``record.cluster``; None, with the record's ack failed, if there is none."""
    sink = sinks.get(record.cluster)
    if sink is None and record.ack is not None:
        record.ack.record_failed(unknown_cluster(record))
    return sink
