"""SpoolBuffer: the buffer when the spool is on (``spool.enabled``).

Two modes (``spool.mode``), one code path:

- ``kafka`` (hand-off): a record goes straight to Kafka and its ack waits for
  the delivery report.  When Kafka has not confirmed the oldest record within
  ``spill_after_ms``, or reports a retriable failure, every record still in
  flight is *spilled*: appended to the spool in submission order and acked
  after the fsync.  From then on new records go through the spool too, until
  the replayer has caught up, so a key's order holds across the outage.
- ``write-ahead``: every record goes through the spool (ack after fsync) and
  the replayer produces it to Kafka; the ledger advances on delivery reports.

The replayer reads durable records back in seq order (on its own thread) and
produces them with a bounded window, yielding to the loop between chunks so
live traffic is not starved.  A spilled record whose direct produce is still
open blocks the replayer until librdkafka settles it (and every other direct
produce still open): delivered -> skipped, failed -> replayed.  A replay is
handed to the sink only when no direct produce is open, so it never queues
behind a younger record of its key.  Retriable replay failures rewind to the
watermark after a pause; permanent ones go to ``dead_letter`` or are logged as
lost after ack.  docs/spool.md ("Order across the two paths") has the cases.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from gateway.buffer.flow import FlowControl
from gateway.buffer.sink import Sinks, sink_for
from gateway.buffer.spool import Budget, Spool, SpoolFull
from gateway.buffer.spool_replay import DeadLetter, Gate, Replayer
from gateway.buffer.storage import Storage
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.errors import GatewayError, ShuttingDown, SpoolError
from gateway.model import Delivery, Record, record_size

log = structlog.get_logger("lastmile.spool")

BROKEN_PAUSE_S = 1.0


class Entry:
    """One submitted record while the buffer still holds it in memory.

    It is also the delivery callback of its direct produce (``__call__``), so no
    bound method and no id -> entry map is needed per record.
    """

    __slots__ = ("acked", "at", "buffer", "cancelled", "direct_ok", "direct_open", "record",
                 "seq", "size", "spilled")

    def __init__(self, buffer: SpoolBuffer, record: Record, size: int, at: float) -> None:
        self.buffer = buffer
        self.record = record
        self.size = size
        self.at = at
        self.seq = -1
        self.acked = False
        self.spilled = False  # went to the spool after a direct produce
        self.direct_open = False  # a direct produce is still unsettled in librdkafka
        self.direct_ok = False  # ... and it was delivered
        self.cancelled = False  # Kafka refused it for good before it was acked

    def __call__(self, record: Record, delivery: Delivery | None,
                 error: GatewayError | None) -> None:
        self.buffer._on_direct(self, delivery, error)

    def resolve(self, delivery: Delivery | None, error: GatewayError | None) -> None:
        """Resolve the ack exactly once, whichever path (Kafka or spool) gets there first."""
        if self.acked:
            return
        self.acked = True
        ack = self.record.ack
        if ack is None:
            return
        if delivery is not None:
            ack.record_safe(delivery)
        else:
            ack.record_failed(error or SpoolError())


class SpoolBuffer:
    def __init__(self, sinks: Sinks, spool: SpoolConfig, buffer: BufferConfig,
                 directory: str | os.PathLike[str] | None = None, *,
                 dead_letter: DeadLetter | None = None, storage: Storage | None = None,
                 flow: FlowControl | None = None, budget: Budget | None = None,
                 limit: int | None = None, name: str = "") -> None:
        self.sinks = sinks
        self.config = spool
        self.write_ahead = spool.mode == "write-ahead"
        self.name = name  # "" alone; "normal" / "high" under a PrioritySpoolBuffer
        # Bytes held in memory (not yet safe) drive the hysteresis; "spool full" and
        # "spool broken" are holds on the same signal (shared by both priorities).
        self.flow = flow or FlowControl(buffer.high_water_bytes, buffer.low_water_bytes)
        suffix = f" ({name})" if name else ""
        self._hold_full, self._hold_broken = "spool full" + suffix, "spool broken" + suffix
        self.spool = Spool(os.fspath(directory or spool.dir), max_bytes=spool.max_bytes,
                           segment_bytes=spool.segment_bytes,
                           fsync_interval_ms=spool.fsync_interval_ms, storage=storage,
                           budget=budget, limit=limit)
        # Buffers sharing the byte budget: space one frees may let the other append.
        self.peers: list[SpoolBuffer] = []
        self.counters: dict[str, int] = dict.fromkeys(
            ("submitted", "delivered", "spooled_acks", "spilled", "failed", "spool_write_failed",
             "replayed", "skipped", "dead_lettered", "lost_after_ack", "replay_retries"), 0)
        self.replayer = Replayer(self.spool, sinks, self, self.counters, mode=spool.mode,
                                 dead_letter=dead_letter)
        self.via_spool = self.write_ahead
        self.full = False
        self.broken = False
        self.closing = False
        # Direct produces in submission order; settled ones leave from the left.
        self._direct: deque[Entry] = deque()
        self.waiting: deque[Entry] = deque()  # must go to the spool, not appended yet
        self.unsynced: deque[Entry] = deque()  # appended, fsync pending
        self.spilled: dict[int, Entry] = {}  # seq -> spilled entry, until the replayer passes it
        self._tick_handle: asyncio.TimerHandle | None = None
        # Submission time for spill_after_ms, read once per tick rather than once per record:
        # the next tick's time, so a record's age is never overestimated and spill never
        # comes early (it is judged at ticks anyway).
        self._stamp = time.monotonic() + self._tick_s()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-read")

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        recovery = await loop.run_in_executor(None, self.spool.recover)
        self.spool.start(self._on_durable, self._on_freed)
        self.via_spool = self.write_ahead or recovery.records > 0
        self.replayer.start(recovery.watermark, self._reader, draining=recovery.records > 0)
        self._tick_handle = loop.call_later(self._tick_s(), self._tick)
        log.info("spool_buffer_started", dir=self.spool.directory, mode=self.config.mode,
                 recovered_records=recovery.records, fsync_interval_ms=self.spool.interval * 1e3)

    async def close(self, timeout: float) -> None:
        """Spill what Kafka has not settled, fsync, drain while progress is made, stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.closing = True
        await _poll_until(lambda: not self._direct_pending(), deadline - timeout / 2)
        if self._direct_pending():
            self._spill(None, "shutdown")
        await _poll_until(lambda: not (self.waiting or self.unsynced), deadline)
        while self.waiting:
            entry = self.waiting.popleft()
            self._release(entry.size)
            entry.resolve(None, ShuttingDown("spool full at shutdown; not saved"))
        await self.replayer.stop(deadline)
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        await self.spool.close()
        self._reader.shutdown(wait=True)
        log.info("spool_buffer_stopped", dir=self.spool.directory, **self.stats())

    def stats(self) -> dict[str, int]:
        rp = self.replayer
        return {
            **self.counters,
            "pending_bytes": self.flow.pending_bytes,
            "spool_bytes": self.spool.used_bytes,
            "spool_records": max(0, self.spool.next_seq - rp.watermark()),
            "spool_segments": self.spool.segment_count(),
            "spool_fsyncs": self.spool.fsyncs,
            "spool_write_errors": self.spool.write_errors,
            "replay_in_flight": rp.outstanding,
            "waiting_for_spool": len(self.waiting),
            "via_spool": int(self.via_spool),
        }

    def drain_stats(self) -> dict[str, float]:
        """What an operator watches while a backlog drains (/metrics, /readyz)."""
        rp = self.replayer
        watermark = rp.watermark()
        records_per_s, bytes_per_s = rp.rates()
        return {
            "backlog_records": max(0, self.spool.next_seq - watermark),
            "backlog_bytes": self.spool.used_bytes,
            "oldest_record_age_seconds": round(self.spool.oldest_age(watermark, time.time()), 3),
            "drain_records_per_second": round(records_per_s, 1),
            "drain_bytes_per_second": round(bytes_per_s, 1),
            "replayed_records": self.counters["replayed"],
            "replayed_bytes": rp.replayed_bytes,
            "draining": int(rp.draining),
            "held_for_high_priority": int(rp.held),
        }

    def drain(self) -> dict[str, dict[str, float]]:
        return {self.name or "normal": self.drain_stats()}

    # --- intake -----------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        if self.closing:
            if record.ack is not None:
                record.ack.record_failed(ShuttingDown())
            return
        sink = self.sinks.get(record.cluster)
        if sink is None:
            sink_for(self.sinks, record)  # fails the record's ack
            return
        size = record_size(record)
        entry = Entry(self, record, size, self._stamp)
        self.counters["submitted"] += 1
        self.flow.add(size)
        if self.via_spool:
            self.waiting.append(entry)
            self.pump()
        else:
            entry.direct_open = True
            self._direct.append(entry)
            sink.produce(record, entry)

    def submit_many(self, records: list[Record]) -> None:
        """One ``submit`` per record: each decides alone whether it goes straight to Kafka
        or through the spool (a spill halfway through the batch sends the rest there)."""
        for record in records:
            self.submit(record)

    def pump(self) -> None:
        """Append waiting records in order while the spool has room and is healthy."""
        spool = self.spool
        while self.waiting and not self.broken:
            entry = self.waiting[0]
            if entry.direct_ok or entry.cancelled:  # Kafka settled it while it waited
                self.waiting.popleft()
                self._release(entry.size)
                continue
            try:
                entry.seq = spool.append(entry.record)
            except SpoolFull:
                if spool.budget.used == 0:  # larger than the whole spool: can never fit
                    self.waiting.popleft()
                    self._release(entry.size)
                    entry.resolve(None, SpoolError("record larger than spool.max_bytes"))
                    continue
                if not self.full:
                    self.full = True
                    log.warning("spool_full", dir=spool.directory, bytes=spool.used_bytes,
                                max_bytes=spool.max_bytes, waiting=len(self.waiting))
                    self.flow.hold(self._hold_full, True)
                return
            self.waiting.popleft()
            self.unsynced.append(entry)
            if entry.spilled:
                self.spilled[entry.seq] = entry
        if self.full and not self.waiting:
            self.full = False
            log.info("spool_space_available", dir=spool.directory, bytes=spool.used_bytes)
            self.flow.hold(self._hold_full, False)

    # --- callbacks from the writer thread and Kafka (on the loop) ---------------------

    def _on_durable(self, first: int, last: int, error: OSError | None) -> None:
        self.replayer.durable_seq = last
        unsynced = self.unsynced
        durable: list[tuple[int, Record]] = []
        while unsynced and unsynced[0].seq <= last:
            entry = unsynced.popleft()
            self._release(entry.size)
            if error is None:
                durable.append((entry.seq, entry.record))
                if not entry.acked and not entry.cancelled:
                    self.counters["spooled_acks"] += 1
                entry.resolve(Delivery(cluster=entry.record.cluster, topic=entry.record.topic,
                                       spooled=True), None)
            else:
                self.spilled.pop(entry.seq, None)
                self.counters["spool_write_failed"] += 1
                entry.resolve(None, SpoolError(f"spool write failed: {error}"))
        if error is not None:
            self._spool_broke(error, first, last)
        elif durable and durable[0][0] == first and len(durable) == last - first + 1:
            self.replayer.offer(durable)  # replayed from memory, not read back, when next
        self.replayer.wake()

    def _spool_broke(self, error: OSError, first: int, last: int) -> None:
        """Stop taking data (no acks for unsaved records); try again after a pause."""
        log.error("spool_write_failed", dir=self.spool.directory, error=str(error),
                  errno=error.errno, first_seq=first, last_seq=last,
                  note="acks of these records failed; intake paused")
        self.broken = True
        self.flow.hold(self._hold_broken, True)
        asyncio.get_running_loop().call_later(BROKEN_PAUSE_S, self._spool_retry)

    def _spool_retry(self) -> None:
        self.broken = False
        self.flow.hold(self._hold_broken, False)
        self.pump()

    def _on_freed(self, nbytes: int) -> None:
        self.pump()
        for peer in self.peers:
            peer.pump()

    def _direct_pending(self) -> bool:
        """Drop settled entries from the front; True while any direct produce is open."""
        direct = self._direct
        while direct and not direct[0].direct_open:
            direct.popleft()
        return bool(direct)

    def _on_direct(self, entry: Entry, delivery: Delivery | None,
                   error: GatewayError | None) -> None:
        if not entry.direct_open:
            return
        entry.direct_open = False
        self._direct_pending()  # drop settled entries from the front
        if entry.spilled:  # the spool holds it too; tell the replayer what Kafka said
            if error is None:
                entry.direct_ok = True
                entry.resolve(delivery, None)
            elif not error.retriable and not entry.acked:
                entry.cancelled = True
                entry.resolve(None, error)
            self.replayer.wake()
            return
        if error is None:
            self._release(entry.size)
            self.counters["delivered"] += 1
            entry.resolve(delivery, None)
        elif error.retriable and not self.closing:
            self._spill(entry, f"retriable error: {error.message}")
        else:
            self._release(entry.size)
            self.counters["failed"] += 1
            entry.resolve(None, error)

    def _spill(self, failed: Entry | None, reason: str) -> None:
        """Send every record Kafka has not settled to the spool, in submission order.

        ``failed`` (a retriable failure) may be younger than records still open (a
        sink can refuse a new record at once while older ones wait for their
        reports): it takes its own place, never the front.
        """
        entries = [e for e in self._direct
                   if (e.direct_open or e is failed) and not e.spilled]
        if failed is not None and not failed.spilled and failed not in entries:
            entries.insert(0, failed)  # it was the oldest: already left the front
        for entry in entries:
            entry.spilled = True
            self.waiting.append(entry)
        self.counters["spilled"] += len(entries)
        if not self.via_spool:
            self.via_spool = True
            self.replayer.draining_since(reason)
        log.warning("spool_spill", reason=reason, records=len(entries))
        self.pump()

    # --- memory bound and timers -----------------------------------------------------

    @property
    def mem_bytes(self) -> int:
        """Bytes of records held in memory: not yet safe (on disk or in Kafka)."""
        return self.flow.pending_bytes

    def _release(self, nbytes: int) -> None:
        self.flow.remove(nbytes)

    # --- what the replayer asks (its whole view of this buffer) -------------------

    def replay_gate(self, seq: int) -> Gate:
        """May the replayer hand ``seq`` to a sink now?

        Not while any direct produce is open: a replay queued behind it in the
        producer could land after a younger record of its key (a spilled record
        whose direct attempt fails while a younger one's is still open).
        """
        if self._direct_pending():
            return Gate.WAIT
        entry = self.spilled.pop(seq, None)
        if entry is not None and (entry.direct_ok or entry.cancelled):
            return Gate.SKIP  # Kafka settled it on the direct path
        return Gate.PRODUCE

    def intake_idle(self) -> bool:
        """Nothing waits to be written or synced, and the spool takes writes."""
        return not (self.waiting or self.unsynced or self.broken)

    def replay_caught_up(self) -> None:
        """Every spooled record is confirmed: new records may go straight to Kafka."""
        if not self.write_ahead:
            self.via_spool = False

    def _tick_s(self) -> float:
        return min(0.25, self.config.spill_after_ms / 4000.0)

    def _tick(self) -> None:
        tick = self._tick_s()
        self._tick_handle = asyncio.get_running_loop().call_later(tick, self._tick)
        now = time.monotonic()
        self._stamp = now + tick
        oldest = next((e for e in self._direct if e.direct_open and not e.spilled), None)
        if oldest is not None and not self.closing:
            age_ms = (now - oldest.at) * 1000.0
            if age_ms >= self.config.spill_after_ms:
                self._spill(None, f"Kafka has not confirmed for {age_ms:.0f} ms")
        self.replayer.tick()


async def _poll_until(done: Callable[[], bool], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(max(0, int((deadline - loop.time()) / 0.01))):
        if done() or loop.time() >= deadline:
            return
        await asyncio.sleep(0.01)
