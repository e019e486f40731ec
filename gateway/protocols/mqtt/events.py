"""What a session tells its I/O layer, and the limits the I/O layer gives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from gateway.model import Sequence
from gateway.protocols.mqtt.packets import Publish, Will
from gateway.protocols.mqtt.properties import Properties

if TYPE_CHECKING:
    from gateway.protocols.mqtt.session import MqttSession


@dataclass(frozen=True, slots=True)
class MqttLimits:
    """Per-connection limits; the server builds it from ``config`` (``limits:``).

    ``receive_maximum`` is both the MQTT 5 Receive Maximum advertised in CONNACK
    (exceeding it is protocol error 0x93) and, for every version, the number of
    unacknowledged publishes after which the server stops reading the socket.
    """

    max_packet_size: int = 1024 * 1024
    receive_maximum: int = 64
    connect_timeout: float = 10.0
    # The longest silence any connection gets (docs/mqtt.md, "Idle and partial input"):
    # MQTT 5 keep alives of 0 or above it are replaced (Server Keep Alive); a 3.1.1 client
    # asking 0 or more is closed after 1.5 x this of silence.  0 = no cap.
    max_keep_alive: int = 3600
    # When set, every MQTT 5 client is told to use this keep alive instead of its own.
    server_keep_alive: int | None = None
    topic_alias_maximum: int = 10
    # Bytes of topic names the aliases of one connection may hold; a client that would go
    # over gets DISCONNECT 0x97 (Quota exceeded).
    topic_alias_max_bytes: int = 64 * 1024
    # A packet not complete this long after its first byte arrived closes the connection.
    partial_packet_timeout: float = 30.0
    # Upper bound for state kept after a disconnect (3.1.1 clean session 0 asks "forever").
    max_session_expiry: int = 24 * 3600
    # Open connections per server (per worker process); 0 = no limit.  The I/O layer
    # closes a connection over the limit before reading anything from it.
    max_connections: int = 0
    # Released sessions kept per worker; over it the soonest to expire goes (docs/sessions.md).
    max_sessions: int = 100_000
    # A longer client id is refused at CONNECT (MQTT 5: 0x85, 3.1.1: 0x02).
    max_client_id_bytes: int = 256
    # Output the client has not read (bytes in the transport's buffer): above it reading
    # stops (the transport's high-water mark; low water is a quarter of it), and a
    # connection above it for ``slow_reader_timeout`` seconds is closed (docs/mqtt.md).
    max_write_buffer_bytes: int = 64 * 1024
    slow_reader_timeout: float = 30.0
    # New connections per second per server (a token bucket of ``connect_burst``; 0: one
    # second's worth); over it MQTT 5 gets CONNACK 0x9F, 3.1.1 a close.  0 = no limit.
    connect_rate: float = 0.0
    connect_burst: int = 0
    # Open connections from one source address; more are closed unread.  0 = no limit.
    max_connections_per_source: int = 0


class PublishToken:
    """One received PUBLISH waiting for the application's verdict.

    The I/O layer passes it back to ``token.session.ack(...)``.  ``session`` is
    re-pointed when a reconnecting client retransmits an unreleased QoS 2
    packet, so the verdict lands on the connection that now waits for it.
    """

    __slots__ = (
        "done", "packet_id", "qos", "reason_code", "reason_string", "received", "retriable", "sent",
        "session",
    )

    def __init__(self, session: MqttSession, qos: int, packet_id: int) -> None:
        self.session = session
        self.qos = qos
        self.packet_id = packet_id
        self.done = False  # the application has answered
        self.sent = False  # the PUBACK / PUBREC has been written
        self.reason_code = 0
        self.reason_string: str | None = None
        self.retriable = True  # a failure may succeed later (see MqttSession.ack)
        self.received = 0.0  # monotonic time the I/O layer read it (ack latency)

    def __repr__(self) -> str:
        return f"PublishToken(qos={self.qos}, packet_id={self.packet_id}, done={self.done})"


class Connected(msgspec.Struct, kw_only=True):
    """CONNACK (success) has been queued; the server registers ``client_id``."""

    client_id: str
    version: int
    clean_start: bool
    session_present: bool
    keep_alive: int
    username: str | None
    password: bytes | None
    will: Will | None
    properties: Properties | None


class AuthRequested(msgspec.Struct, kw_only=True):
    """A valid CONNECT waits for the I/O layer's verdict (``session.authenticated``).

    Emitted only by a session made with ``authenticate=True``.  Nothing is sent
    and nothing that arrived after the CONNECT is processed until the verdict.
    """

    client_id: str
    version: int
    username: str | None
    password: bytes | None


class PublishReceived(msgspec.Struct, kw_only=True):
    """A PUBLISH to hand to the pipeline; answer with ``token.session.ack``.

    ``publish.topic`` is already resolved from a topic alias.
    """

    token: PublishToken
    publish: Publish
    # The session's stamp counter (ClientState.sequence), drawn from when a rule stamps.
    sequence: Sequence | None = None


class Disconnected(msgspec.Struct, kw_only=True):
    """The session is over; the I/O layer writes what is left and closes."""

    reason_code: int  # MQTT 5 reason (also used for 3.1.1 logging)
    reason: str
    by_client: bool = False
    will_due: bool = False  # the will should be published (presence feature, later)
    # The per-connection bound that ended it ("idle", "partial_packet", "topic_alias_bytes"),
    # counted by the server (lastmile_mqtt_limit_closes_total).
    limit: str | None = None


Event = Connected | PublishReceived | Disconnected | AuthRequested
