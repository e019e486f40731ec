"""Byte-level cases for every MQTT packet type in 3.1.1 and 5.0, and the codec's refusals."""

from __future__ import annotations

import pytest

from gateway.errors import MalformedPacket, PacketTooLarge, ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import (
    TopicNameInvalid,
    UnsupportedProtocolVersion,
    decode_packets,
    encode,
)
from gateway.protocols.mqtt.properties import Properties
from gateway.protocols.mqtt.wire import varint

pytestmark = pytest.mark.unit

BIG = 1 << 28
P = Properties


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def decode_one(data: bytes, version: int) -> p.AnyPacket:
    packets, used = decode_packets(data, version, BIG)
    assert used == len(data) and len(packets) == 1
    return packets[0]


# (packet, version, exact bytes on the wire)
CASES: list[tuple[p.AnyPacket, int, str]] = [
    (p.Connect(client_id="a", keep_alive=60), 4, "10 0d 0004 4d515454 04 02 003c 0001 61"),
    (p.Connect(client_id="a", clean_start=False, username="u", password=b"pw",
               will=p.Will(topic="w", payload=b"x", qos=1, retain=True)), 4,
     "10 1a 0004 4d515454 04 ec 0000 0001 61 0001 77 0001 78 0001 75 0002 7077"),
    (p.Connect(protocol_level=5, client_id="a", keep_alive=10,
               properties=P(session_expiry_interval=30, receive_maximum=20)), 5,
     "10 16 0004 4d515454 05 02 000a 08 11 0000001e 21 0014 0001 61"),
    (p.Connect(protocol_level=5, client_id="", password=b"p", properties=P(),
               will=p.Will(topic="t", payload=b"", properties=P(will_delay_interval=5,
                           payload_format_indicator=1, content_type="c"))), 5,
     "10 21 0004 4d515454 05 46 0000 00 0000 0b 01 01 03 0001 63 18 00000005 0001 74 0000"
     " 0001 70"),
    (p.Connack(session_present=True, reason_code=0), 4, "20 02 01 00"),
    (p.Connack(reason_code=0x05), 4, "20 02 00 05"),
    (p.Connack(properties=P(assigned_client_identifier="id", topic_alias_maximum=5,
                            maximum_qos=1, retain_available=0)), 5,
     "20 0f 00 00 0c 12 0002 6964 22 0005 24 01 25 00"),
    (p.Connack(reason_code=0x84, properties=P()), 5, "20 03 00 84 00"),
    (p.Publish(topic="a/b", payload=b"hi"), 4, "30 07 0003 612f62 6869"),
    (p.Publish(topic="a/b", payload=b"hi", qos=1, packet_id=10, retain=True), 4,
     "33 09 0003 612f62 000a 6869"),
    (p.Publish(topic="a", payload=b"", qos=2, packet_id=1, dup=True), 4, "3c 05 0001 61 0001"),
    (p.Publish(topic="a", payload=b"x", properties=P()), 5, "30 05 0001 61 00 78"),
    (p.Publish(topic="", payload=b"x", qos=1, packet_id=2,
               properties=P(topic_alias=3, message_expiry_interval=60,
                            user_properties=[("k", "v")], correlation_data=b"c",
                            response_topic="r", subscription_identifiers=[1, 200])), 5,
     "32 22 0000 0002 1c 02 0000003c 08 0001 72 09 0001 63 0b 01 0b c801 23 0003"
     " 26 0001 6b 0001 76 78"),
    (p.Puback(packet_id=7), 4, "40 02 0007"),
    (p.Puback(packet_id=7), 5, "40 02 0007"),
    (p.Puback(packet_id=7, reason_code=0x99, properties=P(reason_string="bad")), 5,
     "40 0a 0007 99 06 1f 0003 626164"),
    (p.Pubrec(packet_id=8, reason_code=0x10), 5, "50 03 0008 10"),
    (p.Pubrel(packet_id=8), 4, "62 02 0008"),
    (p.Pubrel(packet_id=8, reason_code=0x92), 5, "62 03 0008 92"),
    (p.Pubcomp(packet_id=8), 4, "70 02 0008"),
    (p.Subscribe(packet_id=1, subscriptions=[p.Subscription("a/+", 1),
                                              p.Subscription("#", 2)]), 4,
     "82 0c 0001 0003 612f2b 01 0001 23 02"),
    (p.Subscribe(packet_id=1, subscriptions=[p.Subscription("a", 0x2d)],
                 properties=P(subscription_identifiers=[5])), 5,
     "82 09 0001 02 0b 05 0001 61 2d"),
    (p.Suback(packet_id=1, reason_codes=[0x80, 0x01]), 4, "90 04 0001 80 01"),
    (p.Suback(packet_id=1, reason_codes=[0x83], properties=P(reason_string="no")), 5,
     "90 09 0001 05 1f 0002 6e6f 83"),
    (p.Unsubscribe(packet_id=3, topic_filters=["a", "b/c"]), 4, "a2 0a 0003 0001 61 0003 622f63"),
    (p.Unsubscribe(packet_id=3, topic_filters=["a"], properties=P()), 5, "a2 06 0003 00 0001 61"),
    (p.Unsuback(packet_id=3), 4, "b0 02 0003"),
    (p.Unsuback(packet_id=3, reason_codes=[0x11, 0x00], properties=P()), 5,
     "b0 05 0003 00 11 00"),
    (p.Pingreq(), 4, "c0 00"),
    (p.Pingresp(), 5, "d0 00"),
    (p.Disconnect(), 4, "e0 00"),
    (p.Disconnect(), 5, "e0 00"),
    (p.Disconnect(reason_code=0x8E), 5, "e0 01 8e"),
    (p.Disconnect(reason_code=0x04, properties=P(session_expiry_interval=0,
                                                 server_reference="s")), 5,
     "e0 0b 04 09 11 00000000 1c 0001 73"),
    (p.Auth(), 5, "f0 00"),
    (p.Auth(reason_code=0x18, properties=P(authentication_method="m",
                                           authentication_data=b"d")), 5,
     "f0 0a 18 08 15 0001 6d 16 0001 64"),
]


