"""Priority drain: two spools per worker, high-priority records drained first.

A rule with ``priority: high`` marks its records (``Record.high_priority``).
They go to their own ``SpoolBuffer`` (directory ``<worker dir>/high/``), the
rest to the normal one (``<worker dir>/``, as before).  Each is the full
spool of docs/spool.md (hand-off or write-ahead, its own segments, ledger and
replayer), so per-key order within a priority holds exactly as before.

The one link: the normal replayer hands nothing to Kafka while the high one is
draining an outage and still owes records (``hold_back``), so after an outage
alarms reach Kafka before the telemetry backlog.  Order *across* priorities
is not kept (docs/spool.md, "Priority drain").

Both spools share one byte budget (``spool.max_bytes`` bounds their sum) and
one flow signal.  The normal spool stops short of the budget by
``HIGH_RESERVE`` so a full telemetry backlog still leaves room for alarms.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.buffer.flow import FlowControl
from gateway.buffer.sink import Sinks
from gateway.buffer.spool import Budget
from gateway.buffer.spool_replay import DeadLetter
from gateway.buffer.spooled import SpoolBuffer
from gateway.buffer.storage import Storage
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Record

HIGH_DIR = "high"
# Share of spool.max_bytes only the high-priority spool may fill.
HIGH_RESERVE = 16


class PrioritySpoolBuffer:
    def __init__(self, sinks: Sinks, spool: SpoolConfig, buffer: BufferConfig,
                 directory: str | os.PathLike[str] | None = None, *,
                 dead_letter: DeadLetter | None = None, storage: Storage | None = None) -> None:
        base = Path(os.fspath(directory or spool.dir))
        self.flow = FlowControl(buffer.high_water_bytes, buffer.low_water_bytes)
        self.budget = Budget(spool.max_bytes)
        reserve = spool.max_bytes // HIGH_RESERVE
        self.normal = SpoolBuffer(sinks, spool, buffer, base, dead_letter=dead_letter,
                                  storage=storage, flow=self.flow, budget=self.budget,
                                  limit=spool.max_bytes - reserve, name="normal")
        self.high = SpoolBuffer(sinks, spool, buffer, base / HIGH_DIR, dead_letter=dead_letter,
                                storage=storage, flow=self.flow, budget=self.budget,
                                name="high")
        self.normal.peers.append(self.high)
        self.high.peers.append(self.normal)
        self._owed_to: int | None = None
        self.normal.replayer.hold_back = self._high_owes

    def _high_owes(self) -> bool:
        """The high spool is draining an outage and Kafka has not confirmed all of it.

        Latched to a seq: once the high replayer is seen draining, the normal one
        waits until every high record spooled by then is confirmed (and looks again).
        write-ahead ends its "draining" state a little before the backlog is gone.
        """
        high = self.high
        rp = high.replayer
        mark = rp.watermark()
        if self._owed_to is not None and mark >= self._owed_to:
            self._owed_to = None
        if self._owed_to is None and rp.draining and high.spool.next_seq > mark:
            self._owed_to = high.spool.next_seq
        return self._owed_to is not None

    @property
    def via_spool(self) -> bool:
        return self.normal.via_spool or self.high.via_spool

    def submit(self, record: Record) -> None:
        (self.high if record.high_priority else self.normal).submit(record)

    def submit_many(self, records: list[Record]) -> None:
        for record in records:
            (self.high if record.high_priority else self.normal).submit(record)

    async def start(self) -> None:
        await self.high.start()
        await self.normal.start()

    async def close(self, timeout: float) -> None:
        await asyncio.gather(self.high.close(timeout), self.normal.close(timeout))

    def stats(self) -> dict[str, int]:
        """The counters of both spools summed (``via_spool``: either)."""
        out = self.normal.stats()
        for name, value in self.high.stats().items():
            if name == "pending_bytes":
                continue  # one flow signal: counted once
            out[name] = max(out[name], value) if name == "via_spool" else out[name] + value
        return out

    def drain(self) -> dict[str, dict[str, float]]:
        return {"normal": self.normal.drain_stats(), "high": self.high.drain_stats()}
