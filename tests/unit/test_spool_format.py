"""The spool's on-disk format and recovery: round trip, torn and corrupt tails, ledger."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.buffer import spool_format as fmt
from gateway.buffer.inspect import inspect_spool
from gateway.buffer.spool import Spool
from gateway.model import Record

pytestmark = pytest.mark.unit


def rec(i: int, **kw: object) -> Record:
    fields: dict[str, object] = {"cluster": "default", "topic": f"t{i % 3}",
                                 "value": f"v{i}".encode(), "key": f"k{i % 5}".encode()}
    fields.update(kw)
    return Record(**fields)  # type: ignore[arg-type]


def test_frame_round_trip_keeps_every_field() -> None:
    r = Record(cluster="c", topic="t", value=b"\x00\xffpayload", key=None,
               headers=[("h", b"\x01"), ("h", b"")], partition=3)
    frame = fmt.encode_frame(42, r, 1.5)
    scan = fmt.walk_frames(frame, keep=True)
    assert scan.damage is None and scan.records == 1
    seq, body = scan.frames[0]
    back = fmt.decode_body(body)
    assert seq == 42 and back.spooled_at == 1.5
    assert back.to_record() == Record(cluster="c", topic="t", value=b"\x00\xffpayload", key=None,
                                      headers=[("h", b"\x01"), ("h", b"")], partition=3)


async def write_records(directory: Path, n: int) -> Spool:
    spool = Spool(str(directory), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=2.0)
    spool.recover()
    done = asyncio.Event()
    results: list[tuple[int, int, OSError | None]] = []

    def on_durable(first: int, last: int, error: OSError | None) -> None:
        results.append((first, last, error))
        if last == n - 1 + spool_first:
            done.set()

    spool_first = spool.next_seq
    spool.start(on_durable, lambda _n: None)
    for i in range(n):
        spool.append(rec(i))
    await asyncio.wait_for(done.wait(), 10)
    assert all(err is None for _, _, err in results)
    await spool.close()
    return spool


async def test_group_commit_many_appends_few_fsyncs(tmp_path: Path) -> None:
    spool = await write_records(tmp_path, 5000)
    # One fsync per batch, not per record: 5000 appends in one loop turn are a handful.
    assert 1 <= spool.fsyncs <= 20
    reader = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    reader.recover()
    records, cursor = reader.read(0, 10_000)
    assert [r.value for _, r in records] == [f"v{i}".encode() for i in range(5000)]
    assert cursor == 5000


def only_segment(directory: Path) -> Path:
    segs = fmt.list_segments(str(directory))
    assert len(segs) == 1
    return Path(segs[0][1])


async def test_truncated_tail_is_cut_and_everything_before_recovered(tmp_path: Path) -> None:
    await write_records(tmp_path, 100)
    seg = only_segment(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 3)  # a crash in the middle of the last frame
    report = inspect_spool(str(tmp_path))
    assert report["records"] == 99 and report["damage"][0]["reason"] == "torn"

    spool = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    recovery = spool.recover()
    assert recovery.records == 99 and recovery.next_seq == 99
    assert [d.reason for d in recovery.damage] == ["torn"]
    assert [n for n in os.listdir(tmp_path) if ".corrupt-" in n]  # kept for a person
    # A second start finds a clean spool: no crash loop, nothing cut twice.
    again = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    assert again.recover().damage == []


async def test_bit_flip_keeps_records_before_and_reports_the_rest(tmp_path: Path) -> None:
    await write_records(tmp_path, 100)
    seg = only_segment(tmp_path)
    data = bytearray(seg.read_bytes())
    sizes = [len(fmt.encode_frame(i, rec(i), 0.0)) for i in range(100)]
    flip_at = len(fmt.MAGIC) + sum(sizes[:60]) + fmt.HEADER.size + 2  # inside record 60's body
    data[flip_at] ^= 0x10
    seg.write_bytes(bytes(data))

    spool = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    recovery = spool.recover()
    assert recovery.records == 60
    assert recovery.damage[0].reason == "corrupt"
    assert recovery.damage[0].bytes_cut == sum(sizes[60:])
    records, _ = spool.read(0, 1000)
    assert [r.value for _, r in records] == [f"v{i}".encode() for i in range(60)]


def test_ledger_round_trip_and_damage(tmp_path: Path) -> None:
    assert fmt.read_ledger(str(tmp_path)) is None
    fmt.write_ledger(str(tmp_path), 123456789)
    assert fmt.read_ledger(str(tmp_path)) == 123456789
    ledger = tmp_path / fmt.LEDGER
    raw = bytearray(ledger.read_bytes())
    raw[5] ^= 1
    ledger.write_bytes(bytes(raw))
    assert fmt.read_ledger(str(tmp_path)) is None  # damaged reads as "replay everything"


async def test_confirmed_segments_are_deleted_and_not_replayed(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1024, fsync_interval_ms=1)
    spool.recover()
    freed: list[int] = []
    durable = asyncio.Event()
    spool.start(lambda f, last, e: durable.set() if last == 299 else None, freed.append)
    for i in range(300):
        spool.append(rec(i))
        if i % 50 == 49:
            await asyncio.sleep(0.01)  # separate batches: segments roll between batches
    await asyncio.wait_for(durable.wait(), 10)
    assert spool.segment_count() > 3
    spool.watermark = 200  # Kafka confirmed seq 0..199
    await spool.close()  # persists the ledger and deletes covered segments
    assert fmt.read_ledger(str(tmp_path)) == 200
    assert freed and sum(freed) > 0
    remaining = fmt.list_segments(str(tmp_path))
    assert all(first > 0 for first, _ in remaining)

    again = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1024, fsync_interval_ms=1)
    recovery = again.recover()
    assert recovery.records == 100 and recovery.watermark == 200
    records, _ = again.read(recovery.watermark, 1000)
    assert [s for s, _ in records] == list(range(200, 300))


async def test_fully_confirmed_spool_leaves_no_segments(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    spool.recover()
    durable = asyncio.Event()
    spool.start(lambda f, last, e: durable.set() if last == 9 else None, lambda _n: None)
    for i in range(10):
        spool.append(rec(i))
    await asyncio.wait_for(durable.wait(), 10)
    spool.watermark = 10
    await spool.close()
    assert fmt.list_segments(str(tmp_path)) == []
    again = Spool(str(tmp_path), max_bytes=1 << 30, segment_bytes=1 << 20, fsync_interval_ms=1)
    recovery = again.recover()
    assert recovery.records == 0 and recovery.next_seq == 10  # seqs never go backwards


async def test_inspect_sums_worker_spools(tmp_path: Path) -> None:
    await write_records(tmp_path / "worker-0", 30)
    await write_records(tmp_path / "worker-1", 12)
    report = inspect_spool(str(tmp_path))
    assert report["records"] == 42
    assert report["topics"] == {"default/t0": 14, "default/t1": 14, "default/t2": 14}
    assert set(report["workers"]) == {"worker-0", "worker-1"}
    assert report["oldest_record_age_s"] is not None and report["oldest_record_age_s"] < 60
