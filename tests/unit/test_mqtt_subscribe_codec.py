"""SUBSCRIBE, UNSUBSCRIBE, SUBACK and UNSUBACK as the server reads and writes them, bytewise."""

from __future__ import annotations

import pytest

from gateway.errors import MalformedPacket, PacketTooLarge, ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets
from gateway.protocols.mqtt.subscribe_codec import (
    Options,
    check_suback,
    decode_subscribe,
    decode_unsubscribe,
    encode_suback,
    encode_unsuback,
    suback_code,
)

pytestmark = pytest.mark.unit


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_311_subscribe_two_filters() -> None:
    # 3.8.3 example shape: packet id 10, "a/b" QoS 1, "c/d" QoS 2.
    req = decode_subscribe(h("82 0e 000a 0003 612f62 01 0003 632f64 02"), 4)
    assert req.packet_id == 10
    assert req.entries == (("a/b", Options(1)), ("c/d", Options(2)))
    assert (req.identifier, req.user_properties) == (None, ())


def test_5_subscribe_options_identifier_and_user_properties() -> None:
    # props: subscription identifier 300 (varint ac 02), user property ("k", "v").
    data = h("82 15 0002 0a 0b ac02 26 0001 6b 0001 76 0001 61 2d 0001 23 00")
    req = decode_subscribe(data, 5)
    assert req.identifier == 300
    assert req.user_properties == (("k", "v"),)
    # 0x2d: QoS 1, no local, retain as published, retain handling 2.
    assert req.entries == (("a", Options(1, True, True, 2)), ("#", Options(0)))