@pytest.mark.parametrize(("packet", "version", "wire"), CASES)
def test_encode_and_decode_exact_bytes(packet: p.AnyPacket, version: int, wire: str) -> None:
    assert encode(packet, version).hex() == h(wire).hex()
    assert decode_one(h(wire), version if packet.TYPE != p.CONNECT else 0) == packet


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
     (2097151, "ffff7f"), (2097152, "80808001"), (268435455, "ffffff7f")],
)
def test_remaining_length_spec_examples(value: int, wire: str) -> None:
    assert varint(value).hex() == wire
    packet = p.Publish(topic="t", payload=b"\x00" * (value - 3)) if value >= 3 else None
    if packet is not None and value < 100_000:
        assert encode(packet, 4)[1:].startswith(h(wire))


def test_remaining_length_of_five_bytes_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        decode_packets(h("30 ff ff ff ff 01"), 4, BIG)


def test_partial_packets_wait_and_several_decode_in_one_pass() -> None:
    data = encode(p.Publish(topic="a", payload=b"1"), 4) * 3 + h("30 05 0001")
    packets, used = decode_packets(data, 4, BIG)
    assert len(packets) == 3 and used == len(data) - 4
    assert decode_packets(h("30"), 4, BIG) == ([], 0)
    assert decode_packets(h("30 80"), 4, BIG) == ([], 0)


def test_maximum_packet_size_is_enforced_before_the_body_arrives() -> None:
    header = h("30") + varint(2000)  # only the fixed header: the body never comes
    with pytest.raises(PacketTooLarge):
        decode_packets(header, 4, 1000)
    exact = encode(p.Publish(topic="a", payload=b"x" * 95), 4)
    assert len(exact) == 100
    assert len(decode_packets(exact, 4, 100)[0]) == 1
    with pytest.raises(PacketTooLarge):
        decode_packets(exact, 4, 99)


def test_only_connect_is_decoded_before_the_version_is_known() -> None:
    connect = encode(p.Connect(client_id="a"), 4)
    publish = encode(p.Publish(topic="t"), 4)
    packets, used = decode_packets(connect + publish, 0, BIG)
    assert [type(x) for x in packets] == [p.Connect] and used == len(connect)
    with pytest.raises(ProtocolError):
        decode_packets(publish, 0, BIG)


