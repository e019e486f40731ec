"""POST /v1/batch: many records in one request, one result per record.

Parsing is all-or-nothing: a record that cannot be read makes the request
malformed (400, naming its index and, for NDJSON, its line), and nothing is
produced.  Once every record parses, each one is routed and produced on its
own, and the answer says per record what happened: a refusal by the rules
refuses that record only.
"""

from __future__ import annotations

import base64
import binascii
import time

import msgspec

from gateway.errors import GatewayError, TopicInvalid, Unavailable
from gateway.model import Message, Outcome
from gateway.pipeline import Pipeline
from gateway.sources.http_auth import Caller
from gateway.sources.http_common import (
    MalformedBatch,
    ResultJSON,
    TooManyRecords,
    UnsupportedMediaType,
    check_topic,
    publish_all,
    result_json,
)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines"})

_EMPTY = msgspec.Raw()


class BatchRecord(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    # Exactly one of the three payload forms; an absent Raw is empty.
    payload: msgspec.Raw = _EMPTY
    payload_text: str | None = None
    payload_base64: str | None = None
    key: str | None = None
    headers: dict[str, str] = {}


_decode_list = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_record = msgspec.json.Decoder(BatchRecord).decode
# The fast path for a JSON array: every record in one call.  Any decode error goes
# back to one record at a time, which names the record (index) that is wrong.
_decode_records = msgspec.json.Decoder(list[BatchRecord]).decode


def _payload(record: BatchRecord) -> bytes:
    text, b64 = record.payload_text, record.payload_base64
    if text is None and b64 is None and record.payload:
        # A JSON value travels as the exact bytes the client sent: no re-encoding.
        return bytes(record.payload)
    if (len(record.payload) > 0) + (text is not None) + (b64 is not None) != 1:
        raise ValueError("give exactly one of payload, payload_text, payload_base64")
    if text is not None:
        return text.encode()
    assert b64 is not None
    try:
        return base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"payload_base64 is not valid base64: {exc}") from exc


def _message(raw: bytes, caller: Caller, now: float) -> Message:
    return _from_record(_decode_record(raw), caller, now)


def _from_record(record: BatchRecord, caller: Caller, now: float) -> Message:
    identity = caller.identity
    return Message(
        source="http", topic=record.topic, payload=_payload(record), qos=1,
        client_id=caller.client_id, username=identity.name,
        cert_identity=identity.cert, claims=identity.claims,
        key=record.key.encode() if record.key is not None else None,
        headers=[(name, value.encode()) for name, value in record.headers.items()]
        if record.headers else [],
        received_at=now,
    )


def _items(body: bytes, content_type: str) -> list[tuple[bytes, int | None]]:
    """The raw records, each with its NDJSON line number (None for a JSON array)."""
    if content_type in JSON_TYPES:
        try:
            return [(bytes(raw), None) for raw in _decode_list(body)]
        except msgspec.DecodeError as exc:
            raise MalformedBatch(f"body is not a JSON array: {exc}") from exc
    if content_type in NDJSON_TYPES:
        lines = body.split(b"\n")
        return [(line, n) for n, line in enumerate(lines, 1) if line.strip()]
    raise UnsupportedMediaType(
        f"Content-Type {content_type!r}: use application/json or application/x-ndjson")


def parse_batch(body: bytes, content_type: str, caller: Caller,
                max_records: int) -> list[Message]:
    """Messages for every record, or the error naming the first bad one."""
    if content_type in JSON_TYPES:
        fast = _parse_array(body, caller, max_records)
        if fast is not None:
            return fast
    items = _items(body, content_type)
    if not items:
        raise MalformedBatch("the batch holds no records")
    if len(items) > max_records:
        raise TooManyRecords(f"{len(items)} records; the limit is {max_records}")
    now = time.time()
    messages = []
    for index, (raw, line) in enumerate(items):
        try:
            messages.append(_message(raw, caller, now))
        except (msgspec.DecodeError, ValueError) as exc:
            where = f"record {index}" + (f" (line {line})" if line is not None else "")
            raise MalformedBatch(f"{where}: {exc}", index=index, line=line) from exc
    return messages


