"""SUBSCRIBE / UNSUBSCRIBE in, SUBACK / UNSUBACK out, for 3.1.1 and 5.0 (sans-IO).

``codec.decode_packets`` already parses the bytes (options byte, reserved bits,
properties allowed per packet type); this module adds what the spec says on
top of the parse and what a server needs to answer:

- the options byte as ``Options`` (QoS, no local, retain as published,
  retain handling) and the subscription identifier (at most one, 3.8.2.1.2);
- No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4];
- SUBACK / UNSUBACK with reason codes legal for the version (3.1.1 knows
  only 0x00-0x02 and 0x80 in SUBACK and none in UNSUBACK), one per filter,
  and the reason string and user properties left out when the packet would
  exceed the client's Maximum Packet Size (3.9.2.1.2).

Not wired into the session yet: SUBSCRIBE is still refused on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from gateway.errors import MalformedPacket, ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.properties import Properties

SUBACK_REASONS_311 = frozenset({0x00, 0x01, 0x02, 0x80})
SUBACK_REASONS_5 = frozenset(
    {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
)
UNSUBACK_REASONS_5 = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
MAX_SUBSCRIPTION_ID = 268_435_455
SHARE = "$share/"


class Options(NamedTuple):
    """MQTT 5 subscription options (3.8.3.1); 3.1.1 has only ``qos``."""

    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0  # 0 send retained, 1 only if new, 2 never

    @classmethod
    def from_byte(cls, options: int) -> Options:
        """The options byte as decoded (the codec has refused reserved bits already)."""
        return cls(options & 0x03, bool(options & 0x04), bool(options & 0x08),
                   (options >> 4) & 0x03)

    def to_byte(self) -> int:
        return (self.qos | (0x04 if self.no_local else 0) | (0x08 if self.retain_as_published
                else 0) | (self.retain_handling << 4))


class SubscribeRequest(NamedTuple):
    packet_id: int
    entries: tuple[tuple[str, Options], ...]  # (topic filter, options), in packet order
    identifier: int | None  # MQTT 5 subscription identifier, for every entry
    user_properties: tuple[tuple[str, str], ...]


class UnsubscribeRequest(NamedTuple):
    packet_id: int
    filters: tuple[str, ...]
    user_properties: tuple[tuple[str, str], ...]


def read_subscribe(pk: p.Subscribe, version: int) -> SubscribeRequest:
    """The checks the parse leaves to the server; ProtocolError when one fails."""
    identifier = None
    user: tuple[tuple[str, str], ...] = ()
    if pk.properties is not None:
        ids = pk.properties.subscription_identifiers
        if len(ids) > 1:
            raise ProtocolError("SUBSCRIBE carries more than one subscription identifier")
        identifier = ids[0] if ids else None
        user = tuple(pk.properties.user_properties)
    entries = []
    for sub in pk.subscriptions:
        options = Options.from_byte(sub.options)
        if version == p.MQTT5 and options.no_local and sub.topic_filter.startswith(SHARE):
            raise ProtocolError(
                f"No Local on shared subscription {sub.topic_filter!r} [MQTT-3.8.3-4]"
            )
        entries.append((sub.topic_filter, options))
    return SubscribeRequest(pk.packet_id, tuple(entries), identifier, user)


def read_unsubscribe(pk: p.Unsubscribe) -> UnsubscribeRequest:
    user = tuple(pk.properties.user_properties) if pk.properties is not None else ()
    return UnsubscribeRequest(pk.packet_id, tuple(pk.topic_filters), user)


def _one(data: bytes, version: int, max_packet_size: int) -> p.AnyPacket:
    packets, used = decode_packets(data, version, max_packet_size)
    if len(packets) != 1 or used != len(data):
        raise MalformedPacket("expected exactly one complete packet")
    return packets[0]


def decode_subscribe(
    data: bytes, version: int, max_packet_size: int = 1 << 28
) -> SubscribeRequest:
    """One SUBSCRIBE packet's bytes -> the request (MalformedPacket / ProtocolError)."""
    pk = _one(data, version, max_packet_size)
    if not isinstance(pk, p.Subscribe):
        raise ProtocolError(f"expected SUBSCRIBE, got packet type {pk.TYPE}")
    return read_subscribe(pk, version)


