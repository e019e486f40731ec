"""The HTTP listener: ingest for apps, REST Proxy v2 produce, MQTT over WebSocket.

Every POST goes through the same gate, in this order: who is asking
(``http_auth``: 401 with WWW-Authenticate when nobody this gateway accepts),
their request rate (per verified identity, or per address when anonymous),
the body (size and time limits), the Idempotency-Key (a retry gets the first
answer, within the same scope as the rate), then whether the gateway can
take more (503 with Retry-After while the buffer is paused).
Only then does a handler turn the body into Messages for the pipeline.

Statuses are honest: 200 only once every record is safe (Kafka or the spool),
202 only for ``?async=true`` (accepted into the buffer, not yet safe).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from gateway.errors import GatewayError, Unavailable
from gateway.model import Message, Outcome
from gateway.observability.latency import Latency
from gateway.pipeline import Pipeline
from gateway.sources import rest_proxy
from gateway.sources.http_auth import AnonymousOnly, Caller, HttpAuth
from gateway.sources.http_batch import parse_batch, produce_batch
from gateway.sources.http_common import (
    RETRY_AFTER_S,
    BodyBudget,
    BodyBudgetExceeded,
    IdempotencyKeyTooLong,
    RateLimiter,
    RequestTimeout,
    check_topic,
    error_response,
    json_response,
    media_type,
    outcome_json,
    publish,
    read_body,
    text_header,
)
from gateway.sources.http_guard import HttpGuard
from gateway.sources.idempotency import IdempotencyCache, Stored, fingerprint

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.config.schema import Auth, Config, Limits
    from gateway.sources import Cleanup
    from gateway.sources.mqtt_server import MqttServer
    from gateway.tls import ServerTls

# The MQTT server for WebSocket clients, looked up per request (it starts after HTTP).
MqttLookup = Callable[[], "MqttServer | None"]

log = structlog.get_logger("lastmile.http")

# The last argument: per-record results an earlier attempt with the same
# Idempotency-Key settled (None where a record must be produced again).
Earlier = list[object | None] | None
Handler = Callable[[web.Request, Caller, bytes, Earlier], Awaitable[web.Response]]
OnError = Callable[[GatewayError], web.Response]

USER_PROPERTY_PREFIX = "x-user-property-"
_REPLAYED_HEADERS = ("Content-Type", "Retry-After")
# Where a per-record handler leaves its results for the Idempotency-Key store.
RESULTS: web.ResponseKey[list[object | None]] = web.ResponseKey("lastmile.results")


class HttpIngest:
    """The endpoints of one gateway process; the aiohttp app is built by ``web_app``."""

    def __init__(self, pipeline: Pipeline, limits: Limits, *, allow_anonymous: bool,
                 websocket: tuple[str, MqttLookup] | None = None,
                 auth: Authenticator | None = None, schemes: tuple[str, ...] = ()) -> None:
        """``auth``: the process's Authenticator (None: anonymous access or nothing);
        ``schemes``: what 401 answers offer, "basic" and/or "bearer" (see schemes())."""
        self.pipeline = pipeline
        self.limits = limits
        self.websocket = websocket  # (path, MQTT server lookup) when MQTT over WS is on
        self.auth = HttpAuth(auth or AnonymousOnly(allow_anonymous), schemes)
        self.rate = RateLimiter(limits.http_rate_per_client, limits.http_rate_burst)
        self.idempotency = IdempotencyCache(limits.idempotency_window_s,
                                            limits.idempotency_max_keys,
                                            limits.idempotency_max_bytes)
        self.guard = HttpGuard(limits.http_max_connections, limits.http_header_timeout_s,
                               limits.http_keepalive_timeout_s)
        self.bodies = BodyBudget(limits.http_max_inflight_body_bytes)
        self.body_timeouts = 0  # 408: the body did not arrive within http_body_timeout_s
        self.long_keys = 0  # 400: an Idempotency-Key over idempotency_max_key_bytes
        # Request received -> 2xx answer ready, per listener (lastmile_ack_latency_seconds).
        self.ack_latency = {"http": Latency(), "https": Latency()}

    def refused(self) -> dict[str, int]:
        """Requests and connections refused by a bound, by reason (for /metrics)."""
        guard = self.guard
        return {"max_connections": guard.refused_connections,
                "header_timeout": guard.head_timeouts,
                "keepalive_timeout": guard.idle_closed,
                "body_timeout": self.body_timeouts,
                "inflight_body_bytes": self.bodies.refused,
                "idempotency_key_too_long": self.long_keys}

    def web_app(self) -> web.Application:
        web_app = web.Application(middlewares=[_json_errors])
        web_app.router.add_post("/v1/publish/{topic:.+}", self.publish)
        web_app.router.add_post("/v1/batch", self.batch)
        web_app.router.add_post("/topics/{topic}", self.rest_produce)
        if self.websocket is not None:
            from gateway.sources.websocket import MqttOverWebSocket

            path, lookup = self.websocket
            web_app.router.add_get(path, MqttOverWebSocket(self.limits, lookup).handle)
        return web_app

    # --- the gate ----------------------------------------------------------------------

    async def _gate(self, request: web.Request, handler: Handler,
                    on_error: OnError = error_response) -> web.Response:
        started = time.monotonic()
        response = await self._gated(request, handler, on_error)
        if response.status < 300:  # the ack: accepted and safe (or 202 accepted)
            self.ack_latency["https" if request.secure else "http"].observe(
                time.monotonic() - started)
        return response

    async def _gated(self, request: web.Request, handler: Handler,
                     on_error: OnError) -> web.Response:
        hold = self.bodies.hold()  # this request's share of the in-flight body budget
        try:
            caller = await self.auth.identify(request)
            # Bound to the verified identity (or the address of an anonymous client):
            # X-Client-Id alone reaches no one else's bucket or stored answers.
            self.rate.check(caller.scope)
            key = request.headers.get("Idempotency-Key")
            if key is not None:
                self._check_key(key, request)
            body = await read_body(request, self.limits.http_max_body_bytes,
                                   self.limits.http_body_timeout_s, hold)
            if key is None:
                return await self._answer(request, caller, body, handler, on_error, None)
            print_ = fingerprint(request.method, request.path_qs, body)

            async def first(earlier: Stored | None) -> Stored:
                response = await self._answer(request, caller, body, handler, on_error,
                                              earlier.results if earlier else None)
                return _stored(response)

            stored = await self.idempotency.run((caller.scope, key), print_, first)
            return _replay(stored)
        except GatewayError as exc:
            self._refused(exc, request)
            return on_error(exc)
        finally:
            hold.release()  # answered, refused, timed out or disconnected alike

    def _check_key(self, key: str, request: web.Request) -> None:
        limit = self.limits.idempotency_max_key_bytes
        size = len(key.encode("utf-8", "surrogatepass"))
        if size > limit:
            self.long_keys += 1
            if self.guard.debug:
                log.debug("http_request_refused", reason="idempotency_key_too_long",
                          bytes=size, limit=limit, peer=request.remote)
            raise IdempotencyKeyTooLong(
                f"Idempotency-Key is {size} bytes; the limit is {limit}", limit=limit)

    def _refused(self, exc: GatewayError, request: web.Request) -> None:
        """Count and log (debug) a refusal by one of the HTTP bounds."""
        if isinstance(exc, BodyBudgetExceeded):  # counted by the budget
            reason, detail = "inflight_body_bytes", float(self.bodies.limit)
        elif isinstance(exc, RequestTimeout):
            self.body_timeouts += 1
            reason, detail = "body_timeout", self.limits.http_body_timeout_s
        else:
            return
        if self.guard.debug:
            log.debug("http_request_refused", reason=reason, limit=detail,
                      in_flight=self.bodies.used, peer=request.remote)

    async def _answer(self, request: web.Request, caller: Caller, body: bytes,
                      handler: Handler, on_error: OnError, earlier: Earlier) -> web.Response:
        try:
            if self.pipeline.flow.paused:
                raise Unavailable("the gateway buffer is full; retry later")
            return await handler(request, caller, body, earlier)
        except GatewayError as exc:
            return on_error(exc)

    # --- endpoints ---------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        return await self._gate(request, self._publish)

    async def batch(self, request: web.Request) -> web.Response:
        return await self._gate(request, self._batch)

    async def rest_produce(self, request: web.Request) -> web.Response:
        return await self._gate(request, self._rest, rest_proxy.error_response)

    async def _publish(self, request: web.Request, caller: Caller,
                       body: bytes, earlier: Earlier) -> web.Response:
        topic = request.match_info["topic"]
        check_topic(topic)
        message = Message(
            source="http", topic=topic, payload=body, qos=1,
            client_id=caller.client_id, username=caller.identity.name,
            cert_identity=caller.identity.cert, claims=caller.identity.claims,
            content_type=text_header("Content-Type", request.headers.get("Content-Type", ""))
            or None,
            user_properties=_user_properties(request), received_at=time.time(),
        )
        future = publish(self.pipeline, message)
        if (request.query_string and not future.done()
                and request.query.get("async", "").lower() in ("1", "true", "yes")):
            # Routing already ran (it is synchronous), so a refusal is never a 202.
            future.add_done_callback(_log_async_failure)
            return json_response({"accepted": True}, 202)
        return _outcome_response(await future)

    async def _batch(self, request: web.Request, caller: Caller,
                     body: bytes, earlier: Earlier) -> web.Response:
        messages = parse_batch(body, media_type(request), caller,
                               self.limits.http_max_batch_records)
        status, answer, settled = await produce_batch(self.pipeline, messages, earlier)
        retry = status == 503 or any(r is None for r in settled)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
        response = json_response(answer, status, headers)
        response[RESULTS] = settled
        return response

    async def _rest(self, request: web.Request, caller: Caller,
                    body: bytes, earlier: Earlier) -> web.Response:
        response, settled = await rest_proxy.produce(
            self.pipeline, request, caller, body, self.limits.http_max_batch_records,
            earlier)
        response[RESULTS] = settled
        return response


def _outcome_response(outcome: Outcome) -> web.Response:
    if outcome.ok:
        return json_response(outcome_json(outcome), 200)
    error = outcome.error or Unavailable("the message has no outcome")
    return error_response(error)


def _log_async_failure(future: object) -> None:
    outcome = future.result()  # type: ignore[attr-defined]
    if isinstance(outcome, Outcome) and not outcome.ok and outcome.error is not None:
        # 202 was already sent: the log line is the only trace left to give.
        log.warning("http_async_publish_failed", error=outcome.error.code,
                    detail=outcome.error.message)


def _user_properties(request: web.Request) -> list[tuple[str, str]]:
    """``X-User-Property-Name: value`` headers play MQTT 5 user properties for rules."""
    n = len(USER_PROPERTY_PREFIX)
    return [(text_header(name, name)[n:].lower(), text_header(name, value))
            for name, value in request.headers.items()
            if name.lower().startswith(USER_PROPERTY_PREFIX)]


def _stored(response: web.Response) -> Stored:
    body = response.body
    raw = body if isinstance(body, bytes) else b""
    headers = {h: response.headers[h] for h in _REPLAYED_HEADERS if h in response.headers}
    results = response.get(RESULTS)
    return Stored(response.status, raw, headers, results)


def _replay(stored: Stored) -> web.Response:
    return web.Response(body=stored.body, status=stored.status, headers=stored.headers)


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """aiohttp's own 404/405/500 answer in the same JSON shape as ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response({"error": code, "message": f"{exc.reason}: {request.path}"},
                             exc.status, headers)
    except GatewayError as exc:
        return error_response(exc)
    except Exception:
        log.exception("http_handler_failed", path=request.path)
        return json_response({"error": "internal_error", "message": "internal error"}, 500)


