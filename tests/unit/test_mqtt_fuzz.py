"""Property tests of the codec: encode -> decode is the identity; hostile bytes never crash.

Hypothesis builds packets whose MQTT 5 properties are drawn from the same table
the codec uses, restricted to what each packet type may carry.  The fuzz part
feeds random and mutated bytes and accepts only the codec's protocol errors.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.properties import (
    _BOOLEAN,
    BIN,
    BYTE,
    STR,
    TABLE,
    U16,
    U32,
    VARINT,
    WILL,
    Properties,
)

pytestmark = pytest.mark.unit

BIG = 1 << 28
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=12)
topic = text.filter(lambda t: "+" not in t and "#" not in t and t != "")
packet_id = st.integers(1, 0xFFFF)
_KIND = {
    BYTE: st.integers(0, 255), U16: st.integers(1, 0xFFFF), U32: st.integers(1, 0xFFFFFFFF),
    VARINT: st.integers(1, 268_435_455), STR: text, BIN: st.binary(max_size=12),
}


@st.composite
def properties(draw: Any, ptype: int) -> Properties:
    values: dict[str, Any] = {}
    for ident, (name, kind, allowed) in TABLE.items():
        if ptype not in allowed or not draw(st.booleans()):
            continue
        if ident == 0x26:
            values[name] = draw(st.lists(st.tuples(text, text), max_size=3))
        elif ident == 0x0B:
            values[name] = draw(st.lists(_KIND[VARINT], min_size=1, max_size=2))
        else:
            values[name] = draw(st.integers(0, 1) if ident in _BOOLEAN else _KIND[kind])
    return Properties(**values)


def props_for(version: int, ptype: int) -> Any:
    return properties(ptype) if version == 5 else st.none()


@st.composite
def packets(draw: Any) -> tuple[p.AnyPacket, int]:
    v = draw(st.sampled_from([4, 5]))
    kind = draw(st.sampled_from(sorted(range(1, 16 if v == 5 else 15))))
    props = draw(props_for(v, kind))
    reason = draw(st.sampled_from(sorted(p.PUBACK_REASONS))) if v == 5 else 0
    if kind == p.CONNECT:
        will = draw(st.none() | st.builds(
            p.Will, topic=topic, payload=st.binary(max_size=20), qos=st.integers(0, 2),
            retain=st.booleans(), properties=props_for(v, WILL)))
        user = draw(st.none() | text)
        pw = draw(st.none() | st.binary(max_size=8)) if (user is not None or v == 5) else None
        pk: p.AnyPacket = p.Connect(
            protocol_level=v, clean_start=draw(st.booleans()), client_id=draw(text),
            keep_alive=draw(st.integers(0, 0xFFFF)), will=will, username=user, password=pw,
            properties=props)
    elif kind == p.PUBLISH:
        qos = draw(st.integers(0, 2))
        pk = p.Publish(topic=draw(topic), payload=draw(st.binary(max_size=64)), qos=qos,
                       retain=draw(st.booleans()), dup=bool(qos) and draw(st.booleans()),
                       packet_id=draw(packet_id) if qos else 0, properties=props)
    elif kind in (p.PUBACK, p.PUBREC):
        pk = (p.Puback if kind == p.PUBACK else p.Pubrec)(
            packet_id=draw(packet_id), reason_code=reason, properties=props)
    elif kind in (p.PUBREL, p.PUBCOMP):
        code = draw(st.sampled_from([0, 0x92])) if v == 5 else 0
        pk = (p.Pubrel if kind == p.PUBREL else p.Pubcomp)(
            packet_id=draw(packet_id), reason_code=code, properties=props)
    elif kind == p.SUBSCRIBE:
        subs = draw(st.lists(st.builds(p.Subscription, text, st.integers(0, 2)), min_size=1,
                             max_size=3))
        pk = p.Subscribe(packet_id=draw(packet_id), subscriptions=subs, properties=props)
    elif kind in (p.SUBACK, p.UNSUBACK):
        codes = draw(st.lists(st.sampled_from([0, 1, 2, 0x11, 0x80, 0x83]), max_size=3))
        if kind == p.SUBACK:
            pk = p.Suback(packet_id=draw(packet_id), reason_codes=codes, properties=props)
        else:
            pk = p.Unsuback(packet_id=draw(packet_id), reason_codes=codes if v == 5 else [],
                            properties=props)
    elif kind == p.UNSUBSCRIBE:
        pk = p.Unsubscribe(packet_id=draw(packet_id), properties=props,
                           topic_filters=draw(st.lists(text, min_size=1, max_size=3)))
    elif kind == p.CONNACK:
        pk = p.Connack(session_present=draw(st.booleans()), reason_code=draw(st.integers(0, 5)),
                       properties=props)
    elif kind == p.DISCONNECT:
        code = draw(st.sampled_from(sorted(p.DISCONNECT_REASONS))) if v == 5 else 0
        pk = p.Disconnect(reason_code=code, properties=props)
    elif kind == p.AUTH:
        pk = p.Auth(reason_code=draw(st.sampled_from([0, 0x18, 0x19])), properties=props)
    else:
        pk = p.Pingreq() if kind == p.PINGREQ else p.Pingresp()
    return pk, v


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets())
def test_encode_then_decode_is_identity(case: tuple[p.AnyPacket, int]) -> None:
    pk, v = case
    data = encode(pk, v)
    decoded, used = decode_packets(data + data, 0 if pk.TYPE == p.CONNECT else v, BIG)
    assert used == len(data) * (1 if pk.TYPE == p.CONNECT else 2)
    assert decoded[0] == pk


def _decode_all(data: bytes, version: int) -> None:
    try:
        packets, used = decode_packets(data, version, 4096)
    except ProtocolError:
        return
    assert 0 <= used <= len(data)
    assert (used == 0) == (not packets)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([0, 4, 5]))
def test_random_bytes_raise_only_protocol_errors(data: bytes, version: int) -> None:
    _decode_all(data, version)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets(), st.lists(st.tuples(st.integers(0, 500), st.integers(0, 255)), max_size=4),
       st.integers(0, 40))
def test_mutated_packets_raise_only_protocol_errors(
    case: tuple[p.AnyPacket, int], flips: list[tuple[int, int]], cut: int
) -> None:
    pk, v = case
    data = bytearray(encode(pk, v))
    for index, value in flips:
        data[index % len(data)] = value
    _decode_all(bytes(data[: max(1, len(data) - cut)]), 0 if pk.TYPE == p.CONNECT else v)
