"""The HTTP listener's connection bounds: how many, how long for a head, how long idle.

aiohttp's server has a keep-alive timeout (3,630 s by default) and nothing else:
its timer also covers a connection that never finishes its request head, so a
slow client (slowloris) holds a file descriptor, shared with MQTT, for an hour.
Here, per worker process:

- ``limits.http_max_connections``: a connection over it is closed at once,
  before anything is read (as MQTT's ``max_connections`` does);
- ``limits.http_header_timeout_s``: a request head (request line and headers)
  not complete in time is answered 408 (the usual JSON error body,
  ``Connection: close``) and closed.  The clock starts when the connection
  opens, and on a kept-alive connection with the first byte of the next head;
  it does not run while an earlier request is being answered.  One sweep a
  fraction of a second apart checks the connections whose head is under way,
  oldest first (a dict in insertion order), so it costs nothing per byte and
  nothing per connection that is not sending a head;
- ``limits.http_keepalive_timeout_s``: aiohttp's own timer, which closes an
  idle kept-alive connection (no answer: nothing was asked).

The body has its own deadline (``limits.http_body_timeout_s``, ``read_body``).
aiohttp offers no hook for a head timer, so ``GuardedHandler`` subclasses its
``RequestHandler`` and reads a few of its attributes (``_request_count``,
``_messages``, ``_upgraded``, ``_payload_parser``, ``_request_in_progress``);
``pyproject.toml`` pins aiohttp below 4 and the tests cover each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.sources.http_common import RequestTimeout

log = structlog.get_logger("lastmile.http")

_TIMEOUT_BODY = msgspec.json.encode(
    RequestTimeout("the request head did not arrive in time").to_json())
# Written straight to the transport: aiohttp has no request object before a head.
ANSWER_408 = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TIMEOUT_BODY)
              + _TIMEOUT_BODY)


class HttpGuard:
    """The bounds of one worker's HTTP listeners (HTTP and HTTPS share them)."""

    def __init__(self, max_connections: int, header_timeout_s: float,
                 keepalive_timeout_s: float) -> None:
        self.max_connections = max_connections  # 0: no limit
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[GuardedHandler] = set()
        # Connections whose request head is under way -> when it started, oldest first.
        self.heads: dict[GuardedHandler, float] = {}
        self.refused_connections = 0  # over max_connections
        self.head_timeouts = 0  # answered 408
        self.idle_closed = 0  # kept-alive connections closed by the keep-alive timeout
        self._sweeper: asyncio.Task[None] | None = None
        self._debug: bool | None = None

    @property
    def debug(self) -> bool:
        """Whether debug lines are logged at all: build them only then."""
        flag = self._debug
        if flag is None:
            check = getattr(log, "is_enabled_for", None)
            flag = self._debug = bool(check(logging.DEBUG)) if callable(check) else True
        return flag

    def factory(self, server: web.Server) -> Callable[[], GuardedHandler]:
        """The protocol factory for ``loop.create_server`` (one handler per connection)."""
        loop = asyncio.get_running_loop()

        def make() -> GuardedHandler:
            return GuardedHandler(self, server, loop=loop, access_log=None,
                                  keepalive_timeout=self.keepalive_timeout_s)

        return make

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="http-head-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    @property
    def interval(self) -> float:
        """How often the sweep looks: a tenth of the timeout, between 50 ms and 1 s."""
        return min(1.0, max(0.05, self.header_timeout_s / 10))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.expire(loop.time())
            except Exception:  # the sweep must keep running
                log.exception("http_head_sweep_failed")

    def expire(self, now: float) -> None:
        """Answer 408 to every connection whose head has taken longer than the timeout."""
        deadline = now - self.header_timeout_s
        late: list[GuardedHandler] = []
        for handler, since in self.heads.items():
            if since > deadline:
                break  # the rest started later
            late.append(handler)
        for handler in late:
            del self.heads[handler]
            if handler.busy:
                # A pipelined head behind a request still being answered: its clock
                # starts again (an answer is being written; no 408 can go in between).
                self.heads[handler] = now
                continue
            self.head_timeouts += 1
            log.debug("http_head_timeout", peer=handler.peer, limit_s=self.header_timeout_s,
                      timeouts=self.head_timeouts)
            handler.answer_and_close(ANSWER_408)


class GuardedHandler(RequestHandler):
    """aiohttp's protocol, plus the connection limit and the request-head clock."""

    __slots__ = ("body", "guard", "refused")

    def __init__(self, guard: HttpGuard, server: web.Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.guard = guard
        self.refused = False
        self.body: StreamReader | None = None  # the last request's body, until it ends

    @property
    def peer(self) -> str:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else ""

    @property
    def busy(self) -> bool:
        """An earlier request is still being answered (or waits its turn)."""
        return bool(self._request_in_progress or self._messages)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if guard.max_connections and len(guard.connections) >= guard.max_connections:
            # Over the limit: closed before anything is read, so the file descriptor
            # comes back at once; the client sees the connection closed and retries.
            self.refused = True
            guard.refused_connections += 1
            if guard.debug:
                peer = transport.get_extra_info("peername")
                log.debug("http_connection_refused", reason="max_connections",
                          limit=guard.max_connections, refused=guard.refused_connections,
                          peer=str(peer[0]) if isinstance(peer, tuple) else "")
            transport.close()
            return
        guard.connections.add(self)
        guard.heads[self] = asyncio.get_running_loop().time()  # the first head's clock
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return  # never set up: nothing of aiohttp's to tear down
        self.guard.connections.discard(self)
        self.guard.heads.pop(self, None)
        super().connection_lost(exc)

    def _reading_head(self) -> bool:
        """True when the bytes arriving now belong to a request head, not a body."""
        if self._upgraded or self._payload_parser is not None:
            return False  # a WebSocket: MQTT's own timeouts apply
        if self.body is not None:
            if not self.body.is_eof():
                return False  # the body has its own deadline (limits.http_body_timeout_s)
            self.body = None
        return True

    def data_received(self, data: bytes) -> None:
        heads = self.guard.heads
        if data and self not in heads and self._reading_head():
            heads[self] = asyncio.get_running_loop().time()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            heads.pop(self, None)  # a head is complete (a later one starts with new bytes)
            if self._messages:
                body = self._messages[-1][1]
                self.body = None if body.is_eof() else body

    def _process_keepalive(self) -> None:
        was_open = self.transport is not None
        super()._process_keepalive()
        if was_open and self.transport is None:
            self.guard.idle_closed += 1
            if self.guard.debug:
                log.debug("http_keepalive_timeout", limit_s=self.guard.keepalive_timeout_s,
                          closed=self.guard.idle_closed)

    def answer_and_close(self, answer: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
        self.force_close()  # closes after the answer is flushed
