"""The MQTT listener: one asyncio Protocol per connection around an ``MqttSession``.

    server = MqttServer(pipeline, limits, log)
    await server.start("0.0.0.0", 1883)               # plain TCP
    await server.start("0.0.0.0", 8883, ssl=context)  # TLS (call start once per listener)
    ...
    await server.stop_accepting()
    await server.close(deadline=10.0)                 # wait for acks, then DISCONNECT 0x8B

The protocol work happens in the sans-IO session; this module only moves bytes,
hands each PUBLISH to ``pipeline.publish`` as one ``Message`` and writes the
PUBACK / PUBREC the session releases when ``on_done`` says the message is safe.
Reading stops while the pipeline says so (``pipeline.flow``) and while a
connection has ``limits.receive_maximum`` messages unanswered.  One sweep task
checks every session's deadline (CONNECT timeout, 1.5 x keep alive) and
expires stored client state; there are no per-connection timers.  With
``workers > 1`` the store is ``mqtt_registry.SharedSessions``: a CONNECT for a
client id another worker owns is held (no CONNACK, no reading) until that
worker has given it up (``MqttConnection.held``).

The write side (docs/mqtt.md, "Clients that do not read").  The transport's
high-water mark is ``limits.max_write_buffer_bytes``; while it asks to pause
writing the connection is not read either (``update_reading``: one decision
for every reason to stop), so a client that never reads cannot ask for more
answers.  ``server.write_paused`` holds only those connections and when they
paused; the sweep closes one paused longer than ``limits.slow_reader_timeout``
(aborted: what it never read is dropped).  Connect limits are checked in
``connection_made``: ``limits.max_connections`` and
``limits.max_connections_per_source`` close unread, the connect-rate bucket
(``limits.connect_rate``) lets the session refuse the CONNECT (5.0: 0x9F).

Acks arrive in batches (one per Kafka poll, or one per spool fsync): ``on_done``
only queues the ack bytes in the session and marks the connection; one
``call_soon`` per batch then writes each marked connection's acks in one
``transport.write``.  An idle connection holds no buffers (the session creates
them on use) and no copy of anything shared: ``peer`` is read from the
transport when a log line needs it.

Authentication (``auth``, a ``gateway.auth.Authenticator``).  The session
holds a valid CONNECT (``AuthRequested``); the connection asks ``auth.quick``
on the spot (anonymous, certificate, cached credentials: no task, no delay).
Otherwise one task for that CONNECT waits out ``auth.delay_for(peer host)`` (a
guessing address slows down, nobody else does), awaits ``auth.verify``
(hashing off the loop) and hands the verdict to the session, unless the
connection went away meanwhile.  While it waits the session keeps what arrives
unparsed; the socket is still read up to ``AUTH_HOLD_BYTES`` of that, so a
client that hangs up is seen at once (a paused socket would not report the
close) and its task is cancelled; past the bound reading stops, and the
CONNECT timeout ends a client that never gets a verdict.  The accepted
``Identity`` is the only source of ``username``, ``cert_identity`` and
``claims`` on every ``Message``.  Refusals are logged at most once per source
address per ``refusal_log_interval`` (the Authenticator's counters see all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog

from gateway.auth import AuthRefusal, Credentials, Identity
from gateway.model import Message, Outcome
from gateway.observability.latency import Latency
from gateway.protocols.mqtt.events import (
    AuthRequested,
    Connected,
    Disconnected,
    Event,
    MqttLimits,
    PublishReceived,
    PublishToken,
)
from gateway.protocols.mqtt.session import AWAIT_AUTH, AWAIT_CONNECT, CLOSED, MqttSession
from gateway.protocols.mqtt.store import SessionStore

if TYPE_CHECKING:
    from gateway.auth import Authenticator
    from gateway.downlink.service import Downlink
    from gateway.downlink.wills import Lifecycle
    from gateway.sources.mqtt_registry import SharedSessions

__all__ = ["MqttLimits", "MqttServer"]


_monotonic = time.monotonic


class FlowLike(Protocol):
    paused: bool

    def subscribe(self, listener: Callable[[bool], None]) -> Any: ...


class PipelineLike(Protocol):
    @property
    def flow(self) -> FlowLike: ...

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None: ...


class MqttServer:
    """Listeners, live connections, the client-id registry and the session store."""

    def __init__(
        self,
        pipeline: PipelineLike,
        limits: MqttLimits | None = None,
        log: Any = None,
        *,
        sweep_interval: float = 1.0,
        shared: SharedSessions | None = None,
        auth: Authenticator | None = None,
        refusal_log_interval: float = 10.0,
        connects_per_turn: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        # CONNECTs handled per turn of the event loop; later ones wait for the next turn
        # (docs/performance.md, "Reconnect storms"): acks and timers run in between.
        self.connects_per_turn = (CONNECTS_PER_TURN if connects_per_turn is None
                                  else connects_per_turn)
        self._turn_connects = 0  # CONNECTs handled in this turn
        self._turn_scheduled = False
        # Connections whose first bytes wait for a turn (reading paused); the newest is
        # taken first (admit_connect).
        self.connects_waiting: deque[MqttConnection] = deque()
        # None: every CONNECT is accepted as it comes (unit tests, embedded use).
        self.auth = auth
        self.refusal_log_interval = refusal_log_interval
        # CONNECTs waiting for auth.verify (one task each, only while they wait).
        self.auth_tasks: dict[MqttConnection, asyncio.Task[None]] = {}
        # With workers > 1: this turn's CONNECTs let in by auth.quick, answered together
        # once the turn's reads are done (one registry transaction for their claims).
        self._admitted: list[tuple[MqttConnection, Identity, Credentials]] = []
        self._admit_scheduled = False
        self._admit_retries = 0  # turns the registry's lock was busy for the waiting batch
        self._claims_at = float("-inf")  # the loop's time of the last claim transaction
        # Peer host -> (when its last refusal was logged, refusals not logged since).
        self._refusals_logged: dict[str, tuple[float, int]] = {}
        self.limits = limits or MqttLimits()
        self.log = log if log is not None else structlog.get_logger("lastmile.mqtt")
        # With workers > 1 the store is shared by all workers (mqtt_registry).
        self.shared = shared
        self.store: SessionStore = (
            shared if shared is not None else SessionStore(self.limits.max_sessions))
        self.store.on_evict = self._session_evicted
        self.registry: dict[str, MqttConnection] = {}  # client id -> live connection
        # Live connections the registry does not name: before their CONNECT is accepted,
        # or taken over and closing.  With the registry's, that is every live one
        # (``connections``): one hash-table entry per connected client, not two.
        self._unnamed: set[MqttConnection] = set()
        self.connections = LiveConnections(self)
        self.refused_connections = 0  # over limits.max_connections
        # Connections refused by a connect limit, by its name: "connect_rate" (CONNACK 0x9F
        # or a close), "per_source" (closed unread).
        self.connect_refusals: dict[str, int] = {}
        # Open connections per source address (only with limits.max_connections_per_source).
        self.per_source: dict[str, int] = {}
        # The connect-rate token bucket (limits.connect_rate): tokens, when last filled.
        self._tokens = float(self.limits.connect_burst or max(1, int(self.limits.connect_rate)))
        self._tokens_at = float("-inf")
        # Connections whose transport asked to pause writing (output unread above
        # limits.max_write_buffer_bytes), and since when: the sweep closes slow readers.
        self.write_paused: dict[MqttConnection, float] = {}
        # Transports the gateway has half-closed after its last packet, and the timer
        # that aborts each if the client never closes (close_lingering).
        self.lingering: dict[Any, asyncio.TimerHandle] = {}
        # Connections ended by a per-connection bound, by its name (Disconnected.limit).
        self.limit_closes: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        # Receive -> ack queued for writing, per listener (mqtt, mqtts, ws): plain counts
        # the metrics pump copies (lastmile_ack_latency_seconds).
        self.ack_latency: dict[str, Latency] = {}
        # Connections with acks queued since the last flush (one call_soon per batch).
        self._dirty: set[MqttConnection] = set()
        self._flush_scheduled = False
        self._debug: bool | None = None  # debug logs enabled (decided on first use)
        self.downlink: Downlink | None = None  # Kafka -> subscribers (gateway.downlink.service)
        self.lifecycle: Lifecycle | None = None  # wills and presence (gateway.downlink.wills)

    @property
    def debug(self) -> bool:
        """Whether per-connection debug lines are logged at all: build them only then."""
        flag = self._debug
        if flag is None:
            check = getattr(self.log, "is_enabled_for", None)
            flag = self._debug = bool(check(logging.DEBUG)) if callable(check) else True
        return flag

    @property
    def ports(self) -> list[int]:
        """Bound ports, in ``start`` order (useful with port 0)."""
        return [s.sockets[0].getsockname()[1] for s in self._servers if s.sockets]

    async def start(
        self, host: str, port: int, ssl: ssl_module.SSLContext | None = None,
        *, reuse_port: bool = False, backlog: int = 1024,
    ) -> None:
        loop = asyncio.get_running_loop()
        latency = self.latency_for("mqtts" if ssl is not None else "mqtt")
        server = await loop.create_server(
            lambda: MqttConnection(self, latency), host, port, ssl=ssl,
            reuse_port=reuse_port or None, backlog=backlog,
        )
        # Accepted sockets inherit the listener's send buffer (Linux): bound what the
        # kernel holds for a client that does not read, so the write-side pause
        # (max_write_buffer_bytes) engages after ~3x that much output instead of after
        # the ~4 MB autotuning allows (answers to ~2 million PINGREQs, all of it CPU
        # taken from the other clients).  Acks are small: this costs a reader nothing.
        sndbuf = self.limits.max_write_buffer_bytes
        if sndbuf:
            for sock in server.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self._servers.append(server)
        self.start_background()
        self.log.info("mqtt_listening", host=host, port=server.sockets[0].getsockname()[1],
                      tls=ssl is not None)

    def start_background(self) -> None:
        """Start the keepalive sweep and follow the pipeline's flow (once; idempotent).

        ``start`` calls it; MQTT over WebSocket alone (no TCP listener) needs it too.
        """
        if self._sweeper is None:
            if self.shared is not None:
                self.shared.attach(self)
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="mqtt-sweep")
            self._unsubscribe = self.pipeline.flow.subscribe(self._on_flow)

    async def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def close(self, deadline: float) -> None:
        """Wait up to ``deadline`` seconds for unanswered messages, then end every connection.

        MQTT 5 clients get DISCONNECT 0x8B (server shutting down); a message still
        unanswered at the end gets no ack, so its client sends it again elsewhere.
        """
        await self.stop_accepting()
        for task in list(self.auth_tasks.values()):
            task.cancel()  # a CONNECT still waiting for its verdict gets none
        self.auth_tasks.clear()
        self._admitted.clear()  # and so does one waiting for its turn's registry claims
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        # Polling once per 50 ms at shutdown beats a counter on every message's hot path.
        while loop.time() < end and any(c.session.pending for c in self.connections):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.handle_events(conn.session.server_disconnect(0x8B, "server shutting down"))
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.shared is not None:
            self.shared.close()

    # --- called by connections and the pipeline -----------------------------------

    def on_done(self, token: PublishToken, outcome: Outcome) -> None:
        """The pipeline's verdict on one message; runs exactly once per PUBLISH."""
        session = token.session
        if outcome.ok:
            self.deliver(token, 0, None)
        else:
            error = outcome.error
            if error is None:
                self.deliver(token, 0x80, None)
            else:
                self.deliver(token, error.mqtt_reason, error.message, retriable=error.retriable)
                if (session.version == 4 and token.qos and not error.retriable
                        and error.code != "not_authorized"):
                    # 3.1.1 cannot refuse a message: it gets its ack [MQTT-3.3.5-2], so the
                    # refusal must be visible here (docs/mqtt.md).  Authorization refusals
                    # are logged by the pipeline already, rate-limited (publish_not_authorized).
                    self.log.info("mqtt_publish_refused", client_id=session.client_id,
                                  packet_id=token.packet_id, error=error.code,
                                  reason=error.message)
        if token.qos == 2 and self.shared is not None:
            self.shared.verdict(token, token.reason_code)  # another worker may wait for it

    def latency_for(self, listener: str) -> Latency:
        """The ack-latency counts of one listener kind (made on first use)."""
        latency = self.ack_latency.get(listener)
        if latency is None:
            latency = self.ack_latency[listener] = Latency()
        return latency

    def deliver(self, token: PublishToken, code: int, reason: str | None, *,
                retriable: bool = True) -> None:
        """Ack ``token`` and write the ack on the connection that now waits for it.

        A verdict handed over from another worker carries no retriable flag: it
        counts as retriable, so a 3.1.1 client retries rather than being acked.
        """
        events = token.session.ack(token, code, reason, retriable=retriable)
        # The token follows a client that reconnected: write on its current connection.
        conn = token.session.context
        if isinstance(conn, MqttConnection):
            if token.qos and token.received:  # written in this turn's flush (QoS 0: no ack)
                conn.latency.observe(_monotonic() - token.received)
            if events:
                # The verdict ended the session (3.1.1): log it, write what is left, close.
                conn.handle_events(events)
                return
            if not token.qos and conn._reading:
                return  # QoS 0: nothing to write, and reading needs no resume
            self._dirty.add(conn)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        """Write every ack queued by this batch of verdicts: one write per connection."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            conn.after_ack()

    def _session_evicted(self, client_id: str, qos2_ids: int) -> None:
        """Over limits.max_sessions: the client reconnects with session present = 0."""
        if self.debug:
            self.log.debug("mqtt_session_evicted", client_id=client_id, qos2_ids=qos2_ids,
                           retained=self.store.retained, evicted=self.store.evicted)

    def unregister(self, client_id: str) -> MqttConnection | None:
        """Take ``client_id``'s connection out of the registry (another worker took the
        client over); it stays live (``connections``) until it closes."""
        conn = self.registry.pop(client_id, None)
        if conn is not None:
            self._unnamed.add(conn)
        return conn

    def _on_flow(self, paused: bool) -> None:
        for conn in self.connections:
            conn.update_reading()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        """Expire sessions past their deadline and stored state past its expiry (the
        store's work is proportional to what expires: a heap, not a scan)."""
        for conn in [c for c in self.connections if c.session.deadline <= now]:
            conn.handle_events(conn.session.expire(now))
        if self.write_paused:
            timeout = self.limits.slow_reader_timeout
            for conn, since in list(self.write_paused.items()):
                if now - since >= timeout:
                    conn.close_slow_reader()
        self.store.expire(now)
        if self._refusals_logged:
            self._forget_refusals(now)

    def admit_connect(self, conn: MqttConnection) -> bool:
        """Whether ``conn``'s first bytes (its CONNECT) are handled now or wait their turn.

        At most ``connects_per_turn`` a turn of the loop: a storm of reconnects is
        taken in slices, and what is ready meanwhile (acks from Kafka, timers, the
        reads of connected clients) runs between two slices.  The newest waiting
        CONNECT goes first: under more CONNECTs than the worker can answer, the
        oldest are the ones whose clients are giving up, and answering them first
        would spend every turn on clients that are gone (a queue collapse: seen with
        40,000 at once).  The oldest wait until the storm thins or their CONNECT
        timeout (``limits.connect_timeout``) closes them, and their clients retry.
        """
        if self.connects_per_turn <= 0:
            return True
        if self.connects_waiting or self._turn_connects >= self.connects_per_turn:
            self.connects_waiting.append(conn)
            self._schedule_turn()
            return False
        self._turn_connects += 1
        self._schedule_turn()
        return True

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new turn: hand the next slice of waiting CONNECTs to their connections."""
        self._turn_scheduled = False
        self._turn_connects = 0
        waiting = self.connects_waiting
        while waiting and self._turn_connects < self.connects_per_turn:
            conn = waiting.pop()
            if conn.resume_connect():
                self._turn_connects += 1
        if self._turn_connects:
            self._schedule_turn()  # the next turn starts with a fresh count

    def admit_later(self, conn: MqttConnection, identity: Identity, creds: Credentials) -> None:
        """A CONNECT let in by ``auth.quick`` with the shared registry: its verdict is
        handed over with the rest of this turn's (``_admit_turn``)."""
        self._admitted.append((conn, identity, creds))
        if not self._admit_scheduled:
            self._admit_scheduled = True
            # At most one claim transaction per ADMIT_COALESCE_S: a lone CONNECT goes at
            # once, a storm's wait for the next one and share it (fewer, larger batches).
            loop = asyncio.get_running_loop()
            wait = self._claims_at + ADMIT_COALESCE_S - loop.time()
            if wait > 0:
                loop.call_later(wait, self._admit_turn)
            else:
                loop.call_soon(self._admit_turn)

    def _admit_turn(self) -> None:
        """Claim the client ids of this turn's admitted CONNECTs in one registry
        transaction, then complete each (CONNACK) in the same callback, so nothing (no
        other worker's message, no release) comes between a claim and its use.

        While another worker holds the registry's lock the batch waits, the loop does
        not: it is tried again ``ADMIT_RETRY_S`` later with the CONNECTs admitted
        meanwhile (so contention makes batches larger, not the loop slower), and after
        ``ADMIT_MAX_RETRIES`` tries it waits for the lock as a lone CONNECT would.
        """
        self._admit_scheduled = False
        batch, self._admitted = self._admitted, []
        live = [item for item in batch if item[0].awaits_verdict()]
        shared = self.shared
        if not live:
            self._admit_retries = 0
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if shared is not None:
            self._claims_at = now
            wait = self._admit_retries >= ADMIT_MAX_RETRIES
            try:
                if not shared.claim_many([(conn.session.client_id, conn.session.clean_start)
                                          for conn, _, _ in live], now, wait=wait):
                    self._admitted[:0] = live
                    self._admit_retries += 1
                    self._admit_scheduled = True
                    loop.call_later(ADMIT_RETRY_S, self._admit_turn)
                    return
            except sqlite3.Error:  # each open() claims on its own (and fails on its own)
                self.log.exception("mqtt_registry_claims_failed", clients=len(live))
            self._admit_retries = 0
        try:
            for conn, identity, creds in live:
                try:
                    conn._verdict(identity, creds)
                except Exception:
                    conn._crash("authenticate")
        finally:
            if shared is not None:
                shared.drop_claims()

    def take_connect_token(self, now: float) -> bool:
        """One new connection from the connect-rate bucket (limits.connect_rate), if any."""
        limits = self.limits
        burst = limits.connect_burst or max(1, int(limits.connect_rate))
        tokens = min(float(burst), self._tokens + (now - self._tokens_at) * limits.connect_rate)
        self._tokens_at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    def close_lingering(self, transport: Any) -> None:
        """Close after the gateway's last packet (a DISCONNECT, a refusing CONNACK).

        A client may still be writing (an ack, a PUBLISH) when it arrives; a
        socket closed under those writes answers them with a reset, and the
        client gets a write error before it has read the reason code.  So a TCP
        connection is half-closed (FIN after what is buffered) and read, unread,
        until the client closes, at most ``LINGER_S``.  TLS and WebSocket close
        as before (their own closing handshakes).
        """
        if transport in self.lingering:
            return
        can_eof = getattr(transport, "can_write_eof", None)
        if transport.is_closing() or can_eof is None or not can_eof():
            transport.close()
            return
        try:
            transport.write_eof()
            transport.resume_reading()  # the session discards what comes (CLOSED)
        except (OSError, RuntimeError):
            transport.close()
            return
        self.lingering[transport] = asyncio.get_running_loop().call_later(
            LINGER_S, self._linger_over, transport)

    def _linger_over(self, transport: Any) -> None:
        self.lingering.pop(transport, None)
        transport.abort()

    def refuse_connect(self, limit: str) -> None:
        self.connect_refusals[limit] = self.connect_refusals.get(limit, 0) + 1

    # --- authentication refusals: counted by the Authenticator, logged here, bounded ---

    def log_refusal(self, conn: MqttConnection, refusal: AuthRefusal, creds: Credentials,
                    now: float) -> None:
        """One ``mqtt_auth_refused`` line per source address per interval, never a password."""
        host = creds.peer_host
        seen = self._refusals_logged.get(host)
        if seen is not None and now - seen[0] < self.refusal_log_interval:
            self._refusals_logged[host] = (seen[0], seen[1] + 1)
            return
        if seen is None and len(self._refusals_logged) >= _MAX_REFUSAL_HOSTS:
            return  # a flood from many addresses: the counters still see every refusal
        self._refusals_logged[host] = (now, 0)
        username = creds.username
        self.log.info("mqtt_auth_refused", reason=refusal.reason, detail=refusal.message,
                      client_id=conn.session.client_id[:_LOGGED_CHARS],
                      username=username[:_LOGGED_CHARS] if username is not None else None,
                      peer=conn.peer)

    def _forget_refusals(self, now: float) -> None:
        interval = self.refusal_log_interval
        for host, (when, unlogged) in list(self._refusals_logged.items()):
            if now - when >= interval:
                del self._refusals_logged[host]
                if unlogged:
                    self.log.info("mqtt_auth_refused_unlogged", peer_host=host, count=unlogged,
                                  seconds=interval)


class LiveConnections:
    """Every live connection of a server: those its client-id registry names and the
    others (``MqttServer._unnamed``).  Iterating takes a snapshot."""

    __slots__ = ("_server",)

    def __init__(self, server: MqttServer) -> None:
        self._server = server

    def add(self, conn: MqttConnection) -> None:
        self._server._unnamed.add(conn)

    def discard(self, conn: MqttConnection) -> None:
        server = self._server
        server._unnamed.discard(conn)
        client_id = conn.session.client_id
        if server.registry.get(client_id) is conn:
            del server.registry[client_id]

    def __contains__(self, conn: object) -> bool:
        server = self._server
        if conn in server._unnamed:
            return True
        return (isinstance(conn, MqttConnection)
                and server.registry.get(conn.session.client_id) is conn)

    def __iter__(self) -> Iterator[MqttConnection]:
        server = self._server
        return iter([*server._unnamed, *server.registry.values()])

    def __len__(self) -> int:
        return len(self._server._unnamed) + len(self._server.registry)


class MqttConnection(asyncio.Protocol):
    # Kept small: one per device. Shared things (limits, pipeline) live on the server.
    __slots__ = ("_reading", "_waiting", "held", "latency", "server", "session", "source",
                 "transport")

    def __init__(self, server: MqttServer, latency: Latency | None = None) -> None:
        self.server = server
        # Its listener's ack-latency counts (shared: one reference per connection).
        self.latency = latency if latency is not None else server.latency_for("mqtt")
        loop = asyncio.get_running_loop()
        self.session = MqttSession(server.limits, server.store, loop.time(),
                                   authenticate=server.auth is not None)
        self.session.context = self
        self.transport: asyncio.Transport | None = None
        self._reading = True
        # First bytes received while waiting for a turn (server.admit_connect), else None.
        self._waiting: bytearray | None = None
        # CONNACK and what follows wait while another worker gives the client id up.
        self.held = False
        # The source address counted in server.per_source (only when that limit is on).
        self.source: str | None = None

    @property
    def peer(self) -> str:
        """``host:port`` of the client, for logs (the transport keeps the address)."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")

    @property
    def peer_host(self) -> str:
        """The client's address without the port (the failed-attempt throttle's key)."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")

    @property
    def cert_identity(self) -> str | None:
        """Subject CN of the client's verified certificate (mTLS), read from the transport
        when asked (at CONNECT; per message only without an Authenticator), not kept."""
        transport = self.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        return _cert_identity(cert) if cert else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # TCP_NODELAY (acks are tiny and latency-bound) is already set by uvloop's and
        # asyncio's TCP transports; asking for the socket object here would cost a
        # cached socket object per connection.
        server = self.server
        limits = server.limits
        limit = limits.max_connections
        if limit and len(server.connections) >= limit:
            # Over the limit: close before reading, so the device backs off and retries
            # (no CONNACK can be sent before its CONNECT has been read).
            server.refused_connections += 1
            server.log.warning("mqtt_connection_refused", reason="max_connections",
                               limit=limit, refused=server.refused_connections)
            transport.abort()
            return
        per_source = limits.max_connections_per_source
        if per_source:
            host = self.peer_host
            count = server.per_source.get(host, 0)
            if count >= per_source:
                # Closed unread like max_connections (docs/mqtt.md, "Connect storms").
                server.refuse_connect("per_source")
                if server.debug:
                    server.log.debug("mqtt_connection_refused", reason="per_source",
                                     limit=per_source, peer=self.peer)
                transport.abort()
                return
            server.per_source[host] = count + 1
            self.source = host
        if limits.connect_rate and not server.take_connect_token(
                asyncio.get_running_loop().time()):
            # Over the rate: the CONNECT is read and refused before anything else is done
            # for it (no authentication): MQTT 5 CONNACK 0x9F, 3.1.1 a close.
            server.refuse_connect("connect_rate")
            if server.debug:
                server.log.debug("mqtt_connect_rate_exceeded", rate=limits.connect_rate,
                                 peer=self.peer)
            self.session.refuse_connect(0x9F)
        # Above the high-water mark the transport asks to pause writing: reading stops
        # (update_reading) and the sweep's slow-reader clock runs (pause_writing).
        high = limits.max_write_buffer_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)
        server.connections.add(self)
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting
        if waiting is not None:  # a chunk that was on its way when reading paused
            waiting += data
            return
        if self.session.state is AWAIT_CONNECT and not self.server.admit_connect(self):
            self._waiting = bytearray(data)
            self.update_reading()
            return
        self._receive(data)

    def resume_connect(self) -> bool:
        """Our turn (server._next_turn): handle the bytes kept; False if gone meanwhile."""
        data, self._waiting = self._waiting, None
        transport = self.transport
        if data is None or transport is None or transport.is_closing():
            return False
        self._receive(bytes(data))
        self.update_reading()
        return True

    def _receive(self, data: bytes) -> None:
        try:
            now = asyncio.get_running_loop().time()
            self.handle_events(self.session.receive_data(data, now))
        except Exception:
            self._crash("data_received")

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server.connections.discard(self)  # and its registry entry
        if server.lingering:
            timer = server.lingering.pop(self.transport, None)
            if timer is not None:
                timer.cancel()
        self._waiting = None  # server.connects_waiting skips it
        if server.write_paused:
            server.write_paused.pop(self, None)
        source = self.source
        if source is not None:
            self.source = None
            left = server.per_source.get(source, 1) - 1
            if left > 0:
                server.per_source[source] = left
            else:
                server.per_source.pop(source, None)
        task = server.auth_tasks.pop(self, None)
        if task is not None:
            task.cancel()  # its verdict has nobody to go to
        try:
            self.handle_events(self.session.connection_lost(asyncio.get_running_loop().time()))
            if server.downlink is not None:
                server.downlink.detach(self, self.session.expiry_interval)
        except Exception:
            self._crash("connection_lost")

    def handle_events(self, events: list[Event]) -> None:
        """Act on the session's events, write what it queued, close when it is done."""
        if events:
            publish = self.server.pipeline.publish
            on_done = self.server.on_done
            received_at = time.time()
            received = _monotonic()
            for event in events:
                if isinstance(event, PublishReceived):
                    event.token.received = received
                    publish(self._message(event, received_at), partial(on_done, event.token))
                elif isinstance(event, Connected):
                    self._register(event)
                elif isinstance(event, Disconnected):
                    if event.limit is not None:
                        closes = self.server.limit_closes
                        closes[event.limit] = closes.get(event.limit, 0) + 1
                    self._log_disconnect(event)
                    if self.server.lifecycle is not None:
                        self.server.lifecycle.disconnected(self, event.reason_code, event.reason,
                                                           event.will_due, event.limit)
                elif isinstance(event, AuthRequested):
                    self._authenticate(event)
        self._flush()

    def pause_writing(self) -> None:
        """The transport holds more unread output than limits.max_write_buffer_bytes:
        stop reading (no new answers are asked for) and start the slow-reader clock."""
        paused = self.server.write_paused  # those above the mark: no flag of our own
        if self not in paused:
            paused[self] = asyncio.get_running_loop().time()
            self.update_reading()

    def resume_writing(self) -> None:
        """The client read its output down to the low-water mark: read again."""
        if self.server.write_paused.pop(self, None) is not None:
            self.update_reading()
            if self.server.downlink is not None:
                self.server.downlink.writable(self)

    def close_slow_reader(self) -> None:
        """Output unread above the bound for limits.slow_reader_timeout (the sweep): end
        the connection at once, dropping what it never read (a DISCONNECT would queue
        behind it)."""
        server = self.server
        server.write_paused.pop(self, None)
        transport = self.transport
        unread = transport.get_write_buffer_size() if transport is not None else 0
        message = (f"{unread} bytes of output unread for "
                   f"{server.limits.slow_reader_timeout:g} s")
        if self.session.closing:  # closed already, waiting for output that is never read
            server.limit_closes["slow_reader"] = server.limit_closes.get("slow_reader", 0) + 1
            if server.debug:
                server.log.debug("mqtt_disconnected", peer=self.peer,
                                 client_id=self.session.client_id, reason=message,
                                 limit="slow_reader")
        else:
            self.handle_events(self.session.server_disconnect(0x97, message, "slow_reader"))
        self.abort()

    def after_ack(self) -> None:
        try:
            self._flush()
            if not self._reading:  # an ack only ever lets reading resume (_flush pauses it
                self.update_reading()  # at receive_maximum, pause_writing on a full buffer)
        except Exception:
            self._crash("ack")

    def update_reading(self) -> None:
        """Read only while the pipeline and this connection's inflight bound allow it, and
        while its output is being read (not paused for writing)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        session = self.session
        paused = self.server.write_paused
        want = not self.held and self._waiting is None and not (paused and self in paused) and (
            session.state is not AWAIT_AUTH or session.buffered < AUTH_HOLD_BYTES
        ) and not self.server.pipeline.flow.paused and (
            session.pending < self.server.limits.receive_maximum
        )
        if want != self._reading:
            self._reading = want
            # A partial packet we do not read is not the client's stall (partial timeout).
            self.session.reading_paused(not want, asyncio.get_running_loop().time())
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    @property
    def downlink(self) -> Downlink | None:
        """The session's hook to the downlink (gateway.downlink.hook)."""
        return self.server.downlink

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def release_hold(self) -> None:
        """The client id is ours now: write the CONNACK and read again."""
        if self.held:
            self.held = False
            self.after_ack()
            if self.server.downlink is not None:
                self.server.downlink.writable(self)  # what queued while held

    # --- authentication ----------------------------------------------------------------

    def _authenticate(self, event: AuthRequested) -> None:
        auth = self.server.auth
        assert auth is not None  # the session asks only when the server has one
        creds = Credentials(username=event.username, password=event.password,
                            cert_identity=self.cert_identity, peer_host=self.peer_host)
        verdict = auth.quick(creds)
        if verdict is not None:
            if self.server.shared is not None and isinstance(verdict, Identity):
                self.server.admit_later(self, verdict, creds)  # claimed with the turn's
            else:
                self._verdict(verdict, creds)
            return
        self.server.auth_tasks[self] = asyncio.get_running_loop().create_task(
            self._verify(auth, creds), name="mqtt-auth")

    def awaits_verdict(self) -> bool:
        """Still open and waiting for its CONNECT's verdict."""
        transport = self.transport
        return (transport is not None and not transport.is_closing()
                and self.session.state is AWAIT_AUTH)

    async def _verify(self, auth: Authenticator, creds: Credentials) -> None:
        try:
            delay = auth.delay_for(creds.peer_host)
            if delay > 0:
                await asyncio.sleep(delay)
            verdict = await auth.verify(creds)
        except Exception:
            self.server.auth_tasks.pop(self, None)
            self._crash("authenticate")
            return
        self.server.auth_tasks.pop(self, None)
        transport = self.transport
        if transport is None or transport.is_closing() or self.session.closing:
            return  # gone meanwhile: no CONNACK to a dead transport
        try:
            self._verdict(verdict, creds)
        except Exception:
            self._crash("authenticate")

    def _verdict(self, verdict: Identity | AuthRefusal, creds: Credentials) -> None:
        now = asyncio.get_running_loop().time()
        if isinstance(verdict, AuthRefusal):
            self.server.log_refusal(self, verdict, creds, now)
            self.handle_events(self.session.authenticated(verdict, now))
            return
        valid_until = None
        if verdict.expires_at is not None:  # wall clock -> the loop's clock
            valid_until = now + (verdict.expires_at - time.time())
        self.handle_events(self.session.authenticated(verdict, now, valid_until))
        self.update_reading()

    # --- internals -------------------------------------------------------------------

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or self.held:
            return
        session = self.session
        out = session.data_to_send()
        if out and not transport.is_closing():
            transport.write(out)
        state = session.state
        if state is CLOSED:
            self.server.close_lingering(transport)
        elif self._reading and (session.pending >= self.server.limits.receive_maximum
                                or state is AWAIT_AUTH):
            self.update_reading()

    def _message(self, event: PublishReceived, received_at: float) -> Message:
        pk = event.publish
        session = self.session
        props = pk.properties
        # With an Authenticator the verified identity says who this is (session.username
        # is its name); without one, what the CONNECT and the TLS layer said.
        identity = session.identity
        cert, claims = (self.cert_identity, None) if identity is None else (
            identity.cert, identity.claims)
        if props is None:
            return Message(
                source="mqtt", topic=pk.topic, payload=pk.payload, qos=pk.qos, retain=pk.retain,
                client_id=session.client_id, username=session.username,
                cert_identity=cert, claims=claims, received_at=received_at,
                sequence=event.sequence,
            )
        return Message(
            source="mqtt", topic=pk.topic, payload=pk.payload, qos=pk.qos, retain=pk.retain,
            client_id=session.client_id, username=session.username,
            cert_identity=cert, claims=claims, received_at=received_at,
            user_properties=props.user_properties, content_type=props.content_type,
            payload_format=props.payload_format_indicator,
            message_expiry=props.message_expiry_interval,
            correlation_data=props.correlation_data, response_topic=props.response_topic,
            sequence=event.sequence,
        )

    def _register(self, event: Connected) -> None:
        registry = self.server.registry
        old = registry.get(event.client_id)
        registry[event.client_id] = self
        self.server._unnamed.discard(self)  # live through the registry now
        if old is not None and old is not self:
            self.server._unnamed.add(old)  # live until it closes
            if old.held:
                old.abort()  # it never got its CONNACK
            else:
                old.handle_events(old.session.takeover())
        if self.server.downlink is not None:
            self.server.downlink.attach(self, event)
        if self.server.lifecycle is not None:
            self.server.lifecycle.connected(self, event.client_id)
        shared = self.server.shared
        if shared is not None and shared.connected(self, event.client_id):
            self.held = True
            self.update_reading()
        if self.server.debug:
            self.server.log.debug("mqtt_connected", peer=self.peer, client_id=event.client_id,
                                  version=event.version, session_present=event.session_present)

    def _log_disconnect(self, event: Disconnected) -> None:
        # Per-connection lines are debug (10k devices reconnecting must not cost 10k info
        # lines); a protocol error by the client stays visible at info.
        normal = event.by_client or event.reason_code < 0x80 or event.reason_code in _ROUTINE
        if event.limit == "slow_reader" or event.reason_code == 0x9F:
            normal = True  # counted; a flood of them must not flood the log
        if event.reason_code in _AUTH_REFUSED and self.session.identity is None:
            normal = True  # a refused CONNECT: mqtt_auth_refused said it (bounded)
        if normal and not self.server.debug:
            return
        getattr(self.server.log, "debug" if normal else "info")(
            "mqtt_disconnected", peer=self.peer, client_id=self.session.client_id,
            reason_code=f"0x{event.reason_code:02X}", reason=event.reason,
            by_client=event.by_client, limit=event.limit,
        )

    def _crash(self, where: str) -> None:
        """A bug must cost one connection, never the listener."""
        self.server.log.exception("mqtt_connection_error", where=where, peer=self.peer,
                                  client_id=self.session.client_id)
        self.abort()


