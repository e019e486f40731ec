"""Kafka down and the spool full: HTTP answers 503 with Retry-After, never 200 for
unsaved data; when Kafka returns the spool drains and intake resumes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from tests.helpers import Broker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(150)
async def test_full_spool_answers_503_then_recovers(gateway_factory, fresh_broker: Broker) -> None:
    gw, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__max_bytes=64 * 1024,
                                spool__spill_after_ms=300, buffer__high_water_bytes=32 * 1024,
                                buffer__low_water_bytes=16 * 1024)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    url = f"http://127.0.0.1:{ports['http']}/v1/publish/bench/full-1/seq"
    headers = {"X-Client-Id": "full-1"}
    taken: set[int] = set()
    statuses: list[int] = []
    retry_after: list[str] = []
    counter = iter(range(10**6))

    async def post(http: aiohttp.ClientSession, n: int) -> int:
        try:
            return await asyncio.wait_for(_post(http, n), 5)
        except TimeoutError:
            return 0  # still waiting for safety: not taken (yet), and not answered 200

    async def _post(http: aiohttp.ClientSession, n: int) -> int:
        async with http.post(url, data=b"%06d" % n + b"y" * 900, headers=headers) as resp:
            if resp.status == 200:
                taken.add(n)
            elif resp.status == 503:
                retry_after.append(resp.headers.get("Retry-After", ""))
                body = await resp.json()
                assert body["error"] and body["message"]  # a stable code and a human text
            return resp.status

    async with aiohttp.ClientSession() as http:
        assert await post(http, next(counter)) == 200  # warm: topic exists, producer up
        fresh_broker.pause()
        try:
            deadline = time.monotonic() + 40
            while 503 not in statuses and time.monotonic() < deadline:
                batch = [post(http, next(counter)) for _ in range(16)]
                statuses += await asyncio.gather(*batch)
            assert 503 in statuses, f"never refused: {statuses[-20:]}"
            assert all(v.isdigit() and int(v) > 0 for v in retry_after)
            spooled = len(taken)
        finally:
            fresh_broker.resume()
        # Kafka is back: the spool drains and new requests are taken again.
        deadline = time.monotonic() + 60
        recovered = False
        while time.monotonic() < deadline:
            if await post(http, next(counter)) == 200:
                recovered = True
                break
            await asyncio.sleep(0.5)
        assert recovered, "intake did not resume after Kafka returned"
    assert spooled > 1  # some were taken (spooled) during the outage before it filled

    def in_kafka() -> set[int]:
        return {int(m.value()[:6]) for m in fresh_broker.read_all("bench") if m.key() == b"full-1"}

    with contextlib.suppress(AssertionError):  # the assert below says what is missing
        wait_until(lambda: taken <= in_kafka(), 60)
    got = in_kafka()
    assert taken <= got, f"{len(taken - got)} answered-200 records missing from Kafka"
