"""Idempotency-Key retries over a real HTTP server, with a pipeline that fails on cue.

REST Proxy records of one request all go to one topic, so a real broker cannot
fail one of them retriably and take the other; this pipeline can.  Before the
fix, a 200 with a retriable ``error_code`` 2 was stored and replayed to every
retry: the failed record was never produced.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.buffer import FlowControl
from gateway.config import load_config
from gateway.errors import DeliveryFailed
from gateway.model import Delivery, Message, Outcome
from gateway.sources.http_server import HttpIngest
from tests.helpers import ANON
from tests.support.pipelines import PublishMany

pytestmark = pytest.mark.integration

JSON_V2 = "application/vnd.kafka.json.v2+json"


class FlakyPipeline(PublishMany):
    """Takes every message, except that a payload of ``"flaky"`` fails once, retriably."""

    def __init__(self) -> None:
        self.flow = FlowControl(1 << 20, 1 << 19)
        self.published: Counter[bytes] = Counter()

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        self.published[message.payload] += 1
        if message.payload == b'"flaky"' and self.published[message.payload] == 1:
            on_done(Outcome(ok=False, error=DeliveryFailed("Local: Message timed out",
                                                           retriable=True,
                                                           kafka_code="_MSG_TIMED_OUT")))
            return
        n = sum(self.published.values())
        on_done(Outcome(ok=True, deliveries=[Delivery(cluster="default", topic="t",
                                                      partition=0, offset=n)]))


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FlakyPipeline]]:
    pipeline = FlakyPipeline()
    config = load_config(None, env=ANON)
    ingest = HttpIngest(pipeline, config.limits, allow_anonymous=True)  # type: ignore[arg-type]
    server = TestServer(ingest.web_app())
    await server.start_server()
    yield str(server.make_url("")), pipeline
    await server.close()


async def post(url: str, body: object, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=json.dumps(body), headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_rest_proxy_retry_produces_only_the_retriable_record(
        served: tuple[str, FlakyPipeline]) -> None:
    url, pipeline = served
    headers = {"Content-Type": JSON_V2, "Idempotency-Key": "rest-1", "X-Client-Id": "app"}
    body = {"records": [{"value": "steady"}, {"value": "flaky"}]}
    status, first = await post(f"{url}/topics/orders", body, headers)
    assert status == 200
    assert first["offsets"][0]["error_code"] is None
    assert first["offsets"][1]["error_code"] == 2  # retriable
    status, second = await post(f"{url}/topics/orders", body, headers)
    assert status == 200
    assert [o["error_code"] for o in second["offsets"]] == [None, None]
    assert second["offsets"][0] == first["offsets"][0]  # answered from the first attempt
    assert pipeline.published == {b'"steady"': 1, b'"flaky"': 2}
    status, third = await post(f"{url}/topics/orders", body, headers)
    assert (status, third) == (200, second)  # final now: replayed
    assert pipeline.published == {b'"steady"': 1, b'"flaky"': 2}


async def test_batch_retry_produces_only_the_retriable_record(
        served: tuple[str, FlakyPipeline]) -> None:
    url, pipeline = served
    headers = {"Content-Type": "application/json", "Idempotency-Key": "batch-1"}
    body = [{"topic": "a/b", "payload": "steady"}, {"topic": "a/b", "payload": "flaky"},
            {"topic": "a/+", "payload": "bad topic"}]
    status, first = await post(f"{url}/v1/batch", body, headers)
    assert status == 207 and [r["status"] for r in first["results"]] == [200, 502, 400]
    status, second = await post(f"{url}/v1/batch", body, headers)
    assert status == 207 and [r["status"] for r in second["results"]] == [200, 200, 400]
    assert pipeline.published == {b'"steady"': 1, b'"flaky"': 2}
    assert (await post(f"{url}/v1/batch", body, headers)) == (207, second)
    assert pipeline.published == {b'"steady"': 1, b'"flaky"': 2}
