"""The in-memory buffer: records in flight to Kafka, bounded in bytes.

With the spool off this is the whole buffer: a record's ack resolves on its
Kafka delivery report, and while too many bytes wait for reports the flow
signal pauses every source (TCP backpressure, HTTP 503).
"""

from __future__ import annotations

import structlog

from gateway.buffer.flow import FlowControl
from gateway.buffer.sink import Sinks, sink_for
from gateway.errors import DeliveryFailed, GatewayError
from gateway.model import Delivery, Record, record_size

log = structlog.get_logger("lastmile.buffer")


class MemoryBuffer:
    via_spool = False  # every ack waits for Kafka's delivery report

    def __init__(self, sinks: Sinks, high_water: int, low_water: int) -> None:
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

    def drain(self) -> dict[str, dict[str, float]]:
        return {}  # no spool: nothing is ever owed to Kafka from disk
