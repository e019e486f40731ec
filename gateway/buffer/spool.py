"""The durable spool: records that are acknowledged to clients but not yet in Kafka.

Invariants (each one is tested; docs/spool.md explains them for operators):

1. Ack after fsync.  A record that is acknowledged because of the spool (not
   because Kafka confirmed it) was written *and fsynced* (its segment file and,
   for a new segment, the directory) before its ack is released.  Write or
   fsync errors fail the acks of that batch; they are never retried as if the
   data were safe (after a failed fsync the page cache state is unknown).
2. Nothing acknowledged is deleted before Kafka has it.  A segment is deleted
   only when every record in it has ``seq < watermark``, and the ledger holding
   that watermark is fsynced first.
3. Order.  Sequence numbers are assigned on the event loop in submission order,
   written in that order, and replayed in that order.  Replay never skips a
   durable record except one Kafka already confirmed.
4. At least once.  The ledger may lag what Kafka confirmed (it is persisted
   every ~200 ms, not per delivery), so a crash can replay a few records again:
   duplicates are possible, loss is not.
5. Damage is cut, not replayed and not fatal.  On open every segment is
   checked frame by frame (length, CRC32C, increasing seq).  A torn tail (crash
   mid-write) or a corrupt frame ends the segment there: the bytes from that
   point are moved to ``<segment>.corrupt-<offset>`` for a person to look at,
   the segment is truncated, and start-up goes on.  Records after damage inside
   one segment are lost (reported with their byte count); later segments are
   unaffected.
6. Bounded.  The bytes of all segment files never exceed ``max_bytes``: an
   append that would cross it raises ``SpoolFull`` and the caller holds the
   record unacknowledged (backpressure) until deletions free space.
7. One writer.  Only the writer thread writes, fsyncs, renames or deletes files
   (every file operation goes through ``storage``: ``storage.py``, the crash-test seam);
   the event loop only encodes frames and hands them over, so a slow disk
   stalls acks, never the loop.

The on-disk format is in ``spool_format.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.buffer import spool_format as fmt
from gateway.buffer.storage import OS, Storage
from gateway.errors import SpoolError
from gateway.model import Record

log = structlog.get_logger("lastmile.spool")

# (first seq, last seq, error or None) for one group-committed batch, on the loop.
DurableCallback = Callable[[int, int, OSError | None], None]
LEDGER_INTERVAL_S = 0.2
READ_CHUNK = 1 << 20


class SpoolFull(SpoolError):
    """The spool has reached spool.max_bytes."""


class Budget:
    """Bytes on disk shared by the spools of one worker (normal and high priority).

    ``max_bytes`` bounds the sum of every member's segment files (invariant 6).
    Loop side only.
    """

    __slots__ = ("max_bytes", "used")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0


MARK_EVERY_S = 0.1  # granularity of the oldest-record age


@dataclass
class Segment:
    first_seq: int
    path: str
    size: int
    last_seq: int  # first_seq - 1 while empty
    fd: int = -1  # open for append only while it is the active segment


@dataclass
class Recovery:
    watermark: int
    next_seq: int
    records: int
    bytes: int
    segments: int
    damage: list[fmt.Damage] = field(default_factory=list)


class Spool:
    """Segment files in one directory (one spool per worker process)."""

    def __init__(self, directory: str, *, max_bytes: int, segment_bytes: int,
                 fsync_interval_ms: float, storage: Storage | None = None,
                 budget: Budget | None = None, limit: int | None = None) -> None:
        self.directory = directory
        self.storage = storage or OS  # every file operation goes through it
        self.max_bytes = max_bytes
        # Shared with the other spool of the worker, if any; this spool appends only while
        # the shared total stays under ``limit`` (the normal spool leaves a reserve).
        self.budget = budget or Budget(max_bytes)
        self.limit = min(self.budget.max_bytes, limit if limit is not None else max_bytes)
        # At least four segments fit in max_bytes, so deleting confirmed ones frees room
        # while the newest is still being appended to.
        self.segment_bytes = min(segment_bytes, max(max_bytes // 4, 4096))
        self.interval = fsync_interval_ms / 1000.0
        self.next_seq = 0  # loop side: next seq to assign
        self.used_bytes = 0  # loop side: bytes on disk plus bytes handed to the writer
        self.watermark = 0  # loop side: set by the buffer, read by the writer thread
        self.written_seq = -1  # writer side: last seq of the last batch it finished
        self.fsyncs = 0
        self.write_errors = 0
        self._segments: list[Segment] = []
        self._lock = threading.Lock()  # guards _segments for the reader
        self._cond = threading.Condition()
        self._queue: list[tuple[int, bytes]] = []
        # Frames appended during this loop iteration, handed to the writer under one lock
        # acquisition (a call_soon) rather than one per record.  Loop thread only.
        self._pending: list[tuple[int, bytes]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_durable: DurableCallback | None = None
        self._on_freed: Callable[[int], None] | None = None
        self._persisted = -1
        self._ledger_at = 0.0
        self._roll_min = min(self.segment_bytes, 1 << 20)
        # Reader position: (segment path, byte offset, seq of the first frame there or later).
        self._rpos: tuple[str, int, int] | None = None
        # The same, where the writer's last batch ended (the reader starts there after
        # the replayer took records from memory instead of reading them).
        self._wpos: tuple[str, int, int] | None = None
        # (seq, wall clock when it was appended), one per MARK_EVERY_S: the oldest
        # unconfirmed record's age without a timestamp per record in memory.
        self._marks: deque[tuple[int, float]] = deque()
        self._mark_at = 0.0

    # --- recovery (before start) -----------------------------------------------

    def recover(self) -> Recovery:
        st = self.storage
        st.makedirs(self.directory)
        stored = fmt.read_ledger(self.directory, st)
        if stored is None and fmt.list_segments(self.directory, st):
            log.warning("spool_ledger_missing", dir=self.directory,
                        note="replaying every record on disk; duplicates are possible")
        watermark = stored or 0
        report = Recovery(watermark=watermark, next_seq=watermark, records=0, bytes=0,
                          segments=0)
        for first, path in fmt.list_segments(self.directory, st):
            scan, damage, size = fmt.scan_segment(path, keep=True, storage=st)
            if damage is not None:
                self._quarantine(damage)
                report.damage.append(damage)
                size = damage.offset
            last = scan.last_seq if scan.last_seq is not None else first - 1
            if scan.records == 0 or last < watermark:
                st.unlink(path)  # empty, or wholly confirmed before the crash
                continue
            owed = [body for seq, body in scan.frames if seq >= watermark]
            if owed and not self._marks:
                first_owed = next(seq for seq, _ in scan.frames if seq >= watermark)
                self._marks.append((first_owed, fmt.decode_body(owed[0]).spooled_at))
            report.records += len(owed)
            report.next_seq = max(report.next_seq, last + 1)
            self._segments.append(Segment(first, path, size, last))
        report.segments = len(self._segments)
        report.bytes = self.used_bytes = sum(s.size for s in self._segments)
        self.budget.used += self.used_bytes
        self.next_seq = report.next_seq
        self.written_seq = report.next_seq - 1
        self.watermark = self._persisted = watermark
        log.info("spool_recovered", dir=self.directory, records=report.records,
                 bytes=report.bytes, segments=report.segments, watermark=watermark,
                 damaged=[d.as_dict() for d in report.damage])
        return report

    def _quarantine(self, damage: fmt.Damage) -> None:
        aside = fmt.cut_tail(damage, self.storage)
        log.error("spool_damage_cut", segment=damage.path, offset=damage.offset,
                  bytes=damage.bytes_cut, reason=damage.reason, moved_to=aside)

    # --- loop side ----------------------------------------------------------------

    def start(self, on_durable: DurableCallback, on_freed: Callable[[int], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_durable, self._on_freed = on_durable, on_freed
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def append(self, record: Record) -> int:
        """Encode and queue one record; returns its seq. Raises SpoolFull."""
        now = time.time()
        frame = fmt.encode_frame(self.next_seq, record, now)
        # Room for one segment header too: the writer may have to start a segment.
        budget = self.budget
        if budget.used + len(frame) + len(fmt.MAGIC) > self.limit:
            raise SpoolFull()
        seq = self.next_seq
        self.next_seq += 1
        self.used_bytes += len(frame)
        budget.used += len(frame)
        if now - self._mark_at >= MARK_EVERY_S:
            self._mark_at = now
            self._marks.append((seq, now))
            self._drop_marks(self.watermark)
        pending = self._pending
        pending.append((seq, frame))
        if len(pending) == 1:
            if self._loop is None:
                self._hand_over()
            else:
                self._loop.call_soon(self._hand_over)
        return seq

    def _hand_over(self) -> None:
        """Queue this iteration's frames for the writer thread, in seq order."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        with self._cond:
            if not self._queue:
                self._cond.notify()
            self._queue.extend(pending)

    async def close(self) -> None:
        self._hand_over()
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def oldest_age(self, watermark: int, now: float) -> float:
        """Seconds since the oldest record not yet confirmed (``seq >= watermark``) was
        appended; 0 when there is none.  Errs high by at most ``MARK_EVERY_S``."""
        marks = self._drop_marks(watermark)
        if watermark >= self.next_seq or not marks:
            return 0.0
        return max(0.0, now - marks[0][1])

    def _drop_marks(self, watermark: int) -> deque[tuple[int, float]]:
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= watermark:
            marks.popleft()
        return marks

    def segment_count(self) -> int:
        with self._lock:
            return len(self._segments)

    # --- writer thread --------------------------------------------------------------

    def _run(self) -> None:
        # Group commit: what was queued while the previous fsync ran is the next batch,
        # written at once (no fixed interval: an ack waits for at most two fsyncs).
        # With fsync_interval_ms > 0, two fsyncs start at least that far apart.
        next_at = 0.0
        batch: list[tuple[int, bytes]] | None
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(LEDGER_INTERVAL_S)
                closing = self._closing
                wait = next_at - time.monotonic() if self.interval > 0 else 0.0
                batch = None
                if wait <= 0 or closing:  # take it under this same lock acquisition
                    batch, self._queue = self._queue, []
            if batch is None:
                time.sleep(wait)
                with self._cond:
                    batch, self._queue = self._queue, []
            if batch:
                next_at = time.monotonic() + self.interval
                self._write(batch)
            self._housekeep(force=closing and not batch)
            if closing and not batch:
                break
        for seg in self._segments:
            if seg.fd >= 0:
                with contextlib.suppress(OSError):
                    self.storage.close(seg.fd)
                seg.fd = -1

    def _write(self, batch: list[tuple[int, bytes]]) -> None:
        first, last = batch[0][0], batch[-1][0]
        error: OSError | None = None
        seg: Segment | None = None
        lost = 0
        try:
            seg, new = self._active(first)
            data = b"".join(frame for _, frame in batch)
            if new:
                data = fmt.MAGIC + data
            self.storage.append(seg.fd, data)
            self.storage.fdatasync(seg.fd)
            if new:  # the segment's name must survive a power cut too
                self.storage.fsync_dir(self.directory)
            self.fsyncs += 1
            seg.size += len(data)
            seg.last_seq = last
            self._wpos = (seg.path, seg.size, last + 1)
        except OSError as exc:
            error = exc
            self.write_errors += 1
            lost = sum(len(frame) for _, frame in batch)
            if self._abandon(seg):
                lost += len(fmt.MAGIC)
        self.written_seq = last
        self._post(self._on_durable, first, last, error)
        if lost:
            self._post(self._resize, -lost)  # after the failure is known: no append in between

    def _active(self, first: int) -> tuple[Segment, bool]:
        seg = self._segments[-1] if self._segments else None
        if seg is not None and seg.fd >= 0 and seg.size < self.segment_bytes:
            return seg, False
        if seg is not None and seg.fd >= 0:
            self.storage.close(seg.fd)
            seg.fd = -1
        path = os.path.join(self.directory, fmt.segment_name(first))
        fd = self.storage.create(path, exclusive=True)
        seg = Segment(first, path, 0, first - 1, fd)
        with self._lock:
            self._segments.append(seg)
        self._post(self._resize, len(fmt.MAGIC))
        return seg, True

    def _abandon(self, seg: Segment | None) -> bool:
        """After a failed write: cut what may be half-written, never append here again.

        Returns True when the segment held nothing durable and was removed.
        """
        if seg is None or seg.fd < 0:
            return False
        # If the cut fails, recovery cuts it instead; the segment is closed for writing anyway.
        with contextlib.suppress(OSError):
            self.storage.truncate(seg.fd, seg.size)
        with contextlib.suppress(OSError):
            self.storage.close(seg.fd)
        seg.fd = -1
        if seg.size == 0:
            with self._lock:
                self._segments.remove(seg)
            with contextlib.suppress(OSError):
                self.storage.unlink(seg.path)
            return True
        return False

    def _housekeep(self, force: bool) -> None:
        """Persist the watermark, then delete segments it fully covers (invariant 2)."""
        watermark = self.watermark
        now = time.monotonic()
        if watermark != self._persisted and (force or now - self._ledger_at >= LEDGER_INTERVAL_S):
            try:
                fmt.write_ledger(self.directory, watermark, self.storage)
            except OSError as exc:
                log.error("spool_ledger_write_failed", dir=self.directory, error=str(exc))
                return
            self._persisted, self._ledger_at = watermark, now
        elif not force:
            return
        self._delete_covered(self._persisted, force)

    def _delete_covered(self, watermark: int, force: bool) -> None:
        freed = 0
        for seg in list(self._segments):
            if seg.last_seq >= watermark or seg.last_seq < seg.first_seq:
                continue
            if seg.fd >= 0:
                if seg.size < self._roll_min and not force:
                    continue  # keep appending to a small active segment
                with contextlib.suppress(OSError):
                    self.storage.close(seg.fd)
                seg.fd = -1
            with self._lock:
                self._segments.remove(seg)
            try:
                self.storage.unlink(seg.path)
            except OSError as exc:
                log.error("spool_segment_delete_failed", segment=seg.path, error=str(exc))
                continue
            freed += seg.size
        if freed:
            self._post(self._resize, -freed)

    def _resize(self, delta: int) -> None:
        """On the loop: keep ``used_bytes`` equal to the bytes of the segment files."""
        self.used_bytes += delta
        self.budget.used += delta
        if delta < 0 and self._on_freed is not None:
            self._on_freed(-delta)

    def _post(self, callback: Callable[..., None] | None, *args: object) -> None:
        if callback is None or self._loop is None:
            return
        # A closed loop means shutdown: the ledger and files are already consistent.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # --- reader (one executor thread) -------------------------------------------------

    def read(self, cursor: int, max_records: int) -> tuple[list[tuple[int, Record]], int]:
        """Durable records with ``seq >= cursor``, in order, and the cursor after them.

        Reads only up to the last batch the writer finished, so a frame being
        written is never seen half done.  At the end of the data the cursor moves
        past that batch, which also steps over seqs of a failed batch.
        """
        limit = self.written_seq
        out: list[tuple[int, Record]] = []
        with self._lock:
            segments = [(s.first_seq, s.path) for s in self._segments]
        start = 0
        for i, (first, _) in enumerate(segments):
            if first <= cursor:
                start = i
        hint, after_write = self._rpos, self._wpos
        if after_write is not None and after_write[2] <= cursor and (
                hint is None or after_write[2] > hint[2]):
            hint = after_write
        for first, path in segments[start:]:
            if first > limit:
                break
            offset = len(fmt.MAGIC)
            if hint is not None and hint[0] == path and hint[2] <= cursor:
                offset = hint[1]  # continue where the last read stopped, not from the top
            if self._read_segment(path, offset, cursor, limit, max_records, out):
                break
        if len(out) >= max_records:
            return out, out[-1][0] + 1
        return out, max(cursor, limit + 1)

    def _read_segment(self, path: str, pos: int, cursor: int, limit: int, max_records: int,
                      out: list[tuple[int, Record]]) -> bool:
        """Append records from one segment; True when reading should stop here."""
        st = self.storage
        try:
            fd = st.open_read(path)
        except FileNotFoundError:
            return False  # deleted: every record in it was confirmed
        try:
            data = b""
            while True:
                chunk = st.pread(fd, READ_CHUNK, pos + len(data))
                if not chunk:
                    return False
                data += chunk
                scan = fmt.walk_frames(data, 0, keep=True)
                end = pos
                for seq, body in scan.frames:
                    end += fmt.HEADER.size + len(body)
                    if seq > limit:
                        return True
                    if seq >= cursor:
                        out.append((seq, fmt.decode_body(body).to_record()))
                        self._rpos = (path, end, seq + 1)
                        if len(out) >= max_records:
                            return True
                if scan.damage == "corrupt":
                    log.error("spool_read_damage", segment=path, offset=pos + scan.valid_end)
                    return False
                pos, data = pos + scan.valid_end, data[scan.valid_end:]
        finally:
            st.close(fd)
