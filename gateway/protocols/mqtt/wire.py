"""MQTT data representations (section 1.5 of both specs): readers and writers.

Readers take ``(view, pos, end)`` and return ``(value, new_pos)``; ``end`` is
the end of the current packet, never of the buffer, so a lying length field
cannot read into the next packet.  Every failure is a ``MalformedPacket``.
"""

from __future__ import annotations

from gateway.errors import MalformedPacket

MAX_VARINT = 268_435_455  # 4 bytes of 7 bits


def read_u16(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated two byte integer")
    return (mv[pos] << 8) | mv[pos + 1], pos + 2


def read_u32(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise MalformedPacket("truncated four byte integer")
    return int.from_bytes(mv[pos : pos + 4], "big"), pos + 4


def read_byte(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise MalformedPacket("truncated byte")
    return mv[pos], pos + 1


def read_varint(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise MalformedPacket("truncated variable byte integer")
        byte = mv[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if not byte and shift:  # [MQTT-1.5.5-1]
                raise MalformedPacket("variable byte integer not in its minimum bytes")
            return value, pos
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def read_binary(mv: memoryview, pos: int, end: int) -> tuple[bytes, int]:
    length, pos = read_u16(mv, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("binary data runs past the packet")
    return bytes(mv[pos:stop]), stop


def read_str(mv: memoryview, pos: int, end: int) -> tuple[str, int]:
    length, pos = read_u16(mv, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("string runs past the packet")
    return decode_utf8(mv[pos:stop]), stop


def decode_utf8(data: memoryview | bytes) -> str:
    """Strict UTF-8: Python's codec already refuses surrogates and overlong forms."""
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket("string is not well-formed UTF-8") from exc
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")
    return text


def is_utf8(data: bytes) -> bool:
    """For payloads whose format indicator says UTF-8 (U+0000 is allowed there)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value > MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data
