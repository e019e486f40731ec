"""Idempotency cache and rate limiter: no sockets, no broker."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sources.http_common import IdempotencyKeyReused, RateLimiter
from gateway.sources.idempotency import (
    ENTRY_OVERHEAD,
    IdempotencyCache,
    Stored,
    entry_size,
    fingerprint,
)

pytestmark = pytest.mark.unit

PRINT = fingerprint("POST", "/v1/publish/a", b"body")


class Producer:
    """Counts how often the cache really produced."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.calls = 0
        self.status = status
        self.delay = delay

    async def __call__(self, earlier: Stored | None = None) -> Stored:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return Stored(self.status, f"answer {self.calls}".encode(), {})


async def test_retry_gets_the_first_answer() -> None:
    cache, produce = IdempotencyCache(60), Producer()
    first = await cache.run(("c", "k"), PRINT, produce)
    again = await cache.run(("c", "k"), PRINT, produce)
    assert produce.calls == 1 and again.body == first.body == b"answer 1"
    await cache.run(("other-client", "k"), PRINT, produce)
    assert produce.calls == 2  # keys are scoped by client


async def test_concurrent_retries_wait_for_the_first() -> None:
    cache, produce = IdempotencyCache(60), Producer(delay=0.05)
    answers = await asyncio.gather(*(cache.run(("c", "k"), PRINT, produce) for _ in range(5)))
    assert produce.calls == 1 and {a.body for a in answers} == {b"answer 1"}


async def test_retriable_answers_are_not_kept() -> None:
    cache = IdempotencyCache(60)
    for status in (503, 429, 408, 500):
        produce = Producer(status)
        await cache.run(("c", str(status)), PRINT, produce)
        await cache.run(("c", str(status)), PRINT, produce)
        assert produce.calls == 2, status
    assert len(cache) == 0


async def test_partial_answers_retry_only_the_unsettled_records() -> None:
    # A batch answer (207) whose record 1 failed retriably: a retry must produce
    # record 1 again, and only it; once everything is settled the answer is replayed.
    cache = IdempotencyCache(60)
    seen: list[list[object | None] | None] = []

    async def produce(earlier: Stored | None) -> Stored:
        seen.append(earlier.results if earlier else None)
        if len(seen) == 1:
            return Stored(207, b"first", {}, ["ok-0", None, "refused-2"])
        assert earlier is not None and earlier.results is not None
        return Stored(200, b"second", {}, [r or "ok-1" for r in earlier.results])

    first = await cache.run(("c", "k"), PRINT, produce)
    assert first.body == b"first" and not first.final and len(cache) == 1
    second = await cache.run(("c", "k"), PRINT, produce)
    assert second.body == b"second" and second.final
    assert seen == [None, ["ok-0", None, "refused-2"]]
    third = await cache.run(("c", "k"), PRINT, produce)
    assert third.body == b"second" and len(seen) == 2  # final: replayed, not produced


async def test_a_busy_retry_keeps_what_the_earlier_attempt_settled() -> None:
    cache = IdempotencyCache(60)
    answers = [Stored(207, b"partial", {}, ["ok-0", None]), Stored(503, b"busy", {})]
    seen: list[object] = []

    async def produce(earlier: Stored | None) -> Stored:
        seen.append(earlier.results if earlier else None)
        return answers.pop(0) if answers else Stored(200, b"done", {}, ["ok-0", "ok-1"])

    for _ in range(3):
        await cache.run(("c", "k"), PRINT, produce)
    assert seen == [None, ["ok-0", None], ["ok-0", None]]


def test_only_final_answers_are_final() -> None:
    assert Stored(200, b"", {}).final and Stored(404, b"", {}).final
    assert not Stored(503, b"", {}).final and not Stored(429, b"", {}).final
    assert not Stored(207, b"", {}, ["r", None]).final
    assert not Stored(200, b"", {}, [None]).keep  # nothing settled: nothing to keep


async def test_same_key_other_request_is_refused() -> None:
    cache = IdempotencyCache(60)
    await cache.run(("c", "k"), PRINT, Producer())
    with pytest.raises(IdempotencyKeyReused):
        await cache.run(("c", "k"), fingerprint("POST", "/v1/publish/a", b"other"), Producer())


async def test_a_failed_first_attempt_lets_the_waiter_produce() -> None:
    cache = IdempotencyCache(60)

    async def boom(earlier: Stored | None) -> Stored:
        await asyncio.sleep(0.02)
        raise RuntimeError("handler crashed")

    first = asyncio.ensure_future(cache.run(("c", "k"), PRINT, boom))
    await asyncio.sleep(0)
    produce = Producer()
    second = await cache.run(("c", "k"), PRINT, produce)
    with pytest.raises(RuntimeError):
        await first
    assert produce.calls == 1 and second.status == 200


async def test_window_and_bounds() -> None:
    cache, produce = IdempotencyCache(0.01), Producer()
    await cache.run(("c", "k"), PRINT, produce)
    await asyncio.sleep(0.02)
    await cache.run(("c", "k"), PRINT, produce)
    assert produce.calls == 2  # the window passed: a new request

    bounded = IdempotencyCache(60, max_keys=3)
    for i in range(10):
        await bounded.run(("c", str(i)), PRINT, Producer())
    assert len(bounded) == 3
    one = entry_size(("c", "0"), Stored(200, b"answer 1", {}))
    by_bytes = IdempotencyCache(60, max_bytes=3 * one)
    for i in range(10):
        await by_bytes.run(("c", str(i)), PRINT, Producer())
    assert len(by_bytes) == 3


def test_token_bucket_per_client() -> None:
    limiter = RateLimiter(rate=2.0, burst=2.0)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.take("b", now=0.0) == 0.0  # its own bucket
    assert limiter.take("a", now=0.5) == 0.0  # refilled one token in 0.5 s
    assert RateLimiter(rate=0.0, burst=0.0).take("a") == 0.0  # 0 = unlimited


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_clients=100)
    for i in range(1000):
        limiter.take(f"client-{i}", now=0.0)
    assert len(limiter._buckets) == 100


async def test_the_byte_bound_counts_keys_and_scopes() -> None:
    """8 KB keys and 8 KB client ids (the most an HTTP header holds) are counted: the
    cache stays under its byte bound however long they are."""
    limit = 1 << 20
    cache = IdempotencyCache(60, max_bytes=limit)
    for i in range(500):
        scope = ("password", "user", "", f"{i:08d}" + "c" * 8000)  # a device's client id
        await cache.run((scope, f"{i:08d}" + "k" * 8000), PRINT, Producer())
        assert cache.size <= limit
    # Each kept entry costs at least its key and client id: at most 1 MiB / 16 KB of them.
    assert 0 < len(cache) <= limit // 16_000
    assert cache.size >= len(cache) * (16_000 + ENTRY_OVERHEAD)
    assert cache.size == sum(entry_size(s, Stored(200, b"answer 1", {}))
                             for s in cache._entries)


async def test_forgotten_entries_give_their_bytes_back() -> None:
    cache = IdempotencyCache(0.01)
    await cache.run((("anonymous", "10.0.0.1"), "k" * 255), PRINT, Producer())
    assert cache.size > 255 + ENTRY_OVERHEAD
    await asyncio.sleep(0.02)
    await cache.run((("anonymous", "10.0.0.1"), "other"), PRINT, Producer(503))  # expires
    assert len(cache) == 0 and cache.size == 0
