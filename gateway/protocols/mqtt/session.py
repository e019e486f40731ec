"""One MQTT connection's protocol state, sans-IO (in the manner of h11).

The I/O layer feeds bytes with ``receive_data(data, now)`` and gets events
(``events.py``); it writes ``data_to_send()`` and closes the transport once
``closing`` is true.  Time comes in as ``now``; the server's one sweep compares
``deadline`` with its clock and calls ``expire(now)``.  Nothing here raises on
hostile input: every protocol error becomes a clean close (MQTT 5: DISCONNECT
0x81 / 0x82 / 0x93 / 0x94 / 0x95 ...; 3.1.1: close without a packet).

Acknowledgements.  Each PUBLISH yields a ``PublishToken``; the application
answers with ``ack(token, reason_code)`` when the message is safe (or failed).
PUBACK / PUBREC leave in the order the PUBLISHes arrived: a verdict for a
later message waits behind an earlier one still in flight.

MQTT 3.1.1 has no reason codes on PUBACK / PUBREC (docs/mqtt.md).  A QoS 1/2
message that failed for a reason that may pass (``retriable``: busy, spool
full, Kafka unreachable) closes the connection instead of acknowledging it: a
PUBACK promises the message is safe, and without one the client retransmits
after reconnecting; a QoS 2 packet id is released first, so that retransmission
is tried again.  A permanent failure (no rule, not authorized, rejected ...) is
acknowledged like a success, as [MQTT-3.3.5-2] allows: closing would only bring
the same message back on every reconnect.  (A message sent to the dead-letter
topic counts as safe: the application answers 0x00.)  ``ack`` returns the
events it causes, like every other entry point.

Downlink: SUBSCRIBE, UNSUBSCRIBE, the acks of outgoing PUBLISH and the CONNECT
(clean start) go to ``context.downlink`` when there is one (``_downlink``;
gateway/downlink/service.py); without it SUBSCRIBE is refused and those acks
are protocol errors.

Authentication.  A session made with ``authenticate=True`` does not answer a
valid CONNECT by itself: it emits ``AuthRequested`` and waits in
``AWAIT_AUTH`` for ``authenticated(verdict, now)``.  Bytes that arrive behind
the CONNECT (clients pipeline PUBLISH right after it) stay buffered, unparsed,
until the verdict: an ``Identity`` completes the CONNECT (CONNACK) and then
processes them; an ``AuthRefusal`` answers CONNACK 0x04 / 0x05 (3.1.1) or
0x86 / 0x87 (5.0), creates no session state, discards the will, and drops them
unread [MQTT-3.1.4-5] (5.0: [MQTT-3.1.4-6]).  The CONNECT timeout keeps
running while the verdict is awaited.  An identity that expires (a JWT's
``exp``, as ``valid_until`` in the caller's clock) moves ``deadline``: the
sweep's ``expire`` then ends the connection (5.0: DISCONNECT 0x87).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgspec

from gateway.auth import REFUSAL_CODES, AuthRefusal, Identity
from gateway.downlink.hook import DownlinkHook
from gateway.errors import GatewayError, ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import (
    ProtocolViolation,
    UnknownProtocolName,
    UnsupportedProtocolVersion,
    connect_level,
    decode_packets,
    encode,
)
from gateway.protocols.mqtt.events import (
    AuthRequested,
    Connected,
    Disconnected,
    Event,
    MqttLimits,
    PublishReceived,
    PublishToken,
)
from gateway.protocols.mqtt.negotiate import (
    connack_properties,
    default_client_id,
    keep_alive,
    session_expiry,
)
from gateway.protocols.mqtt.properties import EMPTY, Properties
from gateway.protocols.mqtt.store import ClientState, SessionStore
from gateway.protocols.mqtt.wire import is_utf8

AWAIT_CONNECT, AWAIT_AUTH, CONNECTED, CLOSED = (
    "AWAIT_CONNECT", "AWAIT_AUTH", "CONNECTED", "CLOSED")
NO_DEADLINE = float("inf")
SUBSCRIBE_UNSUPPORTED = "subscriptions are not supported yet"
_PUBACK = b"\x40\x02"  # PUBACK, remaining length 2: success without properties (3.1.1 and 5)
# Successful 3.1.1 CONNACK without / with session present: the common CONNECT answer.
_CONNACK_V4 = (b"\x20\x02\x00\x00", b"\x20\x02\x01\x00")
# CONNACK reason codes (MQTT 5.0, 3.2.2.2) a refused CONNECT may carry.
_CONNACK_REASONS = frozenset(
    {0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
     0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
# Reason codes a PUBACK / PUBREC may carry (MQTT 5.0, 3.4.2.1 and 3.5.2.1). A failure
# whose code is not one of them (0x89 busy, 0x8B shutting down, 0x95 too large) is
# sent as 0x80 Unspecified error, its reason string still saying why.
_ACK_REASONS = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_GRACE: dict[int, float] = {}  # keep alive -> 1.5 x keep alive, one float shared by all


def _grace(keep: int) -> float:
    grace = _GRACE.get(keep)
    if grace is None:
        grace = _GRACE[keep] = keep * 1.5 if keep else NO_DEADLINE
    return grace


class OverLimit(ProtocolViolation):
    """A client went past a per-connection bound (``limit`` names it, for the counters)."""

    def __init__(self, limit: str, reason: int, message: str) -> None:
        super().__init__(reason, message)
        self.limit = limit


def _check_response_topic(topic: str) -> None:
    """A Response Topic is a Topic Name: not empty, no wildcards [MQTT-3.3.2-13/14]."""
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError("the response topic is not a valid topic name")


class _Setup:
    """What every session of one server shares: its limits, its store, how it names a
    client that sent no client id, and whether a CONNECT waits for a verdict."""

    __slots__ = ("authenticate", "limits", "new_client_id", "store")

    def __init__(self, limits: MqttLimits, store: SessionStore,
                 new_client_id: Callable[[], str], authenticate: bool) -> None:
        self.limits = limits
        self.store = store
        self.new_client_id = new_client_id
        self.authenticate = authenticate


_last_setup: _Setup | None = None


def _setup_for(limits: MqttLimits, store: SessionStore, new_client_id: Callable[[], str],
               authenticate: bool) -> _Setup:
    """The ``_Setup`` of the previous session if it is the same (a server makes all of
    its sessions alike), else a new one: one object per server, not one slot each."""
    global _last_setup
    last = _last_setup
    if (last is None or last.store is not store or last.new_client_id is not new_client_id
            or last.authenticate is not authenticate or last.limits is not limits):
        last = _last_setup = _Setup(limits, store, new_client_id, authenticate)
    return last


class _ClientExtra:
    """A session's rarely set fields: the will, the client's MQTT 5 Receive Maximum and
    Topic Alias Maximum (for the downlink, later), when the identity expires (the
    caller's clock), the answer to a CONNECT refused before it came (MQTT 5 code), and
    a client's request for no reason strings (Request Problem Information 0)."""

    __slots__ = ("max_packet_size", "problem_info", "receive_maximum", "refuse_with",
                 "topic_alias_maximum", "valid_until", "will")

    def __init__(self) -> None:
        self.will: p.Will | None = None
        self.receive_maximum = 65535
        self.topic_alias_maximum = 0
        self.valid_until = NO_DEADLINE
        self.refuse_with = 0
        self.problem_info = True
        self.max_packet_size = 0  # the client's MQTT 5 Maximum Packet Size; 0: no limit


class MqttSession:
    """One connection's protocol state.

    Memory matters here (tens of thousands of idle connections per process):
    buffers, the ack queue, the alias map and the event list exist only while
    they hold something; an idle session is its slots and its client id.
    """

    __slots__ = (
        "_alias_bytes", "_aliases", "_buf", "_client", "_connect", "_events", "_expiry",
        "_extra", "_grace", "_inflight", "_order", "_out", "_partial_until",
        "_setup", "client_id",
        "context", "identity", "last_received", "pending", "state", "username", "version",
    )

    def __init__(
        self,
        limits: MqttLimits,
        store: SessionStore,
        now: float,
        new_client_id: Callable[[], str] = default_client_id,
        *,
        authenticate: bool = False,
    ) -> None:
        # The limits, the store, the client id maker and whether a CONNECT waits for
        # ``authenticated``: the same for every session of a server, so one object.
        self._setup = _setup_for(limits, store, new_client_id, authenticate)
        self._connect: tuple[p.Connect, str | None] | None = None  # (CONNECT, assigned id)
        self.identity: Identity | None = None  # the verdict that let the client in
        # Created on first use and dropped when empty (see the class docstring).
        self._buf: bytearray | None = None  # a partial packet waiting for its tail
        self._out: list[bytes] | None = None  # bytes for data_to_send()
        self._events: list[Event] | None = None  # events of the current call
        self._order: deque[PublishToken] | None = None  # acks to send, in arrival order
        self._aliases: dict[int, str] | None = None
        self._alias_bytes = 0  # UTF-8 bytes of the topics in _aliases (topic_alias_max_bytes)
        self._partial_until = NO_DEADLINE  # _buf's packet must be complete by then
        self._client: ClientState | None = None
        self._inflight = 0  # QoS 1/2 not yet PUBACKed / PUBCOMPed (Receive Maximum)
        self._expiry = 0  # seconds to keep the client state after close
        self._grace = limits.connect_timeout
        self.state = AWAIT_CONNECT
        self.version = 0
        self.client_id = ""
        self.username: str | None = None
        # What few sessions need (_ClientExtra: the will, the client's MQTT 5 limits, the
        # identity's expiry, a refusal decided before the CONNECT), made when first set.
        self._extra: _ClientExtra | None = None
        self.last_received = now
        self.pending = 0  # tokens of any QoS not answered yet (the server's inflight bound)
        self.context: object = None  # the I/O layer's connection object

    def _extras(self) -> _ClientExtra:
        extra = self._extra
        if extra is None:
            extra = self._extra = _ClientExtra()
        return extra

    @property
    def will(self) -> p.Will | None:
        """The CONNECT's will, kept for presence events (later)."""
        extra = self._extra
        return extra.will if extra is not None else None

    @property
    def keep_alive(self) -> int:
        """The keep alive in force, in seconds (0: none, or no CONNECT yet)."""
        if self.state is AWAIT_CONNECT or self.state is AWAIT_AUTH:
            return 0
        grace = self._grace
        return 0 if grace == NO_DEADLINE else round(grace / 1.5)

    @property
    def problem_info(self) -> bool:
        """Whether reason strings may be sent (MQTT 5 Request Problem Information)."""
        extra = self._extra
        return extra.problem_info if extra is not None else True

    @property
    def client_max_packet_size(self) -> int:
        """The client's MQTT 5 Maximum Packet Size (0: no limit)."""
        extra = self._extra
        return extra.max_packet_size if extra is not None else 0

    @property
    def client_receive_maximum(self) -> int:
        extra = self._extra
        return extra.receive_maximum if extra is not None else 65535

    @property
    def client_topic_alias_maximum(self) -> int:
        extra = self._extra
        return extra.topic_alias_maximum if extra is not None else 0

    # --- I/O layer API -----------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.state is CLOSED

    @property
    def deadline(self) -> float:
        """When the sweep must call ``expire`` (CONNECT timeout, 1.5 x keep alive, the
        identity's expiry, or a partial packet's timeout)."""
        deadline = self.last_received + self._grace
        extra = self._extra
        if extra is not None and extra.valid_until < deadline:
            deadline = extra.valid_until
        partial = self._partial_until
        return deadline if deadline < partial else partial

    def reading_paused(self, paused: bool, now: float) -> None:
        """The I/O layer stopped (or resumed) reading: a packet we do not read cannot be
        the client's fault, so its partial timeout stops, and starts over on resume."""
        if paused:
            self._partial_until = NO_DEADLINE
        elif self._buf is not None and self.state is not AWAIT_AUTH:
            self._partial_until = now + self._setup.limits.partial_packet_timeout

    @property
    def clean_start(self) -> bool:
        """The clean start flag of the CONNECT waiting for its verdict (``AWAIT_AUTH``)."""
        pending = self._connect
        return pending is not None and pending[0].clean_start

    @property
    def buffered(self) -> int:
        """Bytes received but not parsed yet (a partial packet, or all that came while
        ``AWAIT_AUTH``): the I/O layer bounds them by not reading."""
        buf = self._buf
        return len(buf) if buf is not None else 0

    def data_to_send(self) -> bytes:
        out = self._out
        if out is None:
            return b""
        self._out = None
        return out[0] if len(out) == 1 else b"".join(out)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes; get every event the complete packets in them produce."""
        events: list[Event] = []
        state = self.state
        if state is CLOSED:
            return events
        if state is AWAIT_AUTH:  # kept unread until the verdict
            if self._buf is None:
                self._buf = bytearray(data)
            else:
                self._buf += data
            return events
        self._events = events
        if state is CONNECTED:
            self.last_received = now  # before CONNECT the deadline is fixed
        self._parse(data, now)
        self._events = None
        return events

    def authenticated(self, verdict: Identity | AuthRefusal, now: float,
                      valid_until: float | None = None) -> list[Event]:
        """The I/O layer's answer to ``AuthRequested``.

        An ``Identity`` completes the CONNECT and processes what was buffered
        behind it; ``valid_until`` (in the clock of ``now``) is when it expires.
        An ``AuthRefusal`` answers the refusal CONNACK and closes.  Ignored
        unless the session waits for a verdict (it may have closed meanwhile).
        """
        events: list[Event] = []
        pending = self._connect
        if self.state is not AWAIT_AUTH or pending is None:
            return events
        self._connect = None
        self._events = events
        pk, assigned = pending
        if isinstance(verdict, AuthRefusal):
            v4, v5, _http = REFUSAL_CODES[verdict.reason]
            self._buf = None  # [MQTT-3.1.4-5]: nothing after a refused CONNECT is read
            self._refuse(v5 if self.version == 5 else v4, verdict.message, self.version)
        else:
            self.identity = verdict
            self.username = verdict.name
            if valid_until is not None:
                self._extras().valid_until = valid_until
            self._accept(pk, assigned, now)
            buf, self._buf = self._buf, None
            if buf:
                self._parse(bytes(buf), now)
        self._events = None
        return events

    def _parse(self, data: bytes, now: float) -> None:
        """Handle every complete packet of ``data`` (after what was buffered)."""
        # The usual chunk holds whole packets: parse it in place, copy only a tail.
        buf = self._buf
        src: bytes | bytearray = data
        if buf is not None:
            buf += data
            src = buf
        completed = False  # a packet ended in this chunk: a tail left is a new packet
        try:
            while True:
                version = self.version
                packets, used = decode_packets(src, version, self._setup.limits.max_packet_size)
                for packet in packets:
                    completed = True
                    self._handle(packet, now)
                    if self.state is CLOSED:
                        return
                if buf is not None and src is buf:
                    del buf[:used]
                else:
                    src = src[used:]
                if version or not packets or not src or self.state is AWAIT_AUTH:
                    break  # only the CONNECT pass needs a second round
            if not src:
                self._buf = None
                self._partial_until = NO_DEADLINE
            else:
                if src is not buf:
                    self._buf = bytearray(src)
                if self.state is AWAIT_AUTH:
                    self._partial_until = NO_DEADLINE  # kept unread until the verdict
                elif completed or buf is None:
                    # The clock of an incomplete packet starts with its first byte
                    # (limits.partial_packet_timeout; the sweep checks it).
                    self._partial_until = now + self._setup.limits.partial_packet_timeout
        except UnsupportedProtocolVersion as exc:
            # [MQTT-3.1.2-2]: 3.1.1 requires return code 0x01; 5.0 leaves the answer
            # open, and a client of an unknown level reads the 3.1.1 form best.
            self._refuse(0x01, exc.message, 4)
        except UnknownProtocolName as exc:
            # 5.0 [MQTT-3.1.2-1] lets a server say "MQTT, not this" with 0x84; 3.1.1 closes.
            if exc.level == 5:
                self._refuse(0x84, exc.message, 5)
            else:
                self._fail(exc.mqtt_reason, exc.message)
        except GatewayError as exc:
            if self.state is AWAIT_CONNECT and connect_level(src) == 5:
                # MQTT 5 lets the server answer a bad CONNECT with a CONNACK reason code
                # (4.13.1); 3.1.1 closes without one [MQTT-3.1.4-1].
                code = exc.mqtt_reason if exc.mqtt_reason in _CONNACK_REASONS else 0x82
                self._refuse(code, exc.message, 5)
            else:
                self._fail(exc.mqtt_reason, exc.message,
                           limit=exc.limit if isinstance(exc, OverLimit) else None)

    def ack(
        self, token: PublishToken, reason_code: int = 0, reason: str | None = None,
        *, retriable: bool = True,
    ) -> list[Event]:
        """The application's verdict on ``token``: 0x00 safe, >= 0x80 failed.

        ``retriable`` says whether the same message may succeed later (busy, spool
        full, Kafka unreachable); it only matters for MQTT 3.1.1, which has no
        reason codes (see the module docstring).  Returns the events the verdict
        produced (a ``Disconnected`` when a 3.1.1 session closes on it).
        """
        events: list[Event] = []
        if token.done:
            return events
        token.done = True
        token.reason_code = reason_code
        token.reason_string = reason
        token.retriable = retriable
        self.pending -= 1
        if token.qos and self.state is CONNECTED:
            if self._events is not None:  # inside receive_data: its list gets the events
                self._flush_acks()
                return events
            self._events = events
            self._flush_acks()
            self._events = None
        return events

    def imported_qos2(self, count: int) -> None:
        """``count`` unreleased QoS 2 ids came into the store after CONNECT (from another
        worker of the gateway): they count against Receive Maximum like the others."""
        self._inflight += count

    def expire(self, now: float) -> list[Event]:
        """Called by the sweep once ``now >= deadline``."""
        events: list[Event] = []
        self._events = events
        if self.state is not CLOSED and now >= self._partial_until:
            # A packet started and never finished (a stalled or trickling client): MQTT 5
            # hears 0x8D, the keep alive answer, as no whole packet came in time.
            message = f"packet incomplete for {self._setup.limits.partial_packet_timeout:g} s"
            if self.state is CONNECTED:
                self._fail(0x8D, message, limit="partial_packet")
            else:
                self._close(0x8D, message, will_due=False, limit="partial_packet")
        elif self.state is CONNECTED and now >= self.deadline:
            extra = self._extra
            if extra is not None and now >= extra.valid_until:
                self._fail(0x87, "token expired")  # 0x87 Not authorized
            else:
                self._fail(0x8D, "keep alive timeout", limit="keep_alive")
        elif self.state is AWAIT_CONNECT and now >= self.deadline:
            self._close(0x8D, "no CONNECT in time", will_due=False)
        elif self.state is AWAIT_AUTH and now >= self.deadline:
            self._connect = None
            self._close(0x8D, "no authentication verdict in time", will_due=False)
        self._events = None
        return events

    def takeover(self) -> list[Event]:
        """Another connection has the same client id: it wins (MQTT 5: 0x8E)."""
        return self.server_disconnect(0x8E, "session taken over")

    def refuse_connect(self, reason_code: int) -> None:
        """Refuse the CONNECT to come, whatever it says (before authentication and the
        client id): MQTT 5 gets CONNACK ``reason_code``, 3.1.1 a close without CONNACK."""
        self._extras().refuse_with = reason_code

    def server_disconnect(self, reason_code: int, message: str,
                          limit: str | None = None) -> list[Event]:
        """End the session from the server side (MQTT 5: DISCONNECT ``reason_code``);
        ``limit`` names the bound that ended it (``Disconnected.limit``)."""
        events: list[Event] = []
        self._events = events
        if self.state is CONNECTED:
            self._fail(reason_code, message, limit=limit)
        else:
            self._close(reason_code, message, will_due=False, limit=limit)
        self._events = None
        return events

    def connection_lost(self, now: float) -> list[Event]:
        """The transport closed; keep the client's state for the session expiry."""
        events: list[Event] = []
        self._events = events
        if self.state is not CLOSED:
            self._close(0x80, "connection lost", will_due=self.state is CONNECTED)
        if self._client is not None:
            self._setup.store.release(self.client_id, self._client, self, self._expiry, now)
            self._client = None
        self._events = None
        return events

    # --- packets -------------------------------------------------------------------

    def _handle(self, packet: p.AnyPacket, now: float) -> None:
        if isinstance(packet, p.Publish):
            if self.state is CONNECTED:
                return self._on_publish(packet)
        elif isinstance(packet, p.Connect):
            if self.state is AWAIT_CONNECT:
                return self._on_connect(packet, now)
        elif isinstance(packet, p.Pubrel):
            return self._on_pubrel(packet)
        elif isinstance(packet, p.Pingreq):
            return self._send(p.Pingresp())
        elif isinstance(packet, p.Subscribe):
            return self._on_subscribe(packet)
        elif isinstance(packet, p.Unsubscribe):
            if self._downlink(packet):
                return None
            codes = [0x11] * len(packet.topic_filters) if self.version == 5 else []
            return self._send(p.Unsuback(packet_id=packet.packet_id, reason_codes=codes))
        elif isinstance(packet, p.Disconnect):
            return self._on_disconnect(packet)
        elif isinstance(packet, (p.Puback, p.Pubrec, p.Pubcomp)) and self._downlink(packet):
            return None  # an ack of a PUBLISH the downlink sent
        raise ProtocolError(f"unexpected {type(packet).__name__} in state {self.state}")

    def _on_publish(self, pk: p.Publish) -> None:
        props = pk.properties
        if props is not None:
            if props.topic_alias is not None:
                pk.topic = self._resolve_alias(pk.topic, props.topic_alias)
            elif not pk.topic:
                raise ProtocolError("empty topic name without a topic alias")
            if props.subscription_identifiers:  # [MQTT-3.3.4-6]
                raise ProtocolError("a client's PUBLISH carries a subscription identifier")
            if props.response_topic is not None:
                _check_response_topic(props.response_topic)
        qos = pk.qos
        client = self._client
        assert client is not None
        if qos == 2 and client.qos2 and pk.packet_id in client.qos2:
            return self._on_duplicate_qos2(client.qos2[pk.packet_id])
        if qos and self.version == 5 and self._inflight >= self._setup.limits.receive_maximum:
            raise ProtocolViolation(0x93, "receive maximum exceeded")
        bad_utf8 = props is not None and props.payload_format_indicator == 1 and not is_utf8(
            pk.payload
        )
        if bad_utf8 and not qos:
            raise ProtocolViolation(0x99, "payload is not the UTF-8 its format indicator declares")
        token = PublishToken(self, qos, pk.packet_id)
        self.pending += 1
        if qos:
            self._inflight += 1
            order = self._order
            if order is None:
                order = self._order = deque()
            order.append(token)
            if qos == 2:
                if client.qos2 is None:
                    client.qos2 = {}
                client.qos2[pk.packet_id] = token
        if bad_utf8:  # the events of this ack go to receive_data's list
            self.ack(token, 0x99, "payload is not valid UTF-8", retriable=False)
            return None
        self._emit(PublishReceived(token=token, publish=pk, sequence=client.sequence))

    def _resolve_alias(self, topic: str, alias: int) -> str:
        limits = self._setup.limits
        if not 0 < alias <= limits.topic_alias_maximum:
            raise ProtocolViolation(0x94, f"topic alias {alias} out of range")
        aliases = self._aliases
        if topic:
            if aliases is None:
                aliases = self._aliases = {}
            old = aliases.get(alias)
            if old == topic:
                return old  # set again to the same topic (some clients always do)
            size = len(topic) if topic.isascii() else len(topic.encode())
            if old is not None:
                size -= len(old) if old.isascii() else len(old.encode())
            held = self._alias_bytes + size
            if held > limits.topic_alias_max_bytes:
                # Bounded memory per connection (docs/mqtt.md, "Topic aliases"): MQTT 5
                # has no way to announce a byte bound, so going over it is 0x97, "an
                # implementation or administrative imposed limit has been exceeded".
                raise OverLimit("topic_alias_bytes", 0x97, (
                    f"topic aliases would hold {held} bytes of topic names, over the "
                    f"{limits.topic_alias_max_bytes} allowed"))
            self._alias_bytes = held
            aliases[alias] = topic
            return topic
        known = aliases.get(alias) if aliases is not None else None
        if known is None:
            raise ProtocolError(f"topic alias {alias} was never set")
        return known

    def _on_duplicate_qos2(self, token: PublishToken) -> None:
        """A retransmitted, unreleased QoS 2 PUBLISH: answer it, never produce it again."""
        if token.sent:
            self._send(p.Pubrec(packet_id=token.packet_id, reason_code=token.reason_code))
        elif token.session is not self:
            # Still pending from the previous connection: its verdict comes here now.
            if not token.done:  # and so does its place in the in-flight count
                token.session.pending -= 1
                self.pending += 1
            token.session = self
            if self._order is None:
                self._order = deque()
            self._order.append(token)
            if token.done:
                self._flush_acks()

    def _on_pubrel(self, pk: p.Pubrel) -> None:
        client = self._client
        assert client is not None
        token = client.qos2.get(pk.packet_id) if client.qos2 else None
        if token is None:
            self._send(p.Pubcomp(packet_id=pk.packet_id, reason_code=0x92))
            return
        if not token.sent:
            raise ProtocolError(f"PUBREL for packet {pk.packet_id} before PUBREC")
        del client.qos2[pk.packet_id]  # type: ignore[union-attr]  # token came from it
        self._inflight -= 1
        self._send(p.Pubcomp(packet_id=pk.packet_id))

    def _downlink(self, packet: p.AnyPacket) -> bool:
        """Hand ``packet`` to the downlink (gateway.downlink.hook); False: not served."""
        hook: DownlinkHook | None = getattr(self.context, "downlink", None)
        reply = hook.packet(self, packet) if hook is not None else None
        if reply is None:
            return False
        if reply:
            self._write(reply)
        return True

    @property
    def expiry_interval(self) -> int:
        """Seconds the client's state outlives the connection (0: ends with it)."""
        return self._expiry

    def _on_subscribe(self, pk: p.Subscribe) -> None:
        if self.state is CONNECTED and self._downlink(pk):
            return
        props = None
        if self.version == 5 and self.problem_info:
            props = Properties(reason_string=SUBSCRIBE_UNSUPPORTED)
        code = 0x83 if self.version == 5 else 0x80
        codes = [code] * len(pk.subscriptions)
        self._send(p.Suback(packet_id=pk.packet_id, reason_codes=codes, properties=props))

    def _on_disconnect(self, pk: p.Disconnect) -> None:
        props = pk.properties
        if props is not None and props.session_expiry_interval is not None:
            if self._expiry == 0 and props.session_expiry_interval:
                raise ProtocolError("DISCONNECT sets a session expiry after CONNECT said 0")
            self._expiry = min(props.session_expiry_interval, self._setup.limits.max_session_expiry)
        self._close(pk.reason_code, "client disconnected", will_due=pk.reason_code == 0x04,
                    by_client=True)

    # --- CONNECT -------------------------------------------------------------------

    def _on_connect(self, pk: p.Connect, now: float) -> None:
        level = pk.protocol_level
        will = pk.will
        if will is not None and will.properties is not None:
            will_props = will.properties
            if will_props.response_topic is not None:
                _check_response_topic(will_props.response_topic)
            if will_props.payload_format_indicator == 1 and not is_utf8(will.payload):
                return self._refuse(0x99, "will payload is not the UTF-8 it declares", level)
        self.version = level
        refuse_with = self._extra.refuse_with if self._extra is not None else 0
        if refuse_with:  # refuse_connect (the server's connect rate)
            if level == 5:
                return self._refuse(refuse_with, "connection rate exceeded", level)
            self.version = 4
            return self._close(refuse_with, "connection rate exceeded", will_due=False)
        props = pk.properties or EMPTY
        if props.authentication_method is not None:
            return self._refuse(0x8C, "enhanced authentication is not supported", level)
        client_id = pk.client_id
        limit = self._setup.limits.max_client_id_bytes  # docs/sessions.md, "Bounds"
        if len(client_id) > limit // 4 and len(client_id.encode()) > limit:
            self._setup.store.refused_client_ids += 1
            return self._refuse(0x85 if level == 5 else 0x02, "client id too long", level)
        assigned = None
        if not client_id:
            if level == 4 and not pk.clean_start:
                return self._refuse(0x02, "empty client id needs clean session", level)
            client_id = assigned = self._setup.new_client_id()
        self.client_id = client_id
        if self._setup.authenticate:
            self.state = AWAIT_AUTH
            self._connect = (pk, assigned)
            return self._emit(AuthRequested(client_id=client_id, version=level,
                                            username=pk.username, password=pk.password))
        self.username = pk.username
        self._accept(pk, assigned, now)

    def _accept(self, pk: p.Connect, assigned: str | None, now: float) -> None:
        """Complete a CONNECT: open the client's state, CONNACK, ``Connected``."""
        level = pk.protocol_level
        props = pk.properties or EMPTY
        client_id = self.client_id
        limits = self._setup.limits
        if pk.will is not None or props.receive_maximum or props.topic_alias_maximum:
            extra = self._extras()
            extra.will = pk.will
            extra.receive_maximum = props.receive_maximum or 65535
            extra.topic_alias_maximum = props.topic_alias_maximum or 0
        if props.maximum_packet_size:
            self._extras().max_packet_size = props.maximum_packet_size
        if props.request_problem_information == 0:
            self._extras().problem_info = False
        keep, server_keep = keep_alive(pk.keep_alive, level, limits)
        self._grace = _grace(keep)
        self._expiry = session_expiry(pk, limits)
        self._client, present = self._setup.store.open(client_id, pk.clean_start, self, now)
        self.last_received = now
        self._inflight = len(self._client.qos2) if self._client.qos2 else 0
        self._downlink(pk)  # a clean start ends the client's subscriptions (before any SUBSCRIBE)
        self.state = CONNECTED
        if level == 5:
            served = getattr(self.context, "downlink", None) is not None
            connack_props = connack_properties(pk, limits, assigned, server_keep, self._expiry,
                                               served)
            self._send(p.Connack(session_present=present, properties=connack_props))
        else:
            self._write(_CONNACK_V4[present])
        self._emit(Connected(
            client_id=client_id, version=level, clean_start=pk.clean_start,
            session_present=present, keep_alive=keep, username=self.username,
            password=pk.password, will=pk.will, properties=pk.properties,
        ))

    # --- output and closing ------------------------------------------------------

    def _flush_acks(self) -> None:
        order = self._order
        if order is None:
            return
        while order and order[0].done:
            token = order.popleft()
            code = token.reason_code
            if code >= 0x80 and self.version == 4 and token.retriable:
                # Not safe yet, and 3.1.1 cannot say so: close without an ack, so the
                # client sends it again after reconnecting.  A QoS 2 id is released
                # first: that retransmission is a new attempt, not a cached verdict.
                self._inflight -= 1
                if token.qos == 2 and self._client is not None and self._client.qos2:
                    self._client.qos2.pop(token.packet_id, None)
                return self._fail(code, f"message {token.packet_id} failed (0x{code:02X})")
            # (A permanent 3.1.1 failure is acknowledged like a success [MQTT-3.3.5-2]:
            # closing would only bring the same message back, forever.)
            token.sent = True
            if not code and token.qos == 1:
                # The common case, without building a packet: 4 bytes in both versions.
                self._inflight -= 1
                limit = self.client_max_packet_size
                if not limit or limit >= 4:
                    self._write(_PUBACK + token.packet_id.to_bytes(2, "big"))
                continue
            props = None
            if code >= 0x80 and token.reason_string and self.problem_info:
                props = Properties(reason_string=token.reason_string)
            if code not in _ACK_REASONS:
                code = 0x80
            if token.qos == 1:
                self._inflight -= 1
                self._send(p.Puback(packet_id=token.packet_id, reason_code=code, properties=props))
                continue
            client = self._client
            if code >= 0x80 and self.version == 5 and client is not None and client.qos2:
                # A failed QoS 2 exchange ends here (MQTT 5): the id is free again.
                client.qos2.pop(token.packet_id, None)
                self._inflight -= 1
            self._send(p.Pubrec(packet_id=token.packet_id, reason_code=code, properties=props))

    def _send(self, packet: p.AnyPacket) -> None:
        data = encode(packet, self.version or 4)
        limit = self.client_max_packet_size
        if limit and len(data) > limit and getattr(packet, "properties", None) is not None:
            # Reason strings and user properties are the parts MQTT 5 lets us drop.
            data = encode(msgspec.structs.replace(packet, properties=None), self.version)
        if not limit or len(data) <= limit:
            self._write(data)

    def _write(self, data: bytes) -> None:
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)

    def _emit(self, event: Event) -> None:
        # Every entry point (receive_data, ack, expire, ...) sets the list it returns.
        events = self._events
        assert events is not None, "event emitted outside an entry point"
        events.append(event)

    def _refuse(self, code: int, message: str, level: int) -> None:
        """Answer CONNECT with a failure CONNACK (``code`` in the dialect of ``level``), close."""
        self.version = 5 if level == 5 else 4
        self._send(p.Connack(reason_code=code))
        self._close(code, message, will_due=False)

    def _fail(self, reason: int, message: str, *, limit: str | None = None) -> None:
        """Close for a protocol-level reason; MQTT 5 clients get a DISCONNECT first."""
        if self.state is CONNECTED and self.version == 5:
            props = Properties(reason_string=message) if self.problem_info else None
            self._send(p.Disconnect(reason_code=reason, properties=props))
        self._close(reason, message, will_due=self.state is CONNECTED, limit=limit)

    def _close(self, reason: int, message: str, *, will_due: bool, by_client: bool = False,
               limit: str | None = None) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self._buf = None
        self._partial_until = NO_DEADLINE
        self._aliases = None
        self._alias_bytes = 0
        self._emit(Disconnected(
            reason_code=reason, reason=message, by_client=by_client, will_due=will_due,
            limit=limit,
        ))

