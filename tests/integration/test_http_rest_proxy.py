"""Confluent REST Proxy v2 produce requests, as its clients send them, and its answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Broker
from tests.integration.http_support import RULES, Gateway, http_gateway, tenant

pytestmark = pytest.mark.integration

JSON_V2 = "application/vnd.kafka.json.v2+json"
BINARY_V2 = "application/vnd.kafka.binary.v2+json"
RESPONSE_V2 = "application/vnd.kafka.v2+json"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("rest-proxy"), broker.bootstrap) as gateway:
        yield gateway


async def produce(gw: Gateway, topic: str, body: object,
                  content_type: str) -> tuple[int, Any, str]:
    headers = {"Content-Type": content_type, "Accept": RESPONSE_V2}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gw.url}/topics/{topic}", data=json.dumps(body), headers=headers) as resp:
        return resp.status, json.loads(await resp.read()), resp.content_type


async def test_json_embedded_format(gw: Gateway, broker: Broker) -> None:
    topic = f"rest.json.{tenant()}"
    body = {"records": [{"key": "user-1", "value": {"clicks": 3}}, {"value": [1, "two"]}]}
    status, answer, ctype = await produce(gw, topic, body, JSON_V2)
    assert (status, ctype) == (200, RESPONSE_V2)
    assert answer["key_schema_id"] is None and answer["value_schema_id"] is None
    assert len(answer["offsets"]) == 2
    for entry in answer["offsets"]:
        assert set(entry) == {"partition", "offset", "error_code", "error"}
        assert isinstance(entry["partition"], int) and isinstance(entry["offset"], int)
        assert entry["error_code"] is None and entry["error"] is None
    got = {m.value(): m.key() for m in broker.read(topic, 2)}
    # The json format serialises keys and values as JSON, as REST Proxy does.
    assert got == {b'{"clicks": 3}': b'"user-1"', b'[1, "two"]': None}


async def test_binary_embedded_format_and_partition(gw: Gateway, broker: Broker) -> None:
    topic = f"rest.bin.{tenant()}"
    broker.create_topic(topic, partitions=3)
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    body = {"records": [{"key": b64(b"k\x00"), "value": b64(b"\xff\xfe"), "partition": 2},
                        {"value": b64(b"plain")}]}
    status, answer, _ = await produce(gw, topic, body, BINARY_V2)
    assert status == 200, answer
    assert answer["offsets"][0]["partition"] == 2
    got = {m.value(): (m.key(), m.partition()) for m in broker.read(topic, 2)}
    assert got[b"\xff\xfe"] == (b"k\x00", 2)
    assert got[b"plain"][0] is None


async def test_unrouted_topic_is_40401(tmp_path: Path, broker: Broker) -> None:
    # Without the kafka/{name} rule (and unmatched: reject): REST Proxy's "topic not found".
    rule = ('  - name: rest-proxy\n    match: {topic: "kafka/{name}", source: http}\n'
            '    kafka: {topic: "{name}"}\n')
    assert rule in RULES
    rules = RULES.replace(rule, "")
    with http_gateway(tmp_path, broker.bootstrap, rules_text=rules) as gateway:
        status, answer, _ = await produce(gateway, "orders", {"records": [{"value": 1}]},
                                          JSON_V2)
    assert (status, answer["error_code"], answer["error"]) == (404, 40401, "no_matching_rule")


@pytest.mark.parametrize(("body", "content_type", "status", "error_code"), [
    ({"records": [{"value": 1}]}, "application/vnd.kafka.avro.v2+json", 415, 415),
    ({"records": [{"value": "%%%"}]}, BINARY_V2, 400, 400),
    ({"records": []}, JSON_V2, 400, 400),
    ({"recs": 1}, JSON_V2, 400, 400),
])
async def test_request_errors_keep_rest_proxy_shape(gw: Gateway, body: object,
                                                    content_type: str, status: int,
                                                    error_code: int) -> None:
    got, answer, ctype = await produce(gw, f"rest.err.{tenant()}", body, content_type)
    assert (got, answer["error_code"], ctype) == (status, error_code, RESPONSE_V2)
    assert answer["message"] and answer["error"]  # REST Proxy's shape plus our stable code
