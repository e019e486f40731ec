"""Power cuts against the spool: every acknowledged record survives (issue 11, item 1).

``kill -9`` keeps the page cache, so it cannot tell a missing fsync from a
present one.  Here the spool runs on ``CrashFS`` (tests/support/crashfs.py),
which forgets unsynced bytes and unsynced directory entries at the cut.  Each
run: records go in with acks (write-ahead, or kafka mode with Kafka stalling
so they spill), some are confirmed by the fake Kafka (the watermark moves,
segments are deleted), the power is cut inside the N-th storage call, a new
buffer recovers from what survived and replays it.  Every record whose ack
said "safe" must be in Kafka before the cut or in the replay after it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.buffer.spooled import SpoolBuffer
from gateway.config.schema import Buffer as BufferConfig
from gateway.config.schema import Spool as SpoolConfig
from gateway.model import Ack, Outcome, Record
from tests.support.crashfs import CrashFS
from tests.unit.test_spool_buffer import FakeSink

pytestmark = pytest.mark.unit

DIR = "/crash/spool"


def make(fs: CrashFS, sink: FakeSink, mode: str) -> SpoolBuffer:
    cfg = SpoolConfig(mode=mode, fsync_interval_ms=1.0, spill_after_ms=20,  # type: ignore[arg-type]
                      max_bytes=64 << 10, segment_bytes=4096)
    return SpoolBuffer({"default": sink}, cfg,  # type: ignore[dict-item]
                       BufferConfig(high_water_bytes=1 << 20, low_water_bytes=1 << 19),
                       DIR, storage=fs)


async def settle(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll until ``check()`` or the deadline (no verdict rides on the deadline)."""
    for _ in range(int(timeout / 0.002)):
        if check():
            return
        await asyncio.sleep(0.002)


async def run_until_cut(fs: CrashFS, mode: str, records: int, seed: int) -> tuple[set[bytes],
                                                                                  set[bytes]]:
    """Returns (acked values, values Kafka confirmed before the cut)."""
    rng = random.Random(seed)
    sink = FakeSink()
    buf = make(fs, sink, mode)
    try:
        await buf.start()
    except OSError:  # the cut came during start-up: nothing was acked
        assert fs.dead
        return set(), set()
    outcomes: dict[bytes, Outcome] = {}
    sent = 0
    while sent < records and not fs.dead:
        for _ in range(rng.randint(1, 8)):
            value = b"rec-%05d-" % sent + b"x" * rng.randint(0, 120)
            record = Record(cluster="default", topic="t", value=value, key=b"k")
            record.ack = Ack(lambda o, v=value: outcomes.__setitem__(v, o), 1)  # type: ignore[misc]
            buf.submit(record)
            sent += 1
        # Wait for this burst's verdicts (kafka mode: the spill, then the fsync).
        await settle(lambda n=sent: fs.dead or len(outcomes) == n)  # type: ignore[misc]
        if rng.random() < 0.5 and sink.pending:
            sink.deliver(rng.randint(1, len(sink.pending)))  # Kafka confirms some
    if not fs.dead:
        await settle(lambda: fs.dead, timeout=0.05)
        fs.power_cut()
    acked = {v for v, o in outcomes.items() if o.ok}
    await buf.close(0.02)  # the process is dead: nothing to wait for
    return acked, set(sink.log)


async def recover(fs: CrashFS, mode: str) -> list[bytes]:
    sink = FakeSink()
    buf = make(fs, sink, mode)
    await buf.start()
    for _ in range(6000):  # up to 30 s on a loaded machine; usually a few ms
        if sink.pending:
            sink.deliver()
        if buf.stats()["spool_records"] == 0 and not sink.pending:
            break
        await asyncio.sleep(0.005)
    drained = buf.stats()["spool_records"] == 0
    await buf.close(0.5)
    assert drained, "the recovered spool did not drain"
    return sink.log


async def cut_and_check(mode: str, records: int, cut_at: int | None, seed: int) -> int:
    fs = CrashFS(seed=seed, cut_at=cut_at)
    acked, in_kafka = await run_until_cut(fs, mode, records, seed)
    replayed = await recover(fs.recovered(), mode)
    lost = acked - in_kafka - set(replayed)
    assert not lost, (f"{mode}, cut at call {cut_at}: {len(lost)} acked records lost, "
                      f"e.g. {sorted(lost)[0][:9]!r}")
    return fs.calls


@pytest.mark.parametrize("mode", ["write-ahead", "kafka"])
async def test_power_cut_at_every_point_of_a_run_keeps_every_acked_record(mode: str) -> None:
    calls = await cut_and_check(mode, 60, None, seed=1)  # how many storage calls a run makes
    assert calls > 20
    for cut_at in range(2, calls + 1, max(1, calls // 40)):  # ~40 points spread over the run
        await cut_and_check(mode, 60, cut_at, seed=cut_at)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["write-ahead", "kafka"]), records=st.integers(1, 150),
       cut_at=st.integers(2, 400), seed=st.integers(0, 1 << 16))
def test_power_cut_anywhere_keeps_every_acked_record(mode: str, records: int, cut_at: int,
                                                     seed: int) -> None:
    asyncio.run(cut_and_check(mode, records, cut_at, seed))


def test_crashfs_forgets_unsynced_bytes_and_names(tmp_path: Path) -> None:
    """The double itself: only synced data under a synced name survives."""
    fs = CrashFS()
    fs.makedirs("/d")
    fd = fs.create("/d/a", exclusive=True)
    fs.append(fd, b"one")
    fs.fdatasync(fd)
    fs.fsync_dir("/d")
    fs.append(fd, b"two")
    fd2 = fs.create("/d/b", exclusive=True)
    fs.append(fd2, b"synced data, name not synced")
    fs.fdatasync(fd2)
    fs.power_cut()
    after = fs.recovered()
    assert after.listdir("/d") == ["a"]
    assert after.read_file("/d/a").startswith(b"one") and len(after.read_file("/d/a")) <= 6
