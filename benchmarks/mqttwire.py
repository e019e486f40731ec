"""Minimal client-side MQTT 3.1.1 / 5.0 wire codec for the load generator.

Only what a publishing client needs: CONNECT, PUBLISH, PINGREQ, DISCONNECT out;
CONNACK, PUBACK, PINGRESP, DISCONNECT in. No properties are sent. The bench
payload is a fixed binary header (magic, run id, client index, sequence number,
send time in ns since the epoch) padded with zeros to the payload size.
"""

from __future__ import annotations

import struct

MQTT311 = 4
MQTT5 = 5

CONNACK = 2
PUBLISH = 3
PUBACK = 4
PINGRESP = 13
DISCONNECT = 14

PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"

PAYLOAD_MAGIC = b"LMB1"
PAYLOAD_HEADER = struct.Struct(">4sIIQQ")  # magic, run_id, client, seq, send_ns
PAYLOAD_HEADER_SIZE = PAYLOAD_HEADER.size  # 28
_pack_header = PAYLOAD_HEADER.pack


class ProtocolError(Exception):
    """The server sent something a publishing client cannot accept."""


def encode_varint(n: int) -> bytes:
    """MQTT variable byte integer (remaining length, property lengths)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def encode_connect(client_id: str, version: int = MQTT311, keepalive: int = 60,
                   username: str = "", password: str = "") -> bytes:
    """CONNECT with clean session/start, no will, no properties; credentials when given."""
    flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)
    var = _utf8(b"MQTT") + bytes([version, flags]) + keepalive.to_bytes(2, "big")
    if version == MQTT5:
        var += b"\x00"  # property length
    body = var + _utf8(client_id)
    if username:
        body += _utf8(username)
    if password:
        body += _utf8(password)
    return b"\x10" + encode_varint(len(body)) + body


def publish_prefix(topic: str, qos: int, payload_size: int, version: int = MQTT311) -> bytes:
    """Fixed header + topic of a PUBLISH; the packet id (QoS > 0), the v5
    property length and the payload follow."""
    t = _utf8(topic)
    rest = len(t) + (2 if qos else 0) + (1 if version == MQTT5 else 0) + payload_size
    return bytes([0x30 | (qos << 1)]) + encode_varint(rest) + t


def make_payload(run_id: int, client: int, seq: int, send_ns: int, size: int) -> bytes:
    head = _pack_header(PAYLOAD_MAGIC, run_id, client, seq, send_ns)
    return head + bytes(size - PAYLOAD_HEADER_SIZE) if size > PAYLOAD_HEADER_SIZE else head


def decode_payload(payload: bytes) -> tuple[int, int, int, int] | None:
    """(run_id, client, seq, send_ns) of a bench payload, or None if foreign."""
    if len(payload) < PAYLOAD_HEADER_SIZE or payload[:4] != PAYLOAD_MAGIC:
        return None
    _, run_id, client, seq, send_ns = PAYLOAD_HEADER.unpack_from(payload)
    return run_id, client, seq, send_ns


class PublishEncoder:
    """Builds PUBLISH packets for one client; the constant part is precomputed."""

    __slots__ = ("client", "padding", "pfx", "props", "qos", "run_id")

    def __init__(
        self, topic: str, qos: int, payload_size: int, version: int, run_id: int, client: int
    ) -> None:
        size = max(payload_size, PAYLOAD_HEADER_SIZE)
        self.pfx = publish_prefix(topic, qos, size, version)
        self.props = b"\x00" if version == MQTT5 else b""
        self.padding = bytes(size - PAYLOAD_HEADER_SIZE)
        self.qos = qos
        self.run_id = run_id
        self.client = client

    def encode(self, pid: int, seq: int, send_ns: int) -> bytes:
        head = _pack_header(PAYLOAD_MAGIC, self.run_id, self.client, seq, send_ns)
        if self.qos:
            return b"".join((self.pfx, pid.to_bytes(2, "big"), self.props, head, self.padding))
        return b"".join((self.pfx, self.props, head, self.padding))


def parse_packets(buf: bytearray) -> tuple[list[tuple[int, int, bytes]], int]:
    """Split complete packets off the front of buf.

    Returns ([(type, flags, body), ...], consumed bytes). Incomplete trailing
    data is left for the next call.
    """
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    n = len(buf)
    while pos + 2 <= n:
        first = buf[pos]
        length = 0
        mult = 1
        i = pos + 1
        while True:
            if i >= n:
                return out, pos
            b = buf[i]
            length += (b & 0x7F) * mult
            i += 1
            if not b & 0x80:
                break
            mult <<= 7
            if mult > 128**3:
                raise ProtocolError("malformed remaining length")
        end = i + length
        if end > n:
            break
        out.append((first >> 4, first & 0x0F, bytes(buf[i:end])))
        pos = end
    return out, pos


def connack_result(body: bytes, version: int) -> int:
    """The CONNACK return / reason code (0 = accepted)."""
    if len(body) < 2:
        raise ProtocolError("short CONNACK")
    return body[1]


def puback_result(body: bytes) -> tuple[int, int]:
    """(packet id, reason code); reason 0 when omitted (3.1.1 and short v5)."""
    if len(body) < 2:
        raise ProtocolError("short PUBACK")
    pid = (body[0] << 8) | body[1]
    return pid, body[2] if len(body) > 2 else 0
