"""Sans-IO MQTT decoder: bytes in, packets out.  No asyncio, sockets or clocks.

``decode_packets(buffer, version, max_packet_size)`` parses every complete
packet in ``buffer`` in one pass and returns them with the number of bytes
consumed; the caller keeps ``buffer[consumed:]`` (a partial packet) for the next
chunk.  The maximum packet size is checked as soon as the fixed header is
complete, before the body is waited for, so a hostile length cannot make the
caller buffer 256 MB.

Errors: ``MalformedPacket`` (cannot be parsed), ``ProtocolError`` (parsed but
forbidden), ``PacketTooLarge``; ``UnsupportedProtocolVersion`` carries the
level a CONNECT asked for so the session can answer in the right dialect.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gateway.errors import MalformedPacket, PacketTooLarge, ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.encode import encode
from gateway.protocols.mqtt.properties import WILL, Properties, read_properties
from gateway.protocols.mqtt.wire import decode_utf8, read_binary, read_str, read_u16

__all__ = [
    "ProtocolViolation",
    "TopicNameInvalid",
    "UnknownProtocolName",
    "UnsupportedProtocolVersion",
    "decode_packets",
    "encode",
]


class UnsupportedProtocolVersion(ProtocolError):
    """The CONNECT asks for a protocol level this server does not speak."""

    code = "unsupported_protocol_version"
    mqtt_reason = 0x84

    def __init__(self, level: int) -> None:
        super().__init__(f"unsupported protocol level {level}")
        self.level = level


class UnknownProtocolName(ProtocolError):
    """The CONNECT names another protocol; ``level`` is the byte where the level would be."""

    code = "unknown_protocol_name"
    mqtt_reason = 0x84

    def __init__(self, name: str, level: int) -> None:
        super().__init__(f"unknown protocol name {name!r}")
        self.level = level


class ProtocolViolation(ProtocolError):
    """A protocol error with its own MQTT 5 reason code (0x93, 0x94, 0x99 ...)."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.mqtt_reason = reason


class TopicNameInvalid(ProtocolError):
    """A topic name holds a wildcard (or is otherwise unusable)."""

    code = "topic_invalid"
    mqtt_reason = 0x90


# Fixed-header flags each packet type must carry (PUBLISH is checked apart).
_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0, 15: 0}

Decoder = Callable[[memoryview, int, int, int], p.AnyPacket]


