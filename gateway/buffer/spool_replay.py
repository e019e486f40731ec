"""The replayer: produces spooled records to Kafka in seq order and advances the watermark.

Watermark bookkeeping: ``inflight`` holds the seqs produced (or skipped) in
order; a seq leaves its front once settled.  The watermark -- every seq below it
is in Kafka, dead-lettered, or counted lost -- is the first unsettled seq, else
the first seq read ahead but not produced, else the read cursor.  The cursor
steps over seqs that never reached the disk (a failed write), so gaps need no
bookkeeping.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

import structlog

from gateway.buffer.sink import Sinks, unknown_cluster
from gateway.buffer.spool import Spool
from gateway.errors import GatewayError
from gateway.model import Delivery, Record, record_size

log = structlog.get_logger("lastmile.spool")

DeadLetter = Callable[[Record, str], Record | None]


class Gate(enum.Enum):
    """The buffer's word on one spooled seq (see ``Host.replay_gate``)."""

    WAIT = "wait"  # a direct produce is still open: hand nothing over yet
    SKIP = "skip"  # Kafka settled it on the direct path
    PRODUCE = "produce"


class Host(Protocol):
    """What the replayer needs from the buffer that feeds the spool, and nothing else."""

    def replay_gate(self, seq: int) -> Gate: ...

    def intake_idle(self) -> bool:
        """No record waits to be appended or fsynced, and the spool takes writes."""

    def replay_caught_up(self) -> None:
        """Called when every spooled record is settled and intake is idle."""

WINDOW = 20_000  # replayed records in flight to librdkafka at most
CHUNK = 2_000  # records per disk read
# Records handed to librdkafka per turn of the loop: live traffic (acks from the spool,
# reads from clients) runs between turns, so a turn is kept to a few milliseconds.
PRODUCE_TURN = 500
RATE_WINDOW_S = 10.0  # the drain rate is measured over this much recent time
RETRY_PAUSE_S = 0.5
PROGRESS_EVERY_S = 1.0
DRAIN_LOG_MIN = 1_000  # write-ahead: below this backlog the spool is just doing its job


