"""The load generator's MQTT bytes agree with paho-mqtt and with the spec."""

from __future__ import annotations

import asyncio
import struct

import paho.mqtt.client as mqtt
import pytest

from benchmarks import mqttwire as w
from benchmarks.worker import Conn, WorkerState

pytestmark = pytest.mark.unit


class _FakeSock:
    def close(self) -> None:
        pass


class _FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data


def _paho_packets(version: int) -> list[bytes]:
    """CONNECT, PUBLISH QoS 1 (mid 5), PUBLISH QoS 0, as paho-mqtt encodes them."""
    proto = mqtt.MQTTv5 if version == w.MQTT5 else mqtt.MQTTv311
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lmb-1-7", protocol=proto)
    cap: list[bytes] = []
    c._packet_queue = lambda command, packet, mid, qos, info=None: cap.append(bytes(packet)) or 0
    c._sock = _FakeSock()
    try:
        c._send_connect(60)
        payload = w.make_payload(9, 7, 3, 123456789, 100)
        c._send_publish(5, b"bench/lmb-1-7/data", payload, 1)
        c._send_publish(0, b"bench/lmb-1-7/data", payload, 0)
    finally:
        c._sock = None
    return cap


@pytest.mark.parametrize("version", [w.MQTT311, w.MQTT5])
def test_connect_and_publish_match_paho(version: int) -> None:
    connect, pub1, pub0 = _paho_packets(version)
    assert w.encode_connect("lmb-1-7", version, 60) == connect
    for qos, expected in ((1, pub1), (0, pub0)):
        enc = w.PublishEncoder("bench/lmb-1-7/data", qos, 100, version, run_id=9, client=7)
        assert enc.encode(5 if qos else 0, 3, 123456789) == expected


def test_connect_311_spec_bytes() -> None:
    # MQTT 3.1.1 section 3.1: "MQTT", level 4, clean session, keepalive 60, client id "a".
    assert w.encode_connect("a", w.MQTT311, 60) == bytes.fromhex("100d00044d5154540402003c000161")


def test_publish_qos1_spec_bytes() -> None:
    enc = w.PublishEncoder("a/b", 1, 28, w.MQTT311, run_id=1, client=2)
    pkt = enc.encode(0x0102, 3, 4)
    assert pkt[:2] == bytes([0x32, 2 + 3 + 2 + 28])
    assert pkt[2:7] == b"\x00\x03a/b"
    assert pkt[7:9] == b"\x01\x02"
    assert pkt[9:] == b"LMB1" + struct.pack(">IIQQ", 1, 2, 3, 4)


@pytest.mark.parametrize("n, encoded", [(0, "00"), (127, "7f"), (128, "8001"),
                                        (16383, "ff7f"), (16384, "808001"),
                                        (268_435_455, "ffffff7f")])
def test_varint_spec_examples(n: int, encoded: str) -> None:
    assert w.encode_varint(n).hex() == encoded


def test_long_remaining_length_publish() -> None:
    enc = w.PublishEncoder("t", 0, 1000, w.MQTT311, run_id=1, client=1)
    pkt = enc.encode(0, 0, 0)
    pkts, used = w.parse_packets(bytearray(pkt))
    assert used == len(pkt) and pkts[0][0] == w.PUBLISH and len(pkts[0][2]) == 3 + 1000


def test_payload_roundtrip_and_padding() -> None:
    p = w.make_payload(42, 7, 99, 1_700_000_000_000_000_000, 100)
    assert len(p) == 100 and p[w.PAYLOAD_HEADER_SIZE:] == bytes(100 - w.PAYLOAD_HEADER_SIZE)
    assert w.decode_payload(p) == (42, 7, 99, 1_700_000_000_000_000_000)
    assert w.decode_payload(b"not a bench payload at all, no") is None
    assert len(w.make_payload(1, 1, 1, 1, 10)) == w.PAYLOAD_HEADER_SIZE


def test_parse_packets_keeps_incomplete_tail() -> None:
    data = bytearray(b"\x20\x02\x00\x00" + b"\x40\x02\x00\x01" + b"\x40\x02\x00")
    pkts, used = w.parse_packets(data)
    assert [(t, b) for t, _, b in pkts] == [(w.CONNACK, b"\x00\x00"), (w.PUBACK, b"\x00\x01")]
    assert used == 8


def test_connack_and_puback_results() -> None:
    assert w.connack_result(b"\x00\x05", w.MQTT311) == 5
    assert w.connack_result(b"\x00\x87\x00", w.MQTT5) == 0x87
    assert w.puback_result(b"\x12\x34") == (0x1234, 0)
    assert w.puback_result(b"\x12\x34\x10\x00") == (0x1234, 0x10)
    with pytest.raises(w.ProtocolError):
        w.puback_result(b"\x01")


async def test_conn_parses_split_acks_and_reason_codes() -> None:
    wg = WorkerState()
    enc = w.PublishEncoder("bench/c/data", 1, 100, w.MQTT5, run_id=1, client=0)
    c = Conn(wg, enc, w.MQTT5)
    t = _FakeTransport()
    c.connection_made(t)  # type: ignore[arg-type]
    c.data_received(b"\x20\x03\x00\x00")
    c.data_received(b"\x00")  # CONNACK split across reads
    assert c.connack.done() and c.connack.result() == 0
    assert c.send(3, 0, 0) == 3 and set(c.inflight) == {1, 2, 3}
    pkts, _ = w.parse_packets(bytearray(t.out))
    assert [p[0] for p in pkts] == [w.PUBLISH] * 3
    c.data_received(b"\x40\x02\x00")  # PUBACK 1, split
    c.data_received(b"\x01\x40\x04\x00\x02\x80\x00")  # PUBACK 2 with v5 failure reason
    c.data_received(b"\x40\x02\x00\x09\xd0\x00")  # unknown pid, then PINGRESP
    assert c.acked == 1 and len(wg.lat) == 1 and c.pongs == 1
    assert set(c.inflight) == {3}
    assert wg.errors == {"puback_reason_0x80": 1, "puback_unknown_pid": 1}
    c.closing = True
    c.connection_lost(None)
    assert "connection_lost" not in wg.errors
    await asyncio.sleep(0)


async def test_conn_packet_ids_wrap_and_skip_zero() -> None:
    wg = WorkerState()
    enc = w.PublishEncoder("t", 1, 28, w.MQTT311, run_id=1, client=0)
    c = Conn(wg, enc, w.MQTT311)
    c.connection_made(_FakeTransport())  # type: ignore[arg-type]
    c.next_pid = 65535
    c.send(2, 0, 0)
    assert set(c.inflight) == {65535, 1}
    assert [s for _, s in c.inflight.values()] == [0, 1]
