"""Between routing and the Kafka sinks: the bounded queue and the durable spool.

Every buffer implements the same small surface (``Buffer``) so the pipeline does
not care whether records are only in memory or also on disk.
"""

from __future__ import annotations

from typing import Protocol

from gateway.buffer.flow import FlowControl
from gateway.model import Record

__all__ = ["Buffer", "FlowControl"]


class Buffer(Protocol):
    flow: FlowControl
    @property
    def via_spool(self) -> bool:
        """True while acks come from the spool before Kafka has the record (write-ahead
        mode, or draining an outage): what Kafka will refuse must be caught before."""

    def submit(self, record: Record) -> None:
        """Take one record (with ``record.ack`` set); resolve its ack when safe or failed."""

    def submit_many(self, records: list[Record]) -> None:
        """``submit`` of each record in order (an HTTP batch), sharing what can be shared."""

    async def start(self) -> None: ...

    async def close(self, timeout: float) -> None:
        """Stop, flush what can be flushed within ``timeout``, fail the rest."""

    def stats(self) -> dict[str, int]: ...

    def drain(self) -> dict[str, dict[str, float]]:
        """Per priority ("normal", "high"): backlog, oldest record age, drain rate
        (``SpoolBuffer.drain_stats``); empty without a spool."""
