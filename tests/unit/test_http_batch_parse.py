"""Batch parsing (the one-call JSON array path and the per-record path agree) and
``publish_all`` (one wake-up for many records): no sockets, no broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from gateway.auth import ANONYMOUS
from gateway.errors import NotAuthorized
from gateway.model import Message, Outcome
from gateway.sources.http_auth import Caller
from gateway.sources.http_batch import _status, parse_batch, produce_batch
from gateway.sources.http_common import MalformedBatch, TooManyRecords, publish_all
from tests.support.pipelines import PublishMany

pytestmark = pytest.mark.unit

CALLER = Caller(ANONYMOUS, "dev-1", ("anonymous", "127.0.0.1"))
RECORDS = [
    {"topic": "in/a", "payload": {"n": 1, "s": "x"}},
    {"topic": "in/b", "payload_text": "hé", "key": "k", "headers": {"h": "v"}},
    {"topic": "in/c", "payload_base64": "AAE="},
]


def _fields(m: Message) -> tuple[object, ...]:
    return (m.topic, m.payload, m.key, m.headers, m.client_id, m.source, m.qos)


def test_array_and_ndjson_give_the_same_messages() -> None:
    array = parse_batch(json.dumps(RECORDS).encode(), "application/json", CALLER, 10)
    lines = "\n".join(json.dumps(r) for r in RECORDS).encode()
    ndjson = parse_batch(lines, "application/x-ndjson", CALLER, 10)
    assert [_fields(m) for m in array] == [_fields(m) for m in ndjson]
    assert array[0].payload == json.dumps(RECORDS[0]["payload"]).encode()  # as sent
    assert (array[1].payload, array[1].key, array[1].headers) == (
        "hé".encode(), b"k", [("h", b"v")])
    assert array[2].payload == b"\x00\x01"


@pytest.mark.parametrize(("record", "message"), [
    ({"topic": "in/a", "payload": 1, "payload_text": "x"},
     "record 1: give exactly one of payload, payload_text, payload_base64"),
    ({"topic": "in/a", "payload_base64": "%%"}, "record 1: payload_base64 is not valid"),
    ({"payload": 1}, "record 1: Object missing required field `topic`"),
    ({"topic": "in/a", "payload": 1, "extra": 2}, "record 1: Object contains unknown field"),
])
def test_a_bad_record_in_an_array_is_named(record: dict[str, object], message: str) -> None:
    body = json.dumps([{"topic": "in/a", "payload": 1}, record]).encode()
    with pytest.raises(MalformedBatch) as caught:
        parse_batch(body, "application/json", CALLER, 10)
    assert caught.value.message.startswith(message)
    assert caught.value.to_json()["details"] == {"index": 1}


def test_array_bounds() -> None:
    with pytest.raises(MalformedBatch, match="no records"):
        parse_batch(b"[]", "application/json", CALLER, 10)
    with pytest.raises(TooManyRecords):
        parse_batch(json.dumps(RECORDS).encode(), "application/json", CALLER, 2)
    with pytest.raises(MalformedBatch, match="not a JSON array"):
        parse_batch(b'{"topic": "in/a"}', "application/json", CALLER, 10)


class Pipeline(PublishMany):
    """Keeps each on_done to resolve later; refuses topics under ``no/`` at once."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Message, Callable[[Outcome], None]]] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        if message.topic.startswith("no/"):
            on_done(Outcome(ok=False, error=NotAuthorized("refused")))
        else:
            self.waiting.append((message, on_done))


def _msg(topic: str) -> Message:
    return Message(source="http", topic=topic, payload=b"")


async def test_publish_all_keeps_order_and_wakes_once_all_are_known() -> None:
    pipeline = Pipeline()
    given = Outcome(ok=True, dropped=True)
    task = asyncio.ensure_future(publish_all(
        pipeline, [_msg("a"), None, _msg("no/x"), given, _msg("b")]))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not task.done() and len(pipeline.waiting) == 2
    pipeline.waiting[1][1](Outcome(ok=True, rule="second"))  # out of order
    await asyncio.sleep(0)
    assert not task.done()
    pipeline.waiting[0][1](Outcome(ok=True, rule="first"))
    outcomes = await task
    assert outcomes[0] is not None and outcomes[0].rule == "first"
    assert outcomes[1] is None and outcomes[3] is given
    assert outcomes[2] is not None and not outcomes[2].ok
    assert outcomes[4] is not None and outcomes[4].rule == "second"


async def test_publish_all_without_waiting_and_after_the_client_left() -> None:
    pipeline = Pipeline()
    [refused] = await publish_all(pipeline, [_msg("no/a")])  # type: ignore[arg-type]
    assert refused is not None and isinstance(refused.error, NotAuthorized)
    task = asyncio.ensure_future(publish_all(pipeline, [_msg("a")]))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    pipeline.waiting[0][1](Outcome(ok=True))  # the record's fate still arrives: no error


async def test_a_bad_topic_is_refused_wherever_it_is_in_the_batch() -> None:
    """Each record's topic is checked (a topic repeated from the record before is
    known good), an empty one too, even first."""
    pipeline = Pipeline()
    messages = [_msg(""), _msg("a"), _msg("a"), _msg("a/+"), _msg("a/+"), _msg("")]
    task = asyncio.ensure_future(produce_batch(pipeline, messages))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    for _, on_done in pipeline.waiting:
        on_done(Outcome(ok=True))
    status, body, _ = await task
    assert status == 207
    results = body["results"]
    assert isinstance(results, list)
    assert [_status(r) for r in results] == [400, 200, 200, 400, 400, 400]
    assert [m.topic for m, _ in pipeline.waiting] == ["a", "a"]