@pytest.mark.parametrize(
    ("wire", "version", "error"),
    [
        ("36 05 0001 61 0001", 4, MalformedPacket),  # QoS 3
        ("38 03 0001 61", 4, MalformedPacket),  # DUP on QoS 0
        ("32 05 0001 61 0000", 4, MalformedPacket),  # packet id 0
        ("30 03 0001 2b", 4, TopicNameInvalid),  # '+' in a topic name
        ("30 03 0001 23", 5, TopicNameInvalid),  # '#'
        ("30 02 0000", 4, MalformedPacket),  # empty topic in 3.1.1
        ("30 04 0001 00 00", 4, MalformedPacket),  # U+0000
        ("30 04 0002 c0af", 4, MalformedPacket),  # overlong UTF-8
        ("30 05 0003 eda080", 4, MalformedPacket),  # UTF-16 surrogate
        ("30 03 0004 61", 4, MalformedPacket),  # topic runs past the packet
        ("41 02 0001", 4, MalformedPacket),  # PUBACK with flags
        ("60 02 0001", 4, MalformedPacket),  # PUBREL must have flags 0010
        ("80 06 0001 0001 61 00", 4, MalformedPacket),  # SUBSCRIBE flags
        ("82 06 0001 0001 61 04", 4, MalformedPacket),  # 3.1.1 reserved option bit
        ("82 06 0001 0001 61 c0", 5, MalformedPacket),  # 5.0 reserved option bits
        ("82 03 0001 00", 5, ProtocolError),  # SUBSCRIBE without filters
        ("a2 02 0001", 4, ProtocolError),  # UNSUBSCRIBE without filters
        ("40 03 0001 00", 4, MalformedPacket),  # 3.1.1 PUBACK is 2 bytes
        ("40 03 0001 05", 5, MalformedPacket),  # unknown PUBACK reason
        ("c0 01 00", 4, MalformedPacket),  # PINGREQ with a body
        ("e0 01 00", 4, MalformedPacket),  # 3.1.1 DISCONNECT with a body
        ("f0 00", 4, MalformedPacket),  # AUTH does not exist in 3.1.1
        ("00 00", 4, MalformedPacket),  # reserved type 0
        ("30 05 0001 61 02 23 00", 5, MalformedPacket),  # truncated property
        ("30 07 0001 61 04 02 00000001", 5, MalformedPacket),  # property length lies
        ("30 06 0001 61 02 11 00", 5, MalformedPacket),  # session expiry not on PUBLISH
        ("30 07 0001 61 04 01 01 01 01", 5, ProtocolError),  # duplicate property
        ("30 05 0001 61 02 01 02", 5, ProtocolError),  # payload format 2
        ("30 05 0001 61 02 0b 00", 5, ProtocolError),  # subscription identifier 0
        ("10 0d 0004 4d515454 04 03 003c 0001 61", 0, MalformedPacket),  # reserved flag
        ("10 0d 0004 4d515454 04 18 003c 0001 61", 0, MalformedPacket),  # will QoS without will
        ("10 0d 0004 4d515454 04 42 003c 0001 61", 0, MalformedPacket),  # password, no user
        ("10 0d 0004 4d515455 04 02 003c 0001 61", 0, ProtocolError),  # protocol name
        ("10 0e 0004 4d515454 04 02 003c 0001 61 00", 0, MalformedPacket),  # trailing byte
        ("10 0c 0004 4d515454 05 02 003c 04 21 0000 00", 0, ProtocolError),  # receive max 0
    ],
)
def test_refusals(wire: str, version: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_packets(h(wire), version, BIG)


@pytest.mark.parametrize(("level", "name"), [(3, "MQIsdp"), (6, "MQTT"), (0, "MQTT")])
def test_unsupported_protocol_level_names_the_level(level: int, name: str) -> None:
    body = len(name).to_bytes(2, "big") + name.encode() + bytes((level, 2, 0, 60)) + h("0001 61")
    with pytest.raises(UnsupportedProtocolVersion) as info:
        decode_packets(h("10") + varint(len(body)) + body, 0, BIG)
    assert info.value.level == level


def test_encoder_refuses_what_the_decoder_refuses() -> None:
    with pytest.raises(ValueError):
        encode(p.Publish(topic="a", qos=1), 4)  # no packet id
    with pytest.raises(ValueError):
        encode(p.Publish(topic="a", dup=True), 4)
