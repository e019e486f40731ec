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

    def submit_many(self, records: list[Record]) -> None:
        """Every record to its sink in one ``produce_many`` call per cluster, their bytes
        counted in the flow signal as one sum, released when the last is reported."""
        sinks = self.sinks
        runs: dict[str, list[Record]] = {}
        for record in records:
            run = runs.get(record.cluster)
            if run is None:
                if sink_for(sinks, record) is None:  # fails the record's ack
                    continue
                run = runs[record.cluster] = []
            run.append(record)
        for cluster, run in runs.items():
            group = _Group(self, sum(map(record_size, run)), len(run))
            self.flow.add(group.size)
            sinks[cluster].produce_many(run, group)

    def _on_delivery(self, record: Record, delivery: Delivery | None,
                     error: GatewayError | None) -> None:
        self.flow.remove(record_size(record))
        self._settle(record, delivery, error)

    def _settle(self, record: Record, delivery: Delivery | None,
                error: GatewayError | None) -> None:
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


class _Group:
    """The delivery callback of the records of one ``submit_many`` to one sink."""

    __slots__ = ("buffer", "left", "size")

    def __init__(self, buffer: MemoryBuffer, size: int, count: int) -> None:
        self.buffer = buffer
        self.size = size
        self.left = count

    def __call__(self, record: Record, delivery: Delivery | None,
                 error: GatewayError | None) -> None:
        self.left -= 1
        if not self.left:
            self.buffer.flow.remove(self.size)
        self.buffer._settle(record, delivery, error)