# CONNECTs handled per turn of the event loop (MqttServer.admit_connect): one turn of 64
# costs ~25 ms on this project's 2-core benchmark host, so an ack waits at most about that
# behind a storm (docs/performance.md, "Reconnect storms").
CONNECTS_PER_TURN = 64
# How long a connection the gateway ended stays half-closed for the client to close it.
LINGER_S = 2.0
# With workers > 1, admitted CONNECTs whose registry claims find another worker writing
# try again this much later, at most this many times before waiting for the lock.
ADMIT_RETRY_S = 0.001
ADMIT_MAX_RETRIES = 50
# With workers > 1, claim transactions are this far apart at least (MqttServer.admit_later):
# each costs ~25-50 µs of CPU whether it claims 1 id or 4 (another worker's writes in
# between invalidate SQLite's page cache), so a storm's CONNACKs wait up to this much
# longer and cost about half the registry CPU (docs/performance.md, section 6).
ADMIT_COALESCE_S = 0.002
# Ends that are routine for a fleet of devices: connection lost (0x80), server shutting
# down (0x8B), keep alive timeout (0x8D), session taken over (0x8E).
_ROUTINE = frozenset({0x80, 0x8B, 0x8D, 0x8E})
_AUTH_REFUSED = frozenset({0x86, 0x87})  # 5.0 CONNACK codes of a refused CONNECT
# Bytes read and kept unparsed while a CONNECT waits for its verdict; then reading stops.
AUTH_HOLD_BYTES = 65_536
# Bounds on refusal logging: addresses remembered per interval, characters of a logged
# client id or username (both come from the client, up to 64 KiB each).
_MAX_REFUSAL_HOSTS = 4096
_LOGGED_CHARS = 128


def _cert_identity(cert: Any) -> str | None:
    """Subject CN of a verified client certificate (mTLS), else None."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
