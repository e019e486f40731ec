"""Confluent REST Proxy v2 produce (``POST /topics/{topic}``), so its clients work unchanged.

Records go through the rules like any other publish: the Kafka topic named in
the URL becomes the MQTT-style topic ``kafka/{topic}`` with source ``http``,
and a rule such as ``match: {topic: "kafka/{name}", source: http}`` with
``kafka: {topic: "{name}"}`` sends it on (see docs/http.md).  Explicit keys
and partitions from the request win over the rule's.

Answers keep REST Proxy's shapes: ``offsets`` with per-record ``error_code``
1 (not retriable) or 2 (retriable) and ``{"error_code", "message"}`` bodies for
whole-request errors (40101 not authenticated, 40301 not allowed by a rule,
40401 topic not found, 42201 too large, 50003 retriable Kafka error...).  Our
own stable ``error`` code rides along in those bodies.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated

import msgspec
from aiohttp import web

from gateway.errors import (
    GatewayError,
    NoMatchingRule,
    NotAuthorized,
    PacketTooLarge,
    PayloadTooLarge,
    Unavailable,
    UnknownPartition,
)
from gateway.model import Message, Outcome
from gateway.pipeline import Pipeline
from gateway.sources.http_auth import Caller
from gateway.sources.http_common import (
    BadRequest,
    NotAuthenticated,
    TooManyRecords,
    UnsupportedMediaType,
    check_topic,
    error_headers,
    media_type,
    publish_all,
)

RESPONSE_TYPE = "application/vnd.kafka.v2+json"
# REST Proxy assumes binary when the embedded format is left out.
FORMATS = {
    "application/vnd.kafka.json.v2+json": "json",
    "application/vnd.kafka.binary.v2+json": "binary",
    "application/vnd.kafka.v2+json": "binary",
}
_EMPTY = msgspec.Raw()
_encode = msgspec.json.Encoder().encode


# Kafka partitions are int32; librdkafka raises OverflowError beyond (issue #10).
Partition = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class RestRecord(msgspec.Struct):
    key: msgspec.Raw = _EMPTY
    value: msgspec.Raw = _EMPTY
    partition: Partition | None = None


class RestProduce(msgspec.Struct):
    # key_schema / value_schema fields of Avro requests are ignored: json and binary only.
    records: list[RestRecord]


_decode = msgspec.json.Decoder(RestProduce).decode
_decode_str = msgspec.json.Decoder(str | None).decode


def rule_topic(kafka_topic: str) -> str:
    """The MQTT-style topic a REST Proxy record is routed by."""
    return f"kafka/{kafka_topic}"


def _rest_code(error: GatewayError) -> int:
    """REST Proxy's error_code: HTTP status x 100 + sub-code, or the bare status."""
    if isinstance(error, NotAuthenticated):
        return 40101  # REST Proxy's authentication error (WWW-Authenticate rides along)
    if isinstance(error, NotAuthorized):
        return 40301  # REST Proxy's authorization error: a rule's allow refused
    if isinstance(error, NoMatchingRule):
        return 40401
    kafka_code = getattr(error, "kafka_code", "")
    if isinstance(error, UnknownPartition) or kafka_code == "_UNKNOWN_PARTITION":
        return 40402  # REST Proxy's "partition not found"
    if kafka_code in ("UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC"):
        return 40401  # the topic does not exist on the cluster
    if isinstance(error, PayloadTooLarge | PacketTooLarge) and error.http_status == 413:
        return 42201 if isinstance(error, PayloadTooLarge) else 413
    if error.retriable and error.http_status >= 500:
        return 50003
    if error.http_status >= 500:
        return 50002
    return error.http_status


def error_response(error: GatewayError) -> web.Response:
    code = _rest_code(error)
    status = 422 if code == 42201 else code // 100 if code in (40401, 40402) \
        else error.http_status
    body = {"error_code": code, "message": error.message, "error": error.code}
    return web.Response(body=_encode(body), status=status, headers=error_headers(error),
                        content_type=RESPONSE_TYPE)


