"""The in-memory buffer: records in flight to Kafka, bounded in bytes.

With the spool off this is the whole buffer: a record's ack resolves on its
Kafka delivery report, and while too many bytes wait for reports the flow
signal pauses every source (TCP backpressure, HTTP 503).
"""

from __future__ import annotations

import structlog

from gateway.buffer.flow import FlowControl
from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Delivery, Record, record_size
from gateway.sinks.kafka import KafkaSink

log = structlog.get_logger("lastmile.buffer")


def unknown_cluster(record: Record) -> DeliveryFailed:
    return DeliveryFailed(f"no Kafka cluster named '{record.cluster}'")


def sink_for(sinks: dict[str, KafkaSink], record: Record) -> KafkaSink | None:
    """The sink of ``record.cluster``; None, with the record's ack failed, if there is none."""
    sink = sinks.get(record.cluster)
    if sink is None and record.ack is not None:
        record.ack.record_failed(unknown_cluster(record))
    return sink


class MemoryBuffer:
    def __init__(self, sinks: dict[str, KafkaSink], high_water: int, low_water: int) -> None:
        self.sinks = sinks
        self.flow = FlowControl(high_water, low_water)
        self.failed = 0

    async def start(self) -> None:
        return None

    def submit(self, record: Record) -> None:
        sink = sink_for(self.sinks, record)
        if sink is None:
            return
        self.flow.add(record_size(record))
        sink.produce(record, self._on_delivery)

    def _on_delivery(self, record: Record, delivery: Delivery | None,
                     error: GatewayError | None) -> None:
        self.flow.remove(record_size(record))
        ack = record.ack
        if ack is None:
            return
        if error is None and delivery is not None:
            ack.record_safe(delivery)
        else:
            self.failed += 1
            ack.record_failed(error or DeliveryFailed("no delivery report"))

    async def close(self, timeout: float) -> None:
        return None  # the sinks flush themselves; nothing is held here

    def stats(self) -> dict[str, int]:
        return {"pending_bytes": self.flow.pending_bytes, "failed": self.failed}