@pytest.mark.parametrize(("data", "version", "error", "says"), [
    ("82 0b 0001 04 0b 01 0b 02 0001 61 00", 5, ProtocolError, "more than one subscription id"),
    ("82 09 0001 02 0b 00 0001 61 00", 5, ProtocolError, "0x0B has invalid value 0"),
    ("82 10 0001 00 000a 2473686172652f672f61 04", 5, ProtocolError, "No Local on shared"),
    ("82 06 0001 0001 61 03", 4, MalformedPacket, "options 0x03"),  # QoS 3
    ("82 07 0001 00 0001 61 30", 5, MalformedPacket, "options 0x30"),  # retain handling 3
    ("82 06 0001 0001 61 08", 4, MalformedPacket, "options 0x08"),  # 3.1.1: bits beyond QoS
    ("82 07 0001 00 0001 61 40", 5, MalformedPacket, "options 0x40"),  # 5.0 reserved bits
    ("82 05 0001 0001 61", 4, MalformedPacket, "missing subscription options"),
    ("82 06 0001 0005 61 00", 4, MalformedPacket, "runs past the packet"),
    ("82 06 0001 0001 61 00", 5, MalformedPacket, "runs past the packet"),  # no property length
    ("82 06 0000 0001 61 00", 4, MalformedPacket, "packet identifier 0"),
    ("80 06 0001 0001 61 00", 4, MalformedPacket, "fixed header 0x80"),  # flags must be 0010
    ("82 02 0001", 4, ProtocolError, "without a topic filter"),  # [MQTT-3.8.3-3]
    ("82 09 0001 02 01 01 0001 61 00", 5, MalformedPacket, "0x01 not allowed here"),
    ("82 06 0001 0001 ff 00", 4, MalformedPacket, "not well-formed UTF-8"),
    ("82 07 0001 0002 c0af 00", 4, MalformedPacket, "not well-formed UTF-8"),  # overlong
    ("82 07 0001 0002 6100 00", 4, MalformedPacket, "U\\+0000"),
    ("a2 05 0001 0001 61", 4, ProtocolError, "expected SUBSCRIBE"),
    ("82 06 0001 0001 61 00 c0 00", 4, MalformedPacket, "exactly one complete packet"),
    ("82 06 0001 0001 61", 4, MalformedPacket, "exactly one complete packet"),  # truncated
])
def test_malformed_subscribe_is_a_protocol_error(
    data: str, version: int, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        decode_subscribe(h(data), version)


def test_shared_no_local_is_fine_in_311_terms_and_without_no_local() -> None:
    shared = "000a 2473686172652f672f61"  # "$share/g/a"
    req = decode_subscribe(h(f"82 10 0001 00 {shared} 01"), 5)
    assert req.entries == (("$share/g/a", Options(1)),)


def test_packet_too_large_is_refused_before_parsing() -> None:
    with pytest.raises(PacketTooLarge):
        decode_subscribe(h("82 06 0001 0001 61 00"), 4, max_packet_size=7)


def test_unsubscribe_both_versions() -> None:
    req = decode_unsubscribe(h("a2 0a 0003 0001 61 0003 622f63"), 4)
    assert (req.packet_id, req.filters, req.user_properties) == (3, ("a", "b/c"), ())
    req = decode_unsubscribe(h("a2 0d 0004 07 26 0001 6b 0001 76 0001 23"), 5)
    assert (req.packet_id, req.filters, req.user_properties) == (4, ("#",), (("k", "v"),))
    for bad, version in (("a2 02 0001", 4), ("a0 05 0001 0001 61", 4),
                         ("a2 06 0001 00 0002 61", 5), ("a2 05 0001 02 0b 01", 5)):
        with pytest.raises(ProtocolError):
            decode_unsubscribe(h(bad), version)


@pytest.mark.parametrize(("codes", "version", "wire"), [
    ([0x00, 0x01, 0x02, 0x80], 4, "90 06 000a 00 01 02 80"),
    ([0x01, 0x87, 0x8F, 0x9E], 4, "90 06 000a 01 80 80 80"),  # 3.1.1 has one failure code
    ([0x01, 0x87, 0x8F, 0x9E], 5, "90 07 000a 00 01 87 8f 9e"),
    ([0xA2], 5, "90 04 000a 00 a2"),
])
def test_suback_bytes(codes: list[int], version: int, wire: str) -> None:
    data = encode_suback(10, codes, version)
    assert data == h(wire)
    [pk], _ = decode_packets(data, version, 1 << 20)
    assert isinstance(pk, p.Suback)
    check_suback(pk, version, len(codes))


def test_suback_properties_and_maximum_packet_size() -> None:
    data = encode_suback(1, [0x87], 5, reason_string="no", user_properties=[("k", "v")])
    assert data == h("90 10 0001 0c 1f 0002 6e6f 26 0001 6b 0001 76 87")
    # 3.9.2.1.2: the reason string and user properties are dropped rather than
    # sending a packet over the client's Maximum Packet Size.
    assert encode_suback(1, [0x87], 5, reason_string="no", user_properties=[("k", "v")],
                         max_packet_size=17) == h("90 04 0001 00 87")
    assert encode_suback(1, [0x87], 4, reason_string="ignored") == h("90 03 0001 80")


@pytest.mark.parametrize("codes", [[], [0x03], [0x11], [0x81]])
def test_suback_refuses_what_the_spec_does_not_allow(codes: list[int]) -> None:
    with pytest.raises(ValueError):
        encode_suback(1, codes, 5)
    with pytest.raises(ValueError):
        encode_suback(0, [0x00], 5)


def test_unsuback_bytes() -> None:
    assert encode_unsuback(3, [0x00, 0x11], 4) == h("b0 02 0003")  # 3.1.1: no codes
    assert encode_unsuback(3, [0x00, 0x11], 5) == h("b0 05 0003 00 00 11")
    assert encode_unsuback(3, [0x87], 5, reason_string="no") == h("b0 09 0003 05 1f 0002 6e6f 87")
    assert encode_unsuback(3, [0x87], 5, reason_string="no", max_packet_size=8) == h(
        "b0 04 0003 00 87")
    for codes in ([], [0x01], [0x9E]):
        with pytest.raises(ValueError):
            encode_unsuback(3, codes, 5)


def test_suback_code_mapping() -> None:
    assert [suback_code(c, 4) for c in (0, 1, 2, 0x80, 0x87, 0xA2)] == [0, 1, 2, 0x80, 0x80, 0x80]
    assert [suback_code(c, 5) for c in (0, 1, 2, 0x80, 0x87, 0xA2)] == [0, 1, 2, 0x80, 0x87, 0xA2]
    with pytest.raises(ValueError):
        suback_code(0x11, 5)


def test_check_suback_as_a_client() -> None:
    with pytest.raises(MalformedPacket):
        check_suback(p.Suback(packet_id=1, reason_codes=[0x87]), 4, 1)
    with pytest.raises(ProtocolError):
        check_suback(p.Suback(packet_id=1, reason_codes=[0x00]), 5, 2)