class Replayer:
    def __init__(self, spool: Spool, sinks: Sinks, host: Host, counters: dict[str, int], *,
                 mode: str, dead_letter: DeadLetter | None) -> None:
        self.spool = spool
        self.sinks = sinks
        self.host = host
        self.counters = counters
        self.mode = mode
        self.write_ahead = mode == "write-ahead"
        self.dead_letter = dead_letter
        self.cursor = 0
        # The last seq the loop has heard is written (the buffer's durable callback). The
        # writer thread's ``spool.written_seq`` moves first; reading up to it would read
        # back the very batch whose callback, already on its way, offers it from memory.
        self.durable_seq = -1
        self.readahead: deque[tuple[int, Record]] = deque()
        self.inflight: deque[int] = deque()
        self.done: set[int] = set()
        self.outstanding = 0
        self.rewind = False
        self.draining = False
        self._drain_from = 0.0
        self._replayed_at_start = 0
        self._progress_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: Executor | None = None
        self._stopping = False
        self._reading = False  # a disk read is on its way (offers wait for it)
        self._offered: list[list[tuple[int, Record]]] = []  # offered during that read
        # Priority drain: while this returns True nothing is handed to a sink (the
        # high-priority spool of the same worker still owes records to Kafka).
        self.hold_back: Callable[[], bool] | None = None
        self.held = False
        self.replayed_bytes = 0
        # (monotonic time, replayed, replayed bytes), one a second, RATE_WINDOW_S of them.
        self._rate: deque[tuple[float, int, int]] = deque()

    def start(self, cursor: int, executor: Executor, draining: bool) -> None:
        self.cursor = cursor
        self.durable_seq = self.spool.written_seq  # what recovery found on disk
        self._executor = executor
        if draining:
            self.draining_since("records recovered from a previous run")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="spool-replay")

    def wake(self) -> None:
        self._wake.set()

    def offer(self, records: list[tuple[int, Record]]) -> bool:
        """Records just made durable (contiguous seqs, in order), still in memory.

        Taken as if read back from disk when they are exactly the next ones the
        replayer would read, so a caught-up spool (write-ahead, or a short spill)
        replays without a disk read, a decode and a reader-thread hop per batch.
        Offered during a disk read, they are kept until it returns and taken then
        if they continue it (else the disk has them): a replayer that fell behind
        once catches up again instead of reading every later batch back.
        Otherwise (behind, rewinding, read-ahead full) they are left to the disk.
        """
        if self.rewind or not records:
            return False
        if self._reading:
            if sum(map(len, self._offered)) < CHUNK:
                self._offered.append(records)
                return True
            return False
        return self._take(records)

    def _take(self, records: list[tuple[int, Record]]) -> bool:
        cursor = self.cursor
        first = records[0][0]
        if records[-1][0] < cursor:
            return True  # the disk read had them already
        if first < cursor:
            records = records[cursor - first:]  # seqs are contiguous: drop what was read
        if records[0][0] != cursor or len(self.readahead) >= CHUNK:
            return False
        self.readahead.extend(records)
        self.cursor = records[-1][0] + 1
        self._advance()
        return True

    def watermark(self) -> int:
        inflight, done = self.inflight, self.done
        while inflight and inflight[0] in done:
            done.discard(inflight.popleft())
        if inflight:
            return inflight[0]
        if self.readahead:
            return self.readahead[0][0]
        return self.cursor

    def _advance(self) -> None:
        self.spool.watermark = self.watermark()

    async def stop(self, deadline: float) -> None:
        """Keep draining while it makes progress (Kafka up), then stop; the rest stays on disk."""
        loop = asyncio.get_running_loop()
        last, still_since = self.watermark(), loop.time()
        while loop.time() < deadline and not self.caught_up():
            await asyncio.sleep(0.05)
            mark = self.watermark()
            if mark != last:
                last, still_since = mark, loop.time()
            elif loop.time() - still_since > 1.0:
                break
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._advance()

    # --- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                progressed = await self._step()
            except Exception:  # a bug here must not silently stop draining forever
                log.exception("spool_replay_error")
                progressed = False
                await asyncio.sleep(RETRY_PAUSE_S)
            if not progressed:
                await self._wake.wait()

    async def _step(self) -> bool:
        if self.rewind:
            if self.outstanding:
                return False
            await asyncio.sleep(RETRY_PAUSE_S)
            self._rewind()
            return True
        if self.outstanding >= WINDOW:
            return False
        hold = self.hold_back
        if hold is not None and hold():
            self.held = True  # woken by tick() to look again
            return False
        self.held = False
        if not self.readahead:
            if self.cursor > self.durable_seq:
                self._check_caught_up()
                return False
            loop = asyncio.get_running_loop()
            self._reading = True
            try:
                records, cursor = await loop.run_in_executor(self._executor, self.spool.read,
                                                             self.cursor, CHUNK)
            finally:
                self._reading = False
                offered, self._offered = self._offered, []
            if self.rewind:
                return True  # read raced a failure: discard, rewind first
            self.readahead.extend(records)
            self.cursor = cursor
            for batch in offered:  # what became durable during the read, if it follows on
                if not self._take(batch):
                    break
            self._advance()
            if not records:
                return True
        taken = self._produce_some()
        self._advance()
        await asyncio.sleep(0)  # let live traffic in between chunks
        return taken > 0

    def _produce_some(self) -> int:
        """Produce (or skip) from the read-ahead in order; returns how many were taken."""
        sent = taken = 0
        readahead, gate = self.readahead, self.host.replay_gate
        while readahead and self.outstanding < WINDOW and sent < PRODUCE_TURN:
            seq, record = readahead[0]
            verdict = gate(seq)
            if verdict is Gate.WAIT:
                break  # librdkafka may still deliver a direct attempt: wait for its verdict
            if verdict is Gate.SKIP:
                self.done.add(seq)
            readahead.popleft()
            taken += 1
            self.inflight.append(seq)
            if seq in self.done:
                self.counters["skipped"] += 1
                continue
            self._produce(seq, record)
            sent += 1
        return taken

    def _produce(self, seq: int, record: Record) -> None:
        sink = self.sinks.get(record.cluster)
        if sink is None:
            self._refused(seq, record, unknown_cluster(record))
            return
        self.outstanding += 1
        sink.produce(record, functools.partial(self._on_delivery, seq))

    def _on_delivery(self, seq: int, record: Record, delivery: Delivery | None,
                     error: GatewayError | None) -> None:
        self.outstanding -= 1
        if error is None:
            self.done.add(seq)
            self.counters["replayed"] += 1
            self.replayed_bytes += record_size(record)
        elif error.retriable:
            self._retry_later(error)
        else:
            self._refused(seq, record, error)
        self._advance()
        self._wake.set()

    def _retry_later(self, error: GatewayError) -> None:
        if not self.rewind:
            self.counters["replay_retries"] += 1
            log.warning("spool_replay_retry", reason=error.message, watermark=self.watermark())
        self.rewind = True

    def _rewind(self) -> None:
        """Start again from the first unsettled seq; settled ones after it are skipped."""
        self.cursor = self.watermark()
        self.readahead.clear()
        self.inflight.clear()
        self.rewind = False

    # --- records Kafka refuses for good (already acked: never failed back) -----------

    def _refused(self, seq: int, record: Record, error: GatewayError) -> None:
        reason = error.message
        target = self.dead_letter(record, reason) if self.dead_letter is not None else None
        if target is not None and target.cluster in self.sinks:
            self.outstanding += 1
            self.sinks[target.cluster].produce(
                target, functools.partial(self._on_dead_letter, seq, record))
            return
        self._lost(seq, record, reason)

    def _on_dead_letter(self, seq: int, original: Record, target: Record,
                        delivery: Delivery | None, error: GatewayError | None) -> None:
        self.outstanding -= 1
        if error is None:
            self.done.add(seq)
            self.counters["dead_lettered"] += 1
            log.warning("spool_record_dead_lettered", topic=original.topic, seq=seq,
                        dead_letter_topic=target.topic)
        elif error.retriable:
            self._retry_later(error)
        else:
            self._lost(seq, original, f"dead-letter topic refused it too: {error.message}")
        self._advance()
        self._wake.set()

    def _lost(self, seq: int, record: Record, reason: str) -> None:
        self.done.add(seq)
        self.counters["lost_after_ack"] += 1
        log.error("spool_record_lost_after_ack", cluster=record.cluster, topic=record.topic,
                  seq=seq, reason=reason,
                  note="acknowledged to the client from the spool; Kafka refused it for good "
                       "and no dead-letter topic took it")

    # --- drain state and progress --------------------------------------------------------

    def caught_up(self) -> bool:
        """Every spooled record is settled (none read ahead, in flight or to retry) and
        intake is idle.  Only then may new records bypass the spool (``kafka`` mode): a
        replay still in flight could fail, be retried, and land behind them."""
        return (not self.readahead and not self.rewind and self.outstanding == 0
                and self.cursor >= self.spool.next_seq and self.host.intake_idle())

    def _check_caught_up(self) -> None:
        if self.write_ahead:
            if self.draining and self.spool.next_seq - self.watermark() < DRAIN_LOG_MIN // 2:
                self._drain_done()
            return
        if not self.caught_up():
            return
        self.host.replay_caught_up()
        if self.draining:
            self._drain_done()

    def _drain_done(self) -> None:
        self.draining = False
        replayed = self.counters["replayed"] - self._replayed_at_start
        log.info("spool_drain_complete", replayed=replayed,
                 seconds=round(time.monotonic() - self._drain_from, 2))

    def draining_since(self, reason: str) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_from = time.monotonic()
        self._replayed_at_start = self.counters["replayed"]
        log.warning("spool_drain_started", reason=reason, mode=self.mode)

    def rates(self) -> tuple[float, float]:
        """(records/s, bytes/s) delivered by replay over the last ``RATE_WINDOW_S``."""
        rate = self._rate
        if len(rate) < 2:
            return 0.0, 0.0
        (t0, n0, b0), (t1, n1, b1) = rate[0], rate[-1]
        dt = max(t1 - t0, 1e-3)
        return (n1 - n0) / dt, (b1 - b0) / dt

    def _sample(self, now: float) -> None:
        rate = self._rate
        if rate and now - rate[-1][0] < 1.0:
            return
        rate.append((now, self.counters["replayed"], self.replayed_bytes))
        while len(rate) > 2 and now - rate[1][0] >= RATE_WINDOW_S:
            rate.popleft()

    def tick(self) -> None:
        """Called by the buffer's timer: drain-rate samples, progress lines while a drain
        is under way, and another look when held back for the high-priority spool."""
        now = time.monotonic()
        self._sample(now)
        if self.held:
            self._wake.set()
        backlog = self.spool.next_seq - self.watermark()
        if self.write_ahead and not self.draining and backlog >= DRAIN_LOG_MIN:
            self.draining_since(f"{backlog} records behind")
        if not self.draining or now - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = now
        replayed = self.counters["replayed"] - self._replayed_at_start
        elapsed = max(now - self._drain_from, 1e-3)
        log.info("spool_drain_progress", remaining_records=backlog, replayed=replayed,
                 rate_per_s=round(replayed / elapsed), in_flight=self.outstanding,
                 spool_bytes=self.spool.used_bytes, retrying=self.rewind)
        self._check_caught_up()
