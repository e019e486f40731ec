"""MQTT 3.1.1 / 5.0 control packets as plain data.

One class per packet type.  Fields hold decoded values only; the codec
(``codec.py`` / ``encode.py``) turns them into bytes and back.  ``properties``
is ``None`` for MQTT 3.1.1 and a ``Properties`` for 5.0.  Packets are msgspec
Structs: their construction is the cheapest way to hold a handful of fields and
equality comes for free, which the round-trip tests rely on.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from gateway.protocols.mqtt.properties import Properties

MQTT311 = 4
MQTT5 = 5

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15


class Packet(msgspec.Struct, gc=False, kw_only=True):
    """Base of every packet; ``TYPE`` is the fixed-header packet type."""

    TYPE: ClassVar[int] = 0


class Will(msgspec.Struct, gc=False, kw_only=True):
    """The will message carried by CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None


class Connect(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = CONNECT

    protocol_level: int = MQTT311
    protocol_name: str = "MQTT"
    clean_start: bool = True
    keep_alive: int = 0
    client_id: str = ""
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties | None = None


class Connack(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = CONNACK

    session_present: bool = False
    reason_code: int = 0  # 3.1.1: the return code
    properties: Properties | None = None


class Publish(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PUBLISH

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0  # 0 means "none" (QoS 0)
    properties: Properties | None = None


class _PacketIdAck(Packet, gc=False, kw_only=True):
    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


class Puback(_PacketIdAck, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PUBACK


class Pubrec(_PacketIdAck, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PUBREC


class Pubrel(_PacketIdAck, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PUBREL


class Pubcomp(_PacketIdAck, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PUBCOMP


class Subscription(msgspec.Struct, gc=False, frozen=True):
    """One topic filter of SUBSCRIBE; ``options`` is the raw options byte."""

    topic_filter: str
    options: int = 0

    @property
    def qos(self) -> int:
        return self.options & 0x03


class Subscribe(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = SUBSCRIBE

    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties | None = None


class Suback(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = SUBACK

    packet_id: int
    reason_codes: list[int]
    properties: Properties | None = None


class Unsubscribe(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = UNSUBSCRIBE

    packet_id: int
    topic_filters: list[str]
    properties: Properties | None = None


class Unsuback(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = UNSUBACK

    packet_id: int
    reason_codes: list[int] = []  # MQTT 5 only; empty for 3.1.1
    properties: Properties | None = None


class Pingreq(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PINGREQ


class Pingresp(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = PINGRESP


class Disconnect(Packet, gc=False, kw_only=True):
    TYPE: ClassVar[int] = DISCONNECT

    reason_code: int = 0  # MQTT 5 only
    properties: Properties | None = None


class Auth(Packet, gc=False, kw_only=True):
    """MQTT 5 only."""

    TYPE: ClassVar[int] = AUTH

    reason_code: int = 0
    properties: Properties | None = None


AnyPacket = (
    Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback
    | Unsubscribe | Unsuback | Pingreq | Pingresp | Disconnect | Auth
)

# Reason codes a peer may put on packets we decode (MQTT 5.0, section 2.4).
PUBACK_REASONS = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
PUBREL_REASONS = frozenset({0x00, 0x92})
AUTH_REASONS = frozenset({0x00, 0x18, 0x19})
DISCONNECT_REASONS = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
     0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)
