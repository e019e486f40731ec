"""POST /v1/batch, Idempotency-Key and 503 backpressure against a real gateway and broker."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Broker
from tests.integration.http_support import Gateway, http_gateway, tenant

pytestmark = pytest.mark.integration

MAX_RECORDS = 10


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("http-batch"), broker.bootstrap,
                      limits__http_max_batch_records=MAX_RECORDS) as gateway:
        yield gateway


async def post(url: str, data: bytes | str, content_type: str = "application/json",
               **headers: str) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=data, headers={"Content-Type": content_type, **headers}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_mixed_batch_is_207_with_a_result_per_record(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    records = [
        {"topic": f"in/{t}/a", "payload": {"n": 1}},
        {"topic": "closed/a", "payload_text": "no"},
        {"topic": "nowhere/a", "payload_text": "no"},
        {"topic": f"json/{t}/a", "payload_text": "not json"},
        {"topic": f"in/{t}/b", "payload_base64": base64.b64encode(b"\x00\x01").decode(),
         "key": "k-2", "headers": {"trace": "abc"}},
    ]
    status, body, _ = await post(f"{gw.url}/v1/batch", json.dumps(records),
                                 **{"X-Client-Id": "app-7"})
    assert status == 207, body
    assert [r["status"] for r in body["results"]] == [200, 422, 404, 400, 200]
    assert [r.get("error") for r in body["results"]] == [
        None, "rejected", "no_matching_rule", "payload_invalid", None]
    assert (body["taken"], body["refused"]) == (2, 3)
    got = sorted(broker.read(f"t.http.{t}", 2), key=lambda m: m.value())
    assert [m.value() for m in got] == [b"\x00\x01", b'{"n": 1}']  # JSON as sent
    assert got[0].key() == b"k-2" and ("trace", b"abc") in (got[0].headers() or [])
    assert got[1].key() == b"app-7"


async def test_all_taken_is_200_json_and_ndjson(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    array = json.dumps([{"topic": f"in/{t}/x", "payload": i} for i in range(3)])
    status, body, _ = await post(f"{gw.url}/v1/batch", array)
    assert status == 200 and body["taken"] == 3
    assert all(r["deliveries"][0]["topic"] == f"t.http.{t}" for r in body["results"])
    lines = "\n".join(json.dumps({"topic": f"in/{t}/y", "payload_text": f"l{i}"})
                      for i in range(2)) + "\n"
    status, body, _ = await post(f"{gw.url}/v1/batch", lines, "application/x-ndjson")
    assert status == 200 and body["taken"] == 2
    assert len(broker.read(f"t.http.{t}", 5)) == 5


@pytest.mark.parametrize(("data", "content_type", "details"), [
    ('[{"topic": "in/a/b", "payload": 1}, {"payload": 2}]', "application/json", {"index": 1}),
    ('{"topic": "in/a/b", "payload": 1}\n\n{"topic": "in/a/b", "payload_text": "x",'
     ' "payload": 2}\n', "application/x-ndjson", {"index": 1, "line": 3}),
    ('[{"topic": "in/a/b", "payload": 1},', "application/json", None),
    ("[]", "application/json", None),
])
async def test_malformed_batch_is_400_naming_the_record(
        gw: Gateway, data: str, content_type: str, details: dict[str, int] | None) -> None:
    status, body, _ = await post(f"{gw.url}/v1/batch", data, content_type)
    assert (status, body["error"]) == (400, "malformed_batch")
    assert body.get("details") == details


async def test_too_many_records_413_and_wrong_type_415(gw: Gateway) -> None:
    many = json.dumps([{"topic": "in/a/b", "payload": 1}] * (MAX_RECORDS + 1))
    status, body, _ = await post(f"{gw.url}/v1/batch", many)
    assert (status, body["error"]) == (413, "too_many_records")
    status, body, _ = await post(f"{gw.url}/v1/batch", "a,b", "text/csv")
    assert (status, body["error"]) == (415, "unsupported_media_type")


async def test_idempotent_retry_produces_once(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    batch = json.dumps([{"topic": f"in/{t}/i", "payload": 1}])
    headers = {"X-Client-Id": "retrier", "Idempotency-Key": "order-1"}
    first = await post(f"{gw.url}/v1/batch", batch, **headers)
    again = await post(f"{gw.url}/v1/batch", batch, **headers)
    assert first[0] == again[0] == 200 and first[1] == again[1]
    # Concurrent retries of a new key wait for the first answer instead of producing.
    url = f"{gw.url}/v1/publish/in/{t}/j"
    async with aiohttp.ClientSession() as session:
        async def one() -> tuple[int, Any]:
            async with session.post(url, data=b"once", headers={
                    "X-Client-Id": "retrier", "Idempotency-Key": "order-2"}) as resp:
                return resp.status, await resp.json()
        answers = await asyncio.gather(*(one() for _ in range(5)))
    assert len({json.dumps(a) for a in answers}) == 1 and answers[0][0] == 200
    # An anonymous X-Client-Id names no scope: from the same address it is the same
    # caller, answered from the store (per-identity scopes: test_http_auth.py).
    other = await post(f"{gw.url}/v1/batch", batch, **{**headers, "X-Client-Id": "other"})
    assert other[:2] == first[:2]  # status and body (headers carry a Date that may tick)
    records = broker.read(f"t.http.{t}", 2, timeout=5)
    assert sorted(m.value() for m in records) == [b"1", b"once"]


async def test_503_with_retry_after_when_the_buffer_is_full(
        tmp_path: Path, fresh_broker: Broker) -> None:
    t = tenant()
    with http_gateway(tmp_path, fresh_broker.bootstrap, buffer__high_water_bytes=1000,
                      buffer__low_water_bytes=500) as gateway:
        await post(f"{gateway.url}/v1/publish/in/{t}/warm", b"w", "text/plain")
        fresh_broker.pause()
        try:
            # Accepted into the buffer, never acknowledged: the buffer passes high water.
            status, _, _ = await post(f"{gateway.url}/v1/publish/in/{t}/fill?async=true",
                                      b"f" * 2000, "text/plain")
            assert status == 202
            status, body, headers = await post(f"{gateway.url}/v1/publish/in/{t}/more",
                                               b"m", "text/plain")
            assert (status, body["error"]) == (503, "unavailable")
            assert int(headers["Retry-After"]) >= 1
            batch = json.dumps([{"topic": f"in/{t}/b", "payload": 1}])
            status, body, headers = await post(f"{gateway.url}/v1/batch", batch)
            assert status == 503 and "Retry-After" in headers
        finally:
            fresh_broker.resume()
        assert len(fresh_broker.read(f"t.http.{t}", 2)) == 2  # warm + fill, nothing else