def _bytes(raw: msgspec.Raw, fmt: str) -> bytes | None:
    """None for an absent or null field; JSON as sent, or base64-decoded binary."""
    if raw == _EMPTY or bytes(raw) == b"null":
        return None
    if fmt == "json":
        return bytes(raw)
    text = _decode_str(raw)
    try:
        return base64.b64decode(text or "", validate=True)
    except binascii.Error as exc:
        raise BadRequest(f"binary key/value is not valid base64: {exc}") from exc


def _messages(body: bytes, fmt: str, topic: str, caller: Caller,
              max_records: int) -> list[Message]:
    try:
        request = _decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed produce request: {exc}") from exc
    if not request.records:
        raise BadRequest("the request holds no records")
    if len(request.records) > max_records:
        raise TooManyRecords(f"{len(request.records)} records; the limit is {max_records}")
    now = time.time()
    out = []
    for record in request.records:
        try:
            key, value = _bytes(record.key, fmt), _bytes(record.value, fmt)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"binary key/value must be a base64 string: {exc}") from exc
        out.append(Message(
            source="http", topic=rule_topic(topic), payload=value or b"", qos=1,
            client_id=caller.client_id, username=caller.identity.name,
            cert_identity=caller.identity.cert, claims=caller.identity.claims,
            key=key, partition=record.partition, received_at=now))
    return out


def _offset(outcome: Outcome) -> dict[str, object]:
    if outcome.ok and not outcome.dead_lettered and outcome.deliveries:
        first = outcome.deliveries[0]
        partition = None if first.spooled else first.partition
        offset = None if first.spooled else first.offset
        return {"partition": partition, "offset": offset, "error_code": None, "error": None}
    if outcome.ok and outcome.dropped:
        return {"partition": None, "offset": None, "error_code": None, "error": None}
    if outcome.ok:  # dead-lettered: in Kafka, but not where the client asked
        return {"partition": None, "offset": None, "error_code": 1,
                "error": "not routed by any rule: kept in the dead-letter topic"}
    error = outcome.error or Unavailable("no outcome")
    return {"partition": None, "offset": None, "error_code": 2 if error.retriable else 1,
            "error": f"{error.code}: {error.message}"}


async def produce(pipeline: Pipeline, request: web.Request, caller: Caller,
                  body: bytes, max_records: int, earlier: list[object | None] | None = None,
                  ) -> tuple[web.Response, list[object | None]]:
    """The answer, and each record's final ``offsets`` entry (None: retriable, retry it).

    ``earlier``: the entries an earlier attempt with the same Idempotency-Key
    settled; those records are answered from it, not produced again.
    """
    fmt = FORMATS.get(media_type(request))
    if fmt is None:
        raise UnsupportedMediaType(
            f"Content-Type {media_type(request)!r}: use application/vnd.kafka.json.v2+json "
            "or application/vnd.kafka.binary.v2+json")
    topic = request.match_info["topic"]
    check_topic(rule_topic(topic))
    messages = _messages(body, fmt, topic, caller, max_records)
    redo = [i for i in range(len(messages))
            if earlier is None or i >= len(earlier) or earlier[i] is None]
    found = await publish_all(pipeline, [messages[i] for i in redo])
    outcomes = [o for o in found if o is not None]
    if earlier is None:
        refused = [o for o in outcomes if not o.ok]
        if len(refused) == len(outcomes) and refused[0].error is not None:
            # Nothing was taken: answer as REST Proxy does for a whole failed request.
            raise refused[0].error
        if all(o.dead_lettered for o in outcomes):
            raise NoMatchingRule(f"no rule routes Kafka topic {topic!r} "
                                 "(records kept in the dead-letter topic)")
    offsets: list[object | None] = list(earlier or [None] * len(messages))
    offsets += [None] * (len(messages) - len(offsets))
    settled = list(offsets)
    for index, outcome in zip(redo, outcomes, strict=True):
        entry = _offset(outcome)
        offsets[index] = entry
        settled[index] = entry if entry["error_code"] != 2 else None
    body_out = {"key_schema_id": None, "value_schema_id": None, "offsets": offsets}
    response = web.Response(body=_encode(body_out), status=200, content_type=RESPONSE_TYPE)
    return response, settled
