"""Sans-IO MQTT encoder: ``encode(packet, version) -> bytes``.

The server mostly encodes small acks, so clarity wins here except for
PUBLISH (the downlink path later), which builds its bytes in one join.
Encoding refuses what decoding would refuse (QoS 0 with DUP, packet id 0), so
the codec never emits a packet it would reject itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.properties import encode_properties
from gateway.protocols.mqtt.wire import binary, u16, utf8, varint


def encode(packet: p.AnyPacket, version: int) -> bytes:
    """Bytes of ``packet`` for protocol level ``version`` (4 or 5)."""
    if isinstance(packet, p.Publish):
        return _publish(packet, version)
    first, body = _ENCODERS[packet.TYPE](packet, version)
    return bytes((first,)) + varint(len(body)) + body


def _publish(pk: p.Publish, version: int) -> bytes:
    if pk.qos not in (0, 1, 2) or (pk.dup and not pk.qos) or (pk.qos and not pk.packet_id):
        raise ValueError("invalid PUBLISH flags or packet identifier")
    first = 0x30 | (pk.qos << 1) | (0x08 if pk.dup else 0) | (0x01 if pk.retain else 0)
    parts = [utf8(pk.topic)]
    if pk.qos:
        parts.append(u16(pk.packet_id))
    if version == 5:
        parts.append(encode_properties(pk.properties))
    parts.append(pk.payload)
    length = sum(map(len, parts))
    return b"".join([bytes((first,)), varint(length), *parts])


def _props(props: Any, version: int) -> bytes:
    return encode_properties(props) if version == 5 else b""


def _connect(pk: p.Connect, version: int) -> tuple[int, bytes]:
    flags = 0x02 if pk.clean_start else 0
    will = pk.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if pk.username is not None:
        flags |= 0x80
    if pk.password is not None:
        flags |= 0x40
    level = pk.protocol_level
    body = utf8(pk.protocol_name) + bytes((level, flags)) + u16(pk.keep_alive)
    body += _props(pk.properties, level) + utf8(pk.client_id)
    if will is not None:
        body += _props(will.properties, level) + utf8(will.topic) + binary(will.payload)
    if pk.username is not None:
        body += utf8(pk.username)
    if pk.password is not None:
        body += binary(pk.password)
    return 0x10, body


def _connack(pk: p.Connack, version: int) -> tuple[int, bytes]:
    return 0x20, bytes((int(pk.session_present), pk.reason_code)) + _props(pk.properties, version)


def _ack(pk: p.Puback | p.Pubrec | p.Pubrel | p.Pubcomp, version: int) -> tuple[int, bytes]:
    first = 0x62 if pk.TYPE == p.PUBREL else pk.TYPE << 4
    if not pk.packet_id:
        raise ValueError("packet identifier 0")
    body = u16(pk.packet_id)
    # MQTT 5 lets the common case (success, no properties) stay 2 bytes long.
    if version == 5 and (pk.reason_code or pk.properties is not None):
        body += bytes((pk.reason_code,))
        if pk.properties is not None:
            body += encode_properties(pk.properties)
    return first, body


def _subscribe(pk: p.Subscribe, version: int) -> tuple[int, bytes]:
    body = u16(pk.packet_id) + _props(pk.properties, version)
    for sub in pk.subscriptions:
        body += utf8(sub.topic_filter) + bytes((sub.options,))
    return 0x82, body


def _suback(pk: p.Suback, version: int) -> tuple[int, bytes]:
    return 0x90, u16(pk.packet_id) + _props(pk.properties, version) + bytes(pk.reason_codes)


def _unsubscribe(pk: p.Unsubscribe, version: int) -> tuple[int, bytes]:
    body = u16(pk.packet_id) + _props(pk.properties, version)
    return 0xA2, body + b"".join(utf8(f) for f in pk.topic_filters)


def _unsuback(pk: p.Unsuback, version: int) -> tuple[int, bytes]:
    body = u16(pk.packet_id)
    if version == 5:
        body += encode_properties(pk.properties) + bytes(pk.reason_codes)
    return 0xB0, body


def _reason_only(first: int) -> Callable[[Any, int], tuple[int, bytes]]:
    """DISCONNECT and AUTH: empty in 3.1.1; in 5.0 shortest form that says the same."""

    def enc(pk: p.Disconnect | p.Auth, version: int) -> tuple[int, bytes]:
        if version != 5 or (not pk.reason_code and pk.properties is None):
            return first, b""
        body = bytes((pk.reason_code,))
        if pk.properties is not None:
            body += encode_properties(pk.properties)
        return first, body

    return enc


def _empty(first: int) -> Callable[[Any, int], tuple[int, bytes]]:
    return lambda pk, version: (first, b"")


_ENCODERS: dict[int, Callable[[Any, int], tuple[int, bytes]]] = {
    p.CONNECT: _connect,
    p.CONNACK: _connack,
    p.PUBACK: _ack,
    p.PUBREC: _ack,
    p.PUBREL: _ack,
    p.PUBCOMP: _ack,
    p.SUBSCRIBE: _subscribe,
    p.SUBACK: _suback,
    p.UNSUBSCRIBE: _unsubscribe,
    p.UNSUBACK: _unsuback,
    p.PINGREQ: _empty(0xC0),
    p.PINGRESP: _empty(0xD0),
    p.DISCONNECT: _reason_only(0xE0),
    p.AUTH: _reason_only(0xF0),
}
