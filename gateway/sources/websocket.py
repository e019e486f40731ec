"""MQTT over WebSocket: ``GET /mqtt`` upgrades, and the bytes feed the TCP listener's session.

No MQTT parsing happens here.  ``WebSocketTransport`` plays an asyncio
transport for ``mqtt_server.MqttConnection``, so a WebSocket client gets the
very same session, limits, acks, takeover registry and flow control as a TCP
client.  What the adapter does:

- binary frames in -> ``data_received`` (MQTT allows a packet to span frames
  and a frame to hold several packets, so frames are just a byte stream);
- ``write`` -> a buffer flushed by one writer task as binary frames (the
  WebSocket send is a coroutine, and the session's writes must keep order);
  the buffer counts as unread output until its send returns (aiohttp's send
  waits while the socket's own buffer is full), and above the high-water mark
  (``limits.max_write_buffer_bytes``) the connection's ``pause_writing`` is
  called, ``resume_writing`` at the low-water mark: the same write side as
  MQTT/TCP (stop reading, the sweep's slow-reader close);
- ``abort`` of a connection whose output is not being read aborts the socket
  under the WebSocket: a close frame would queue behind what the client never
  reads;
- ``pause_reading`` -> the read loop stops calling ``receive()``, so aiohttp's
  own buffer limit stops reading the socket: TCP backpressure as for MQTT/TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import WSMsgType, web

from gateway.sources.mqtt_server import MqttConnection, MqttServer

if TYPE_CHECKING:
    from gateway.config.schema import Limits

log = structlog.get_logger("lastmile.ws")

SUBPROTOCOL = "mqtt"
# WebSocket close codes (RFC 6455): normal, protocol error.
CLOSE_NORMAL, CLOSE_PROTOCOL = 1000, 1002


class WebSocketTransport:
    """The slice of ``asyncio.Transport`` that ``MqttConnection`` uses, over a WebSocket."""

    __slots__ = ("_aborted", "_closing", "_high", "_low", "_out", "_paused", "_protocol",
                 "_readable", "_request", "_size", "_wake", "ws")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self._request = request
        self._protocol: MqttConnection | None = None  # told pause_writing / resume_writing
        self._out: list[bytes] = []
        self._size = 0  # bytes written and not yet sent (in _out or in the send under way)
        self._high, self._low = 65_536, 16_384  # write buffer limits (set_write_buffer_limits)
        self._paused = False
        self._wake = asyncio.Event()
        self._readable = asyncio.Event()
        self._readable.set()
        self._closing = False
        self._aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # The TCP socket under the WebSocket: peer address, TLS certificate, TCP_NODELAY.
        transport = self._request.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def set_protocol(self, protocol: MqttConnection) -> None:
        self._protocol = protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_size(self) -> int:
        """Unread output: ours, and what aiohttp already handed to the socket's transport
        (at most its own high-water mark plus one frame: its send waits above it)."""
        tcp = self._request.transport
        return self._size + (tcp.get_write_buffer_size() if tcp is not None else 0)

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._out.append(data)
            self._size += len(data)
            self._wake.set()
            if self._size > self._high and not self._paused:
                self._paused = True
                if self._protocol is not None:
                    self._protocol.pause_writing()

    def close(self) -> None:
        """Close after what was written is sent (a CONNACK refusal must reach the client)."""
        self._closing = True
        self._wake.set()
        self._readable.set()

    def abort(self) -> None:
        self._aborted = True
        self._size -= sum(map(len, self._out))
        self._out.clear()
        if self._paused:
            # The client does not read: neither would it read a close frame.
            tcp = self._request.transport
            if tcp is not None:
                tcp.abort()
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    async def wait_readable(self) -> None:
        await self._readable.wait()

    async def run_writer(self) -> None:
        """Send buffered bytes in order, one frame per burst; close the socket when told."""
        ws = self.ws
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._out:
                data = b"".join(self._out)
                self._out.clear()
                try:
                    await ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    self._closing = True  # the peer went away; the reader will see it
                self._size -= len(data)
                if self._paused and self._size <= self._low:
                    self._paused = False
                    if self._protocol is not None and not self._closing:
                        self._protocol.resume_writing()
            if self._closing and not self._out:
                code = CLOSE_PROTOCOL if self._aborted else CLOSE_NORMAL
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.close(code=code)
                return


class MqttOverWebSocket:
    """The ``GET listeners.ws.path`` handler."""

    def __init__(self, limits: Limits, lookup: Callable[[], MqttServer | None]) -> None:
        self.limits = limits
        self.lookup = lookup

    def _server(self) -> MqttServer:
        # Looked up per connection: the MQTT listener starts after the HTTP one.
        server = self.lookup()
        if server is None:
            raise web.HTTPServiceUnavailable(reason="MQTT service not running")
        return server

    async def handle(self, request: web.Request) -> web.StreamResponse:
        server = self._server()
        # A frame may carry several packets; the session enforces the packet size itself.
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False,
                                   max_msg_size=2 * self.limits.max_packet_size + 65_536)
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            # MQTT 5.0 section 6: the server must select "mqtt", or there is no MQTT here.
            await ws.close(code=CLOSE_PROTOCOL, message=b"subprotocol mqtt required")
            return ws
        transport = WebSocketTransport(ws, request)
        conn = MqttConnection(server, server.latency_for("ws"))
        transport.set_protocol(conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        writer = asyncio.create_task(transport.run_writer(), name="ws-writer")
        try:
            await self._read(ws, transport, conn)
        finally:
            conn.connection_lost(None)
            transport.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(writer, 5.0)
            if not writer.done():
                writer.cancel()
        return ws

    async def _read(self, ws: web.WebSocketResponse, transport: WebSocketTransport,
                    conn: MqttConnection) -> None:
        while not transport.is_closing():
            await transport.wait_readable()
            if transport.is_closing():
                return
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                conn.data_received(msg.data)
            elif msg.type == WSMsgType.TEXT:
                # MQTT over WebSocket is binary only; a text frame is a client bug.
                log.info("ws_text_frame_refused", peer=conn.peer)
                transport.abort()
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return
