"""On-disk format of the spool: segment files of CRC32C-framed records, and the ledger.

See ``gateway/buffer/spool.py`` for the invariants this format serves.

Segment file ``seg-<first seq, 20 digits>.log``::

    magic   8 bytes   b"LMSPOOL1"
    frame*  crc32c u32 LE | length u32 LE | seq u64 LE | body (length bytes)

``crc32c`` covers ``length | seq | body`` (one contiguous range) so a flipped
length or sequence number is caught as surely as a flipped payload byte.  ``body`` is msgpack of
``SpooledRecord`` (array-like, so adding a trailing field later stays readable).

Ledger file ``ledger`` (16 bytes, replaced atomically via ``ledger.tmp``)::

    b"LML1" | watermark u64 LE | crc32c(first 12 bytes) u32 LE

``watermark``: every record with ``seq < watermark`` has been confirmed by Kafka
(or dead-lettered, or counted as lost).  A missing or damaged ledger reads as 0:
everything on disk is replayed again (duplicates, never loss).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import google_crc32c
import msgspec

from gateway.buffer.storage import OS, Storage
from gateway.model import Record

MAGIC = b"LMSPOOL1"
HEADER = struct.Struct("<IIQ")  # crc32c, length, seq
_LEN_SEQ = struct.Struct("<IQ")
# A frame longer than this is damage, not data: Kafka's own limit is far below it.
MAX_BODY = 64 << 20
LEDGER = "ledger"
_LEDGER = struct.Struct("<4sQ")
_LEDGER_MAGIC = b"LML1"


class SpooledRecord(msgspec.Struct, array_like=True):
    """What the spool keeps of a ``Record`` (never its ack: acks do not survive restarts)."""

    cluster: str
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None
    spooled_at: float  # wall clock, for "oldest record age" in inspect

    def to_record(self) -> Record:
        return Record(cluster=self.cluster, topic=self.topic, value=self.value, key=self.key,
                      headers=[(k, v) for k, v in self.headers], partition=self.partition)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SpooledRecord)


def encode_frame(seq: int, record: Record, now: float) -> bytes:
    body = _encoder.encode(SpooledRecord(record.cluster, record.topic, record.value, record.key,
                                         record.headers, record.partition, now))
    covered = _LEN_SEQ.pack(len(body), seq) + body
    return struct.pack("<I", google_crc32c.value(covered)) + covered


def decode_body(body: bytes | memoryview) -> SpooledRecord:
    return _decoder.decode(body)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


def parse_segment_name(name: str) -> int | None:
    if name.startswith("seg-") and name.endswith(".log") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


def list_segments(directory: str, storage: Storage = OS) -> list[tuple[int, str]]:
    """(first seq, path) of every segment in the directory, oldest first."""
    found = []
    for name in storage.listdir(directory):
        first = parse_segment_name(name)
        if first is not None:
            found.append((first, os.path.join(directory, name)))
    return sorted(found)


@dataclass
class Damage:
    """Where a segment stops being trustworthy, and why."""

    path: str
    offset: int
    bytes_cut: int
    reason: str  # "torn" (incomplete last frame) or "corrupt" (checksum/length/order)

    def as_dict(self) -> dict[str, object]:
        return {"segment": os.path.basename(self.path), "offset": self.offset,
                "bytes": self.bytes_cut, "reason": self.reason}


@dataclass
class FrameScan:
    """Result of walking the frames of one segment's bytes."""

    valid_end: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    damage: str | None = None  # None: the bytes ended on a frame boundary
    reason: str = ""
    frames: list[tuple[int, memoryview]] = field(default_factory=list)