def decode_unsubscribe(
    data: bytes, version: int, max_packet_size: int = 1 << 28
) -> UnsubscribeRequest:
    pk = _one(data, version, max_packet_size)
    if not isinstance(pk, p.Unsubscribe):
        raise ProtocolError(f"expected UNSUBSCRIBE, got packet type {pk.TYPE}")
    return read_unsubscribe(pk)


def suback_code(code: int, version: int) -> int:
    """A v5 reason code as the client's version says it: 3.1.1 has one failure, 0x80."""
    if code not in SUBACK_REASONS_5:
        raise ValueError(f"0x{code:02X} is not a SUBACK reason code")
    return code if version == p.MQTT5 or code < 0x80 else 0x80


def _properties(reason: str | None, user: Sequence[tuple[str, str]]) -> Properties | None:
    if reason is None and not user:
        return None
    return Properties(reason_string=reason, user_properties=list(user))


def _fit(full: p.Suback | p.Unsuback, version: int, max_size: int | None) -> bytes:
    data = encode(full, version)
    if max_size is not None and len(data) > max_size and full.properties is not None:
        full.properties = None  # the reason string and user properties are optional
        data = encode(full, version)
    return data


def encode_suback(
    packet_id: int, codes: Sequence[int], version: int, *, reason_string: str | None = None,
    user_properties: Sequence[tuple[str, str]] = (), max_packet_size: int | None = None,
) -> bytes:
    """SUBACK bytes; ``codes`` (one per filter, in order) are v5 codes, mapped for 3.1.1."""
    if not codes:
        raise ValueError("SUBACK needs one reason code per topic filter")
    if not packet_id:
        raise ValueError("packet identifier 0")
    mapped = [suback_code(c, version) for c in codes]
    props = _properties(reason_string, user_properties) if version == p.MQTT5 else None
    return _fit(p.Suback(packet_id=packet_id, reason_codes=mapped, properties=props),
                version, max_packet_size)


def encode_unsuback(
    packet_id: int, codes: Sequence[int], version: int, *, reason_string: str | None = None,
    user_properties: Sequence[tuple[str, str]] = (), max_packet_size: int | None = None,
) -> bytes:
    """UNSUBACK bytes; ``codes`` (one per filter) are sent in 5.0 only (3.1.1 has none)."""
    if not codes:
        raise ValueError("UNSUBACK needs one reason code per topic filter")
    if not packet_id:
        raise ValueError("packet identifier 0")
    bad = [c for c in codes if c not in UNSUBACK_REASONS_5]
    if bad:
        raise ValueError(f"0x{bad[0]:02X} is not an UNSUBACK reason code")
    if version != p.MQTT5:
        return encode(p.Unsuback(packet_id=packet_id), version)
    props = _properties(reason_string, user_properties)
    return _fit(p.Unsuback(packet_id=packet_id, reason_codes=list(codes), properties=props),
                version, max_packet_size)


def check_suback(pk: p.Suback, version: int, filters: int) -> None:
    """A SUBACK as a client checks it (tests, the bridge): codes legal and one per filter."""
    allowed = SUBACK_REASONS_5 if version == p.MQTT5 else SUBACK_REASONS_311
    bad = [c for c in pk.reason_codes if c not in allowed]
    if bad:
        raise MalformedPacket(f"0x{bad[0]:02X} is not a SUBACK reason code")
    if len(pk.reason_codes) != filters:
        raise ProtocolError(f"SUBACK has {len(pk.reason_codes)} codes for {filters} filters")
