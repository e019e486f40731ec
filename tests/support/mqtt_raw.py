"""A tiny MQTT 3.1.1 client on a real asyncio socket, to see the exact ack bytes in order."""

from __future__ import annotations

import asyncio
import struct


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def connect(client_id: str) -> bytes:
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _str(client_id)
    return b"\x10" + _remaining(len(body)) + body


def publish(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = _str(topic) + struct.pack(">H", packet_id) + payload
    return bytes([0x30 | qos << 1]) + _remaining(len(body)) + body


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + struct.pack(">H", packet_id)


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, client_id: str) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(connect(client_id))
        kind, body = await client.packet(10)
        assert kind == 0x20 and body[1] == 0, f"CONNACK refused: {body!r}"
        return client

    async def packet(self, timeout: float) -> tuple[int, bytes]:
        """The next packet: (first byte, body)."""
        head = await asyncio.wait_for(self.reader.readexactly(1), timeout)
        n = shift = 0
        while True:
            byte = (await asyncio.wait_for(self.reader.readexactly(1), timeout))[0]
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = await asyncio.wait_for(self.reader.readexactly(n), timeout) if n else b""
        return head[0], body

    async def nothing_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.writer.close()