def _parse_array(body: bytes, caller: Caller, max_records: int) -> list[Message] | None:
    """A JSON array decoded in one call; None when any of it is wrong (the slow path
    then finds and names the bad record, with the same message)."""
    try:
        records = _decode_records(body)
    except msgspec.DecodeError:
        return None
    if not records or len(records) > max_records:
        return None
    now = time.time()
    messages = []
    for index, record in enumerate(records):
        try:
            messages.append(_from_record(record, caller, now))
        except ValueError as exc:
            raise MalformedBatch(f"record {index}: {exc}", index=index, line=None) from exc
    return messages


def _result(index: int, outcome: Outcome) -> ResultJSON | dict[str, object]:
    if outcome.ok:
        return result_json(index, outcome)
    error = outcome.error or Unavailable("no outcome")
    return {"index": index, "status": error.http_status, **error.to_json()}


def _status(result: object) -> object:
    """The status of a result this or an earlier attempt answered."""
    if isinstance(result, ResultJSON):
        return result.status
    return result.get("status") if isinstance(result, dict) else None


def _settled(outcome: Outcome) -> bool:
    """Final: taken, or refused for a reason a retry cannot change."""
    return outcome.ok or (outcome.error is not None and not outcome.error.retriable)


async def produce_batch(pipeline: Pipeline, messages: list[Message],
                        earlier: list[object | None] | None = None
                        ) -> tuple[int, dict[str, object], list[object | None]]:
    """Publish every message; the status and body that answer the whole batch.

    200 only when every record was taken; 503 when none was and every refusal
    was the gateway being unable to take more (the client should retry all);
    403 when none was because rules' ``allow`` refused every one; 207
    otherwise, with the status of each record.  ``earlier`` holds the
    results an earlier attempt with the same Idempotency-Key settled: those
    records are answered from it, not produced again.  The third value is the
    same for this answer (None where a record's failure was retriable).
    """
    todo: list[Message | Outcome | None] = []
    checked: str | None = None  # the last topic found valid: records often share one
    for index, message in enumerate(messages):
        if earlier is not None and index < len(earlier) and earlier[index] is not None:
            todo.append(None)  # answered from the earlier attempt
            continue
        if message.topic != checked:
            try:
                check_topic(message.topic)
            except TopicInvalid as exc:
                todo.append(Outcome(ok=False, error=exc))
                continue
            checked = message.topic
        todo.append(message)
    outcomes = await publish_all(pipeline, todo)
    results: list[object] = []
    settled: list[object | None] = []
    retriable_only = True  # every refusal so far was "cannot take more"
    taken = 0
    for index, outcome in enumerate(outcomes):
        if outcome is None:
            assert earlier is not None
            old = earlier[index]
            assert old is not None
            results.append(old)
            settled.append(old)
            if _status(old) != 200:
                retriable_only = False
            else:
                taken += 1
            continue
        result = _result(index, outcome)
        results.append(result)
        if outcome.ok:
            taken += 1
            settled.append(result)
            continue
        settled.append(result if _settled(outcome) else None)
        if not _unavailable(outcome.error):
            retriable_only = False
    body: dict[str, object] = {"taken": taken, "refused": len(results) - taken,
                               "results": results}
    if taken == len(results):
        return 200, body, settled
    if taken == 0 and retriable_only:
        return 503, body, settled
    if taken == 0 and all(_status(r) == 403 for r in results):
        # Nothing here is this client's to publish: say so as a whole, not as a 2xx.
        return 403, body, settled
    return 207, body, settled


def _unavailable(error: GatewayError | None) -> bool:
    return isinstance(error, Unavailable) or (
        error is not None and error.retriable and error.http_status == 503)
