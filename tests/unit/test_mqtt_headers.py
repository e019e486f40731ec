"""MQTT publish attributes as Kafka headers and back (gateway/routing/mqtt_headers.py)."""

from __future__ import annotations

import pytest

from gateway.downlink.outbound import OutboundFlow, Outgoing
from gateway.downlink.record import ConsumedRecord
from gateway.model import Message
from gateway.routing import mqtt_headers as mh
from gateway.routing.downlink import DownlinkRules, DownlinkSpec, compile_downlink

pytestmark = pytest.mark.unit


def test_round_trip_keeps_every_property_in_order() -> None:
    message = Message(
        source="mqtt", topic="a/b", payload=b"x", qos=1, retain=True,
        user_properties=[("a", "2"), ("c", "3"), ("a", "1")], content_type="text/plain",
        payload_format=1, message_expiry=30, correlation_data=b"\x00\xff",
        response_topic="reply/to",
    )
    headers = mh.to_headers(message)
    assert headers[:2] == [("mqtt-qos", b"1"), ("mqtt-retain", b"1")]
    back = mh.from_headers(tuple(headers))
    assert back.retain and back.expiry == 30
    props = back.properties
    assert props is not None
    assert (props.user_properties, props.content_type, props.payload_format_indicator,
            props.correlation_data, props.response_topic) == (
        [("a", "2"), ("c", "3"), ("a", "1")], "text/plain", 1, b"\x00\xff", "reply/to")
    # A plain QoS 0 publish adds only its QoS; no properties come back.
    assert mh.to_headers(Message(source="mqtt", topic="t", payload=b"")) == [("mqtt-qos", b"0")]
    assert mh.from_headers((("mqtt-qos", b"0"),)) == (None, None, False)


def test_malformed_headers_are_ignored() -> None:
    back = mh.from_headers((
        ("mqtt-payload-format", b"7"), ("mqtt-message-expiry", b"-1"),
        ("mqtt-response-topic", b"a/+"), ("mqtt-content-type", b"\xff"),
        ("mqtt-user.k", None), ("mqtt-retain", b"yes"), ("other", b"1"),
        ("mqtt-message-expiry", b"99999999999"),
    ))
    assert back == (None, None, False)


def _rules(retain: object) -> DownlinkRules:
    import msgspec

    spec = msgspec.convert({"name": "r", "kafka": {"topic": "t"},
                            "mqtt": {"topic": "{key}", "retain": retain}}, DownlinkSpec)
    rule, problems = compile_downlink(spec, 0, "f.yaml", 1)
    assert not problems
    return DownlinkRules([rule])


@pytest.mark.parametrize("retain_header, value, expected", [
    (b"1", b"on", (True, False)), (None, b"on", (False, False)), (b"1", b"", (True, True))])
def test_retain_header_rule(retain_header: bytes | None, value: bytes,
                            expected: tuple[bool, bool]) -> None:
    headers = (("mqtt-retain", retain_header),) if retain_header else ()
    record = ConsumedRecord(topic="t", partition=0, offset=0, key=b"k", value=value,
                            headers=headers)
    (delivery,), _ = _rules("header").route(record)
    assert (delivery.retain, delivery.delete) == expected
    # retain: true / false ignore the header.
    (always,), _ = _rules(True).route(record)
    (never,), _ = _rules(False).route(record)
    assert always.retain and not never.retain


def test_queued_message_expires_unsent() -> None:
    flow = OutboundFlow()
    flow.enqueue(Outgoing("t", b"old", 1, expires=100.0))
    flow.enqueue(Outgoing("t", b"new", 1, expires=200.0))
    flow.enqueue(Outgoing("t", b"forever", 0))
    sent = flow.pull(now=150.0)
    assert [m.payload for m in sent] == [b"new", b"forever"] and flow.expired == 1


def test_uplink_rule_writes_headers_only_when_asked(tmp_path: object) -> None:
    from pathlib import Path

    from gateway.routing import load_rules
    from gateway.routing.router import route

    assert isinstance(tmp_path, Path)
    (tmp_path / "10.yaml").write_text(
        'rules:\n'
        '  - {name: with, match: "a/#", kafka: {topic: t, headers: {h: x}, '
        'mqtt_properties: true}}\n'
        '  - {name: without, match: "b/#", kafka: {topic: t}}\n')
    table = load_rules(str(tmp_path))
    message = Message(source="mqtt", topic="a/1", payload=b"", qos=2, retain=True,
                      user_properties=[("u", "v")])
    (record,) = route(table, message).records
    assert record.headers == [("h", b"x"), ("mqtt-qos", b"2"), ("mqtt-retain", b"1"),
                              ("mqtt-user.u", b"v")]
    message.topic = "b/1"
    assert route(table, message).records[0].headers == []