def decode_packets(
    buffer: bytes | bytearray | memoryview, version: int, max_packet_size: int
) -> tuple[list[p.AnyPacket], int]:
    """Decode all complete packets; return them and the bytes consumed.

    ``version`` is 0 until CONNECT has been seen: then only one CONNECT is
    decoded (the level of what follows is unknown until the session accepts it).
    """
    out: list[p.AnyPacket] = []
    with memoryview(buffer) as mv:
        size = len(mv)
        pos = 0
        while pos < size:
            first = mv[pos]
            # Remaining length, at most 4 bytes; wait if it is not all here.
            i = pos + 1
            length = 0
            shift = 0
            while True:
                if i >= size:
                    return out, pos
                byte = mv[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    if not byte and shift:  # [MQTT-1.5.5-1] a trailing 0x00 is not minimal
                        raise MalformedPacket("remaining length not in its minimum bytes")
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            end = i + length
            if end - pos > max_packet_size:
                raise PacketTooLarge(f"packet of {end - pos} bytes exceeds {max_packet_size}")
            if end > size:
                return out, pos
            ptype = first >> 4
            if version == 0 and ptype != p.CONNECT:
                raise ProtocolError("the first packet must be CONNECT")
            try:
                if ptype == p.PUBLISH:
                    out.append(_publish(mv, first, i, end, version))
                else:
                    if _FLAGS.get(ptype) != first & 0x0F or (ptype == p.AUTH and version != 5):
                        raise MalformedPacket(f"invalid fixed header 0x{first:02X}")
                    out.append(_DECODERS[ptype](mv, i, end, version))
            except (IndexError, ValueError, struct.error) as exc:  # pragma: no cover - net
                raise MalformedPacket(f"cannot parse packet type {ptype}: {exc}") from exc
            pos = end
            if version == 0:
                break
        return out, pos


def _publish(mv: memoryview, flags: int, pos: int, end: int, version: int) -> p.Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(flags & 8)
    if dup and not qos:
        raise MalformedPacket("PUBLISH QoS 0 with DUP set")
    if pos + 2 > end:
        raise MalformedPacket("truncated PUBLISH")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise MalformedPacket("topic runs past the packet")
    topic = decode_utf8(mv[pos + 2 : stop])
    if "+" in topic or "#" in topic:
        raise TopicNameInvalid("topic name contains a wildcard")
    pos = stop
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("truncated PUBLISH packet identifier")
        packet_id = (mv[pos] << 8) | mv[pos + 1]
        if not packet_id:
            raise MalformedPacket("packet identifier 0")
        pos += 2
    props = None
    if version == 5:
        props, pos = read_properties(mv, pos, end, p.PUBLISH)
    elif not topic:
        raise MalformedPacket("empty topic name")
    return p.Publish(
        topic=topic, payload=bytes(mv[pos:end]), qos=qos, retain=bool(flags & 1), dup=dup,
        packet_id=packet_id, properties=props,
    )


def connect_level(buffer: bytes | bytearray | memoryview) -> int:
    """The protocol level a (possibly broken) CONNECT at the start of ``buffer`` asks for.

    0 when it cannot be told: the session then closes without a CONNACK, since
    it does not know which dialect the client would understand.
    """
    if len(buffer) < 2 or buffer[0] >> 4 != p.CONNECT:
        return 0
    i = 1
    while i < min(len(buffer), 5) and buffer[i] & 0x80:
        i += 1
    start = i + 1
    if bytes(buffer[start : start + 6]) != b"\x00\x04MQTT" or len(buffer) <= start + 6:
        return 0
    return int(buffer[start + 6])


def _connect(mv: memoryview, pos: int, end: int, version: int) -> p.Connect:
    name, pos = read_str(mv, pos, end)
    if pos >= end:
        raise MalformedPacket("truncated CONNECT")
    level = mv[pos]
    if name == "MQIsdp" or (name == "MQTT" and level not in (4, 5)):
        raise UnsupportedProtocolVersion(level)
    if name != "MQTT":
        raise UnknownProtocolName(name, level)
    if pos + 4 > end:
        raise MalformedPacket("truncated CONNECT")
    flags = mv[pos + 1]
    keep_alive = (mv[pos + 2] << 8) | mv[pos + 3]
    pos += 4
    will_flag, will_qos = flags & 0x04, (flags >> 3) & 3
    if flags & 0x01 or will_qos == 3 or (not will_flag and flags & 0x38):
        raise MalformedPacket(f"invalid CONNECT flags 0x{flags:02X}")
    if level == 4 and flags & 0x40 and not flags & 0x80:
        raise MalformedPacket("password without user name")
    props = None
    if level == 5:
        props, pos = read_properties(mv, pos, end, p.CONNECT)
    client_id, pos = read_str(mv, pos, end)
    will = None
    if will_flag:
        will_props = None
        if level == 5:
            will_props, pos = read_properties(mv, pos, end, WILL)
        topic, pos = read_str(mv, pos, end)
        if not topic or "+" in topic or "#" in topic:
            raise TopicNameInvalid("invalid will topic")
        payload, pos = read_binary(mv, pos, end)
        will = p.Will(topic=topic, payload=payload, qos=will_qos, retain=bool(flags & 0x20),
                      properties=will_props)
    username = password = None
    if flags & 0x80:
        username, pos = read_str(mv, pos, end)
    if flags & 0x40:
        password, pos = read_binary(mv, pos, end)
    _expect_end(pos, end)
    return p.Connect(
        protocol_level=level, protocol_name=name, clean_start=bool(flags & 0x02),
        keep_alive=keep_alive, client_id=client_id, will=will, username=username,
        password=password, properties=props,
    )


def _connack(mv: memoryview, pos: int, end: int, version: int) -> p.Connack:
    if pos + 2 > end or mv[pos] & 0xFE:
        raise MalformedPacket("invalid CONNACK")
    present, code = bool(mv[pos] & 1), mv[pos + 1]
    props = None
    if version == 5:
        props, pos = read_properties(mv, pos + 2, end, p.CONNACK)
    else:
        pos += 2
    _expect_end(pos, end)
    return p.Connack(session_present=present, reason_code=code, properties=props)


def _packet_id(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    packet_id, pos = read_u16(mv, pos, end)
    if not packet_id:
        raise MalformedPacket("packet identifier 0")
    return packet_id, pos


def _ack(cls: type[p.Puback | p.Pubrec | p.Pubrel | p.Pubcomp], allowed: frozenset[int]) -> Decoder:
    def decode(mv: memoryview, pos: int, end: int, version: int) -> p.AnyPacket:
        packet_id, pos = _packet_id(mv, pos, end)
        code, props = _reason_and_props(mv, pos, end, version, cls.TYPE, allowed)
        return cls(packet_id=packet_id, reason_code=code, properties=props)

    return decode


def _reason_and_props(
    mv: memoryview, pos: int, end: int, version: int, ptype: int, allowed: frozenset[int]
) -> tuple[int, Properties | None]:
    """The optional reason code and properties that end acks, DISCONNECT and AUTH (v5)."""
    if version != 5:
        _expect_end(pos, end)
        return 0, None
    if pos == end:
        return 0, None
    code = mv[pos]
    if code not in allowed:
        raise MalformedPacket(f"reason code 0x{code:02X} not valid for packet type {ptype}")
    if pos + 1 == end:
        return code, None
    props, pos = read_properties(mv, pos + 1, end, ptype)
    _expect_end(pos, end)
    return code, props


def _subscribe(mv: memoryview, pos: int, end: int, version: int) -> p.Subscribe:
    packet_id, pos = _packet_id(mv, pos, end)
    props = None
    if version == 5:
        props, pos = read_properties(mv, pos, end, p.SUBSCRIBE)
    subs = []
    while pos < end:
        topic_filter, pos = read_str(mv, pos, end)
        if pos >= end:
            raise MalformedPacket("missing subscription options")
        options = mv[pos]
        pos += 1
        reserved = 0xC0 if version == 5 else 0xFC
        if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
            raise MalformedPacket(f"invalid subscription options 0x{options:02X}")
        subs.append(p.Subscription(topic_filter, options))
    if not subs:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return p.Subscribe(packet_id=packet_id, subscriptions=subs, properties=props)


def _suback(mv: memoryview, pos: int, end: int, version: int) -> p.Suback:
    packet_id, pos = _packet_id(mv, pos, end)
    props = None
    if version == 5:
        props, pos = read_properties(mv, pos, end, p.SUBACK)
    return p.Suback(packet_id=packet_id, reason_codes=list(mv[pos:end]), properties=props)


def _unsubscribe(mv: memoryview, pos: int, end: int, version: int) -> p.Unsubscribe:
    packet_id, pos = _packet_id(mv, pos, end)
    props = None
    if version == 5:
        props, pos = read_properties(mv, pos, end, p.UNSUBSCRIBE)
    filters = []
    while pos < end:
        topic_filter, pos = read_str(mv, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return p.Unsubscribe(packet_id=packet_id, topic_filters=filters, properties=props)


def _unsuback(mv: memoryview, pos: int, end: int, version: int) -> p.Unsuback:
    packet_id, pos = _packet_id(mv, pos, end)
    if version != 5:
        _expect_end(pos, end)
        return p.Unsuback(packet_id=packet_id)
    props, pos = read_properties(mv, pos, end, p.UNSUBACK)
    return p.Unsuback(packet_id=packet_id, reason_codes=list(mv[pos:end]), properties=props)


def _empty(cls: type[p.Pingreq | p.Pingresp]) -> Decoder:
    def decode(mv: memoryview, pos: int, end: int, version: int) -> p.AnyPacket:
        _expect_end(pos, end)
        return cls()

    return decode


def _disconnect(mv: memoryview, pos: int, end: int, version: int) -> p.Disconnect:
    code, props = _reason_and_props(mv, pos, end, version, p.DISCONNECT, p.DISCONNECT_REASONS)
    return p.Disconnect(reason_code=code, properties=props)


def _auth(mv: memoryview, pos: int, end: int, version: int) -> p.Auth:
    code, props = _reason_and_props(mv, pos, end, version, p.AUTH, p.AUTH_REASONS)
    return p.Auth(reason_code=code, properties=props)


def _expect_end(pos: int, end: int) -> None:
    if pos != end:
        raise MalformedPacket(f"{end - pos} unexpected bytes at the end of the packet")


_DECODERS: dict[int, Decoder] = {
    p.CONNECT: _connect,
    p.CONNACK: _connack,
    p.PUBACK: _ack(p.Puback, p.PUBACK_REASONS),
    p.PUBREC: _ack(p.Pubrec, p.PUBACK_REASONS),
    p.PUBREL: _ack(p.Pubrel, p.PUBREL_REASONS),
    p.PUBCOMP: _ack(p.Pubcomp, p.PUBREL_REASONS),
    p.SUBSCRIBE: _subscribe,
    p.SUBACK: _suback,
    p.UNSUBSCRIBE: _unsubscribe,
    p.UNSUBACK: _unsuback,
    p.PINGREQ: _empty(p.Pingreq),
    p.PINGRESP: _empty(p.Pingresp),
    p.DISCONNECT: _disconnect,
    p.AUTH: _auth,
}