def schemes(auth: Auth) -> tuple[str, ...]:
    """The Authorization schemes this configuration accepts."""
    return (("basic",) if auth.password_file else ()) + (("bearer",) if auth.jwt else ())


async def start_http(pipeline: Pipeline, config: Config, reuse_port: bool,
                     mqtt: MqttLookup, *, auth: Authenticator | None = None
                     ) -> tuple[HttpIngest, Cleanup] | None:
    """The HTTP and HTTPS listeners (ingest, REST Proxy, MQTT over WebSocket: WS and WSS),
    one app behind both, or None when both are off."""
    listener, secure = config.listeners.http, config.listeners.https
    if not (listener.enabled or secure.enabled):
        return None
    ws = config.listeners.ws
    ingest = HttpIngest(pipeline, config.limits, allow_anonymous=config.auth.allow_anonymous,
                        websocket=(ws.path, mqtt) if ws.enabled else None,
                        auth=auth, schemes=schemes(config.auth))
    # Handlers finish in-flight requests on shutdown, bounded by the app's deadline.
    runner = web.AppRunner(ingest.web_app(), access_log=None,
                           shutdown_timeout=config.shutdown_timeout_s / 2)
    await runner.setup()
    assert runner.server is not None
    # Our own listening sockets with aiohttp's protocol under the guard's bounds
    # (http_guard: connection limit, head and keep-alive timeouts).
    factory = ingest.guard.factory(runner.server)
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    if listener.enabled:
        servers.append(await loop.create_server(
            factory, listener.host, listener.port, reuse_port=reuse_port or None,
            backlog=1024))
        log.info("http_listening", host=listener.host, port=listener.port)
    tls = await _start_https(factory, config, reuse_port, servers)
    ingest.guard.start()

    async def cleanup(_timeout: float) -> None:
        for server in servers:  # no new connections; aiohttp then drains the open ones
            server.close()
        if tls is not None:
            await tls.close()
        await ingest.guard.stop()
        await runner.cleanup()

    return ingest, cleanup


async def _start_https(factory: Callable[[], asyncio.Protocol], config: Config,
                       reuse_port: bool, servers: list[asyncio.Server]) -> ServerTls | None:
    """The same routes over TLS; the client certificate is the transport's ``peercert``."""
    listener = config.listeners.https
    if not listener.enabled:
        return None
    from gateway.tls import ServerTls

    tls = ServerTls(listener, "https")  # follows certificate file changes
    servers.append(await asyncio.get_running_loop().create_server(
        factory, listener.host, listener.port, ssl=tls.context,
        reuse_port=reuse_port or None, backlog=1024,
        # A handshake is part of the first head: the same deadline (asyncio's is 60 s).
        ssl_handshake_timeout=config.limits.http_header_timeout_s))
    tls.start()
    log.info("https_listening", host=listener.host, port=listener.port,
             client_cert="required" if listener.require_client_cert
             else "optional" if listener.cafile else "none")
    return tls
