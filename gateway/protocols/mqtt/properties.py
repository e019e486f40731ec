"""MQTT 5 properties (section 2.2.2): one struct, a table, and their codec.

The table maps each property identifier to its field, its data type and the
packets that may carry it, so decoding, encoding and the "is this property
allowed here" check all read the same data.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import MalformedPacket, ProtocolError
from gateway.protocols.mqtt import wire

BYTE, U16, U32, VARINT, STR, BIN, PAIR = range(7)

# Pseudo packet type for the will properties inside CONNECT (0 is reserved).
WILL = 0
_ALL = frozenset(range(1, 16)) | {WILL}
_MSG = frozenset({3, WILL})  # PUBLISH and will
_ACKS = frozenset({2, 4, 5, 6, 7, 9, 11, 14, 15})  # packets that may carry a reason string

# id: (field, data type, packets allowed to carry it)
TABLE: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, _MSG),
    0x02: ("message_expiry_interval", U32, _MSG),
    0x03: ("content_type", STR, _MSG),
    0x08: ("response_topic", STR, _MSG),
    0x09: ("correlation_data", BIN, _MSG),
    0x0B: ("subscription_identifiers", VARINT, frozenset({3, 8})),
    0x11: ("session_expiry_interval", U32, frozenset({1, 2, 14})),
    0x12: ("assigned_client_identifier", STR, frozenset({2})),
    0x13: ("server_keep_alive", U16, frozenset({2})),
    0x15: ("authentication_method", STR, frozenset({1, 2, 15})),
    0x16: ("authentication_data", BIN, frozenset({1, 2, 15})),
    0x17: ("request_problem_information", BYTE, frozenset({1})),
    0x18: ("will_delay_interval", U32, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({1})),
    0x1A: ("response_information", STR, frozenset({2})),
    0x1C: ("server_reference", STR, frozenset({2, 14})),
    0x1F: ("reason_string", STR, _ACKS),
    0x21: ("receive_maximum", U16, frozenset({1, 2})),
    0x22: ("topic_alias_maximum", U16, frozenset({1, 2})),
    0x23: ("topic_alias", U16, frozenset({3})),
    0x24: ("maximum_qos", BYTE, frozenset({2})),
    0x25: ("retain_available", BYTE, frozenset({2})),
    0x26: ("user_properties", PAIR, _ALL),
    0x27: ("maximum_packet_size", U32, frozenset({1, 2})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({2})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({2})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({2})),
}
# Byte properties whose only legal values are 0 and 1.
_BOOLEAN = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
# Properties for which 0 is a protocol error.
_NON_ZERO = frozenset({0x0B, 0x21, 0x27})
_REPEATABLE = frozenset({0x0B, 0x26})


class Properties(
    msgspec.Struct, gc=False, kw_only=True, omit_defaults=True, repr_omit_defaults=True
):
    """Every MQTT 5 property; ``None`` (or empty) means absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: list[int] = []
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: list[tuple[str, str]] = []
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


EMPTY = Properties()


def read_properties(
    mv: memoryview, pos: int, end: int, packet_type: int
) -> tuple[Properties, int]:
    """Decode the property block at ``pos``; refuse properties ``packet_type`` may not carry."""
    length, pos = wire.read_varint(mv, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("properties run past the packet")
    if length == 0:
        return Properties(), stop
    values: dict[str, Any] = {}
    while pos < stop:
        ident, pos = wire.read_varint(mv, pos, stop)
        entry = TABLE.get(ident)
        if entry is None or packet_type not in entry[2]:
            raise MalformedPacket(f"property 0x{ident:02X} not allowed here")
        name, kind, _ = entry
        value, pos = _read_value(mv, pos, stop, kind)
        if (ident in _BOOLEAN and value > 1) or (ident in _NON_ZERO and value == 0):
            raise ProtocolError(f"property 0x{ident:02X} has invalid value {value!r}")
        if ident in _REPEATABLE:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise ProtocolError(f"property 0x{ident:02X} appears twice")
        else:
            values[name] = value
    return Properties(**values), stop


def _read_value(mv: memoryview, pos: int, end: int, kind: int) -> tuple[Any, int]:
    if kind == BYTE:
        return wire.read_byte(mv, pos, end)
    if kind == U16:
        return wire.read_u16(mv, pos, end)
    if kind == U32:
        return wire.read_u32(mv, pos, end)
    if kind == VARINT:
        return wire.read_varint(mv, pos, end)
    if kind == STR:
        return wire.read_str(mv, pos, end)
    if kind == BIN:
        return wire.read_binary(mv, pos, end)
    key, pos = wire.read_str(mv, pos, end)
    value, pos = wire.read_str(mv, pos, end)
    return (key, value), pos


def encode_properties(props: Properties | None) -> bytes:
    """The property block: variable byte length then each present property."""
    if props is None:
        return b"\x00"
    out = bytearray()
    for ident, (name, kind, _) in TABLE.items():
        value = getattr(props, name)
        if value is None:
            continue
        if ident in _REPEATABLE:
            for item in value:
                out += wire.varint(ident) + _encode_value(kind, item)
        else:
            out += wire.varint(ident) + _encode_value(kind, value)
    return wire.varint(len(out)) + bytes(out)


def _encode_value(kind: int, value: Any) -> bytes:
    if kind == BYTE:
        return bytes((value,))
    if kind == U16:
        return wire.u16(value)
    if kind == U32:
        return wire.u32(value)
    if kind == VARINT:
        return wire.varint(value)
    if kind == STR:
        return wire.utf8(value)
    if kind == BIN:
        return wire.binary(value)
    return wire.utf8(value[0]) + wire.utf8(value[1])