def walk_frames(data: bytes, start: int = 0, keep: bool = False) -> FrameScan:
    """Check every frame from ``start``; stop at the first one that is not whole and sound.

    Sequence numbers must strictly increase (gaps are allowed: a failed write
    leaves one), which also catches a stale frame from reused disk blocks.
    """
    scan = FrameScan(valid_end=start)
    view = memoryview(data)
    pos, end, last = start, len(data), -1
    while pos < end:
        if end - pos < HEADER.size:
            scan.damage, scan.reason = "torn", "incomplete frame header"
            break
        crc, length, seq = HEADER.unpack_from(view, pos)
        if length > MAX_BODY:
            scan.damage, scan.reason = "corrupt", f"impossible frame length {length}"
            break
        if end - pos - HEADER.size < length:
            scan.damage, scan.reason = "torn", "incomplete frame body"
            break
        if google_crc32c.value(data[pos + 4: pos + HEADER.size + length]) != crc:
            scan.damage, scan.reason = "corrupt", "checksum mismatch"
            break
        if seq <= last:
            scan.damage, scan.reason = "corrupt", f"sequence {seq} after {last}"
            break
        if keep:
            scan.frames.append((seq, view[pos + HEADER.size: pos + HEADER.size + length]))
        if scan.first_seq is None:
            scan.first_seq = seq
        last = scan.last_seq = seq
        scan.records += 1
        pos += HEADER.size + length
        scan.valid_end = pos
    return scan


def scan_segment(path: str, keep: bool = False,
                 storage: Storage = OS) -> tuple[FrameScan, Damage | None, int]:
    """Read-only check of one segment file: (scan, damage or None, file size)."""
    data = storage.read_file(path)
    if data[: len(MAGIC)] != MAGIC:
        reason = "torn" if len(data) < len(MAGIC) and MAGIC.startswith(data) else "corrupt"
        return FrameScan(), Damage(path, 0, len(data), reason), len(data)
    scan = walk_frames(data, len(MAGIC), keep=keep)
    damage = None
    if scan.damage is not None:
        damage = Damage(path, scan.valid_end, len(data) - scan.valid_end, scan.damage)
    return scan, damage, len(data)


def cut_tail(damage: Damage, storage: Storage = OS) -> str:
    """Move the damaged tail aside (kept for a person), cut the segment there; returns where.

    The aside copy is synced first; the segment is cut by replacing it with its
    sound prefix (write, sync, rename, sync the directory), so a crash in the
    middle leaves the old or the new file, never a half-cut one.
    """
    directory = os.path.dirname(damage.path)
    data = storage.read_file(damage.path)
    aside = f"{damage.path}.corrupt-{damage.offset}"
    _write_synced(storage, aside, data[damage.offset:])
    tmp = damage.path + ".cut"
    _write_synced(storage, tmp, data[: damage.offset])
    storage.rename(tmp, damage.path)
    storage.fsync_dir(directory)
    return aside


def _write_synced(storage: Storage, path: str, data: bytes) -> None:
    fd = storage.create(path, exclusive=False)
    try:
        storage.append(fd, data)
        storage.fdatasync(fd)
    finally:
        storage.close(fd)


def read_ledger(directory: str, storage: Storage = OS) -> int | None:
    """The persisted watermark, or None when the ledger is missing or damaged."""
    try:
        data = storage.read_file(os.path.join(directory, LEDGER))[: _LEDGER.size + 4]
    except FileNotFoundError:
        return None
    if len(data) != _LEDGER.size + 4:
        return None
    magic, watermark = _LEDGER.unpack_from(data)
    (crc,) = struct.unpack_from("<I", data, _LEDGER.size)
    if magic != _LEDGER_MAGIC or google_crc32c.value(data[: _LEDGER.size]) != crc:
        return None
    return int(watermark)


def write_ledger(directory: str, watermark: int, storage: Storage = OS) -> None:
    """Replace the ledger atomically (write, sync, rename, sync the directory)."""
    head = _LEDGER.pack(_LEDGER_MAGIC, watermark)
    tmp = os.path.join(directory, LEDGER + ".tmp")
    _write_synced(storage, tmp, head + struct.pack("<I", google_crc32c.value(head)))
    storage.rename(tmp, os.path.join(directory, LEDGER))
    storage.fsync_dir(directory)
