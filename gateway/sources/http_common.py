"""What every HTTP ingest endpoint shares: errors as JSON, bodies, rates.

The handlers in ``http_server`` and ``rest_proxy`` only decide what a request
means; reading the body within its limits, rate limits, and turning a
``GatewayError`` into an honest status live here once (who is asking:
``http_auth``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import (
    GatewayError,
    NotAuthorized,
    PacketTooLarge,
    ProtocolError,
    QuotaExceeded,
    TopicInvalid,
    Unavailable,
)
from gateway.model import Delivery, Message, Outcome
from gateway.pipeline import Pipeline

# Seconds a client should wait after a 503: the buffer drains in well under that
# when Kafka is healthy, and a longer hint only slows recovery.
RETRY_AFTER_S = 1

_encode = msgspec.json.Encoder().encode


# --- errors only HTTP can produce ---------------------------------------------------


class BadRequest(ProtocolError):
    """The request is malformed."""

    code = "bad_request"


class MalformedBatch(BadRequest):
    """A batch record could not be parsed."""

    code = "malformed_batch"


class BodyTooLarge(PacketTooLarge):
    """The request body exceeds limits.http_max_body_bytes."""

    code = "body_too_large"


class TooManyRecords(PacketTooLarge):
    """The batch holds more records than limits.http_max_batch_records."""

    code = "too_many_records"


class UnsupportedMediaType(ProtocolError):
    """The Content-Type is not one this endpoint accepts."""

    code = "unsupported_media_type"
    http_status = 415


class RequestTimeout(ProtocolError):
    """The request body did not arrive within limits.http_body_timeout_s."""

    code = "request_timeout"
    http_status = 408


class BodyBudgetExceeded(Unavailable):
    """Request bodies in flight would exceed limits.http_max_inflight_body_bytes."""

    code = "too_many_bodies_in_flight"


class IdempotencyKeyTooLong(BadRequest):
    """The Idempotency-Key is longer than limits.idempotency_max_key_bytes."""

    code = "idempotency_key_too_long"


class NotAuthenticated(NotAuthorized):
    """The request carries no identity this gateway accepts."""

    code = "not_authenticated"
    http_status = 401

    def __init__(self, message: str = "", *, challenges: Sequence[str] = (),
                 **details: object) -> None:
        super().__init__(message, **details)
        # WWW-Authenticate values: the schemes a client may answer with (RFC 7235).
        self.challenges = list(challenges)


class IdempotencyKeyReused(ProtocolError):
    """This Idempotency-Key was already used for a different request."""

    code = "idempotency_key_reused"
    http_status = 422


# --- responses ------------------------------------------------------------------------


def json_response(body: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(body), status=status, headers=headers,
                        content_type="application/json")


def retry_headers(error: GatewayError) -> dict[str, str]:
    """Retry-After on every refusal a client should retry (429, 503).

    The rate limiter's ``retry_after_s`` detail says how long; otherwise RETRY_AFTER_S.
    """
    if error.retriable and error.http_status in (429, 503):
        wait = error.details.get("retry_after_s")
        seconds = wait if isinstance(wait, int | float) else RETRY_AFTER_S
        return {"Retry-After": str(max(1, round(seconds)))}
    return {}


def error_headers(error: GatewayError) -> CIMultiDict[str]:
    """Retry-After (see retry_headers) and, on a 401, one WWW-Authenticate per scheme."""
    headers = CIMultiDict(retry_headers(error))
    if isinstance(error, NotAuthenticated):
        for challenge in error.challenges:
            headers.add("WWW-Authenticate", challenge)
    return headers


def error_response(error: GatewayError) -> web.Response:
    return web.Response(body=_encode(error.to_json()), status=error.http_status,
                        headers=error_headers(error), content_type="application/json")


class DeliveryJSON(msgspec.Struct, omit_defaults=True, gc=False):
    """Where one record went, as the client reads it: a partition and offset, or
    ``spooled`` (safe on the gateway's disk; Kafka has not assigned them yet)."""

    cluster: str
    topic: str
    partition: int | None = None
    offset: int | None = None
    spooled: bool = False


class ResultJSON(msgspec.Struct, omit_defaults=True, gc=False):
    """One taken record of a batch answer (a refused one is ``{index, status, error...}``).
    A struct, not a dict: a batch makes one per record (msgspec encodes it faster)."""

    index: int
    status: int
    deliveries: list[DeliveryJSON]
    rule: str = ""
    dropped: bool = False
    dead_lettered: bool = False


def delivery_json(delivery: Delivery) -> DeliveryJSON:
    if delivery.spooled:
        return DeliveryJSON(delivery.cluster, delivery.topic, spooled=True)
    return DeliveryJSON(delivery.cluster, delivery.topic, delivery.partition, delivery.offset)


def deliveries_json(outcome: Outcome) -> list[DeliveryJSON]:
    deliveries = outcome.deliveries
    # One delivery is the usual case: no comprehension (a function call of its own).
    return ([delivery_json(deliveries[0])] if len(deliveries) == 1
            else [delivery_json(d) for d in deliveries])


def outcome_json(outcome: Outcome) -> dict[str, object]:
    """The success body: where the message went, and anything surprising about it."""
    body: dict[str, object] = {"deliveries": deliveries_json(outcome)}
    if outcome.rule:
        body["rule"] = outcome.rule
    if outcome.dropped:
        body["dropped"] = True
    if outcome.dead_lettered:
        body["dead_lettered"] = True
    return body


def result_json(index: int, outcome: Outcome) -> ResultJSON:
    """``outcome_json`` of a taken record, with its index and status, for a batch answer."""
    return ResultJSON(index, 200, deliveries_json(outcome), outcome.rule, outcome.dropped,
                      outcome.dead_lettered)


# --- the pipeline as an awaitable ------------------------------------------------------


def publish(pipeline: Pipeline, message: Message) -> asyncio.Future[Outcome]:
    """Hand ``message`` to the pipeline; the future resolves when its fate is known."""
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def done(outcome: Outcome) -> None:
        if not future.done():  # the client may have gone; the answer still resolves
            future.set_result(outcome)

    pipeline.publish(message, done)
    return future


async def publish_all(pipeline: Pipeline, todo: list[Message | Outcome | None]
                      ) -> Sequence[Outcome | None]:
    """Every Message to the pipeline; the outcomes in the same order, once all are known.

    An Outcome in ``todo`` stands as given, None stays None.  One ``publish_many``
    for all the messages, so the handler wakes once rather than once per record.
    """
    messages = [item for item in todo if isinstance(item, Message)]
    found: list[Outcome] = []
    if messages:
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()

        def done(outcomes: list[Outcome]) -> None:
            if not future.done():  # the client may have gone; the answer still resolves
                future.set_result(outcomes)

        pipeline.publish_many(messages, done)
        found = await future
        if len(found) == len(todo):  # every item was a Message: nothing to put in between
            return found
    it = iter(found)
    return [next(it) if isinstance(item, Message) else item for item in todo]


def check_topic(topic: str) -> None:
    """MQTT topic-name rules, so HTTP cannot publish what MQTT could not."""
    if not topic:
        raise TopicInvalid("topic is empty")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicInvalid(f"topic {topic!r} contains a wildcard or NUL")
    if len(topic.encode()) > 65_535:
        raise TopicInvalid("topic is longer than 65535 bytes")


# --- the body ---------------------------------------------------------------------------


class BodyBudget:
    """Request-body bytes one worker reads or holds at once (http_max_inflight_body_bytes).

    Each request holds a ``Hold``: its Content-Length before the body is read, then
    what it really read (a chunked or gzip body grows it while reading).  A request
    that would take the total over the limit is refused (503) and holds nothing;
    a lone request always fits, so the limit never refuses a body the size limit
    allows.  ``Hold.release`` runs on every path (answer, error, disconnect, timeout).
    """

    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: off
        self.used = 0
        self.refused = 0

    def hold(self) -> Hold:
        return Hold(self)

    def _take(self, n: int, own: int) -> None:
        # ``own``: what the asking request already holds (alone, it always fits).
        if self.limit and self.used > own and self.used + n > self.limit:
            self.refused += 1
            raise BodyBudgetExceeded(
                f"request bodies in flight would exceed {self.limit} bytes; retry later",
                limit=self.limit)
        self.used += n


class Hold:
    __slots__ = ("budget", "bytes")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def grow_to(self, n: int) -> None:
        if n > self.bytes:
            self.budget._take(n - self.bytes, self.bytes)
            self.bytes = n

    def release(self) -> None:
        self.budget.used -= self.bytes
        self.bytes = 0


async def read_body(request: web.Request, max_bytes: int, timeout_s: float,
                    hold: Hold | None = None) -> bytes:
    """The whole body, decompressed (aiohttp inflates ``Content-Encoding: gzip``).

    The size limit applies to the decompressed bytes and is checked while
    reading, so neither a lying Content-Length nor a gzip bomb gets past it.
    ``hold`` (the in-flight body budget) is taken for the Content-Length before
    anything is read, and grows with what a chunked or inflated body really is.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge(f"body is {length} bytes; the limit is {max_bytes}")
    if hold is not None and length:
        hold.grow_to(length)
    stream = request.content
    if stream.is_eof():
        # The whole body came with the head (the usual small POST): nothing to wait
        # for, so neither the timer nor the chunk loop.
        body = stream.read_nowait()
        if len(body) > max_bytes:
            raise BodyTooLarge(f"body exceeds {max_bytes} bytes")
        if hold is not None:
            hold.grow_to(len(body))
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in stream.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLarge(f"body exceeds {max_bytes} bytes")
                if hold is not None:
                    hold.grow_to(size)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"body not received within {timeout_s:g}s") from exc
    except ConnectionError as exc:  # nobody is left to answer; the hold is released
        raise BadRequest("the client closed the connection before its body ended") from exc
    return b"".join(chunks)


def media_type(request: web.Request) -> str:
    # aiohttp reports a missing Content-Type as application/octet-stream.
    return request.content_type.lower()


def text_header(name: str, value: str) -> str:
    """A header value that becomes text (client id, user property): UTF-8, no NUL.

    aiohttp decodes header bytes that are not UTF-8 to lone surrogates; those
    cannot be encoded again for Kafka keys or headers, so they are refused here.
    """
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"header {name} is not valid UTF-8", header=str(name)) from exc
    if "\x00" in value:
        raise BadRequest(f"header {name} contains NUL", header=str(name))
    return value


# --- rates ---------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client, in a bounded LRU (an idle client's bucket is full anyway).

    ``client`` is the caller's scope (``http_auth.Caller.scope``): a verified
    identity, or the source address of an anonymous client.
    """

    __slots__ = ("_buckets", "burst", "max_clients", "rate")

    def __init__(self, rate: float, burst: float, max_clients: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1.0, burst or rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def take(self, client: Hashable, now: float | None = None) -> float:
        """0 when allowed; otherwise the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def check(self, client: Hashable) -> None:
        wait = self.take(client)
        if wait > 0:
            raise QuotaExceeded(f"more than {self.rate:g} requests/s",
                                retry_after_s=round(wait, 3))
