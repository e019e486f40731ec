"""MQTT publish attributes as Kafka headers, both ways (docs/rules.md, "MQTT 5 properties").

Uplink: a rule with ``kafka.mqtt_properties: true`` adds, after its own headers,
one header per attribute the publish carries (``to_headers``).  Downlink: every
rule reads the same headers back into the outgoing PUBLISH (``from_headers``), so
a Kafka producer can set them too.  Values are UTF-8 text except the correlation
data (raw bytes).
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.model import Message
from gateway.protocols.mqtt.properties import Properties

QOS = "mqtt-qos"  # "0" | "1" | "2": the QoS published at (caps delivery)
RETAIN = "mqtt-retain"  # "1" when published with the retain flag (absent otherwise)
CONTENT_TYPE = "mqtt-content-type"
PAYLOAD_FORMAT = "mqtt-payload-format"  # "0" | "1" (1: UTF-8 text)
RESPONSE_TOPIC = "mqtt-response-topic"
CORRELATION_DATA = "mqtt-correlation-data"  # raw bytes
MESSAGE_EXPIRY = "mqtt-message-expiry"  # seconds, decimal
USER_PREFIX = "mqtt-user."  # one header per user property, in order: mqtt-user.NAME = VALUE

_MAX_U32 = 0xFFFF_FFFF


def to_headers(message: Message) -> list[tuple[str, bytes]]:
    """The headers ``kafka.mqtt_properties: true`` adds for ``message``."""
    out: list[tuple[str, bytes]] = [(QOS, b"012"[message.qos:message.qos + 1])]
    if message.retain:
        out.append((RETAIN, b"1"))
    if message.content_type is not None:
        out.append((CONTENT_TYPE, message.content_type.encode()))
    if message.payload_format is not None:
        out.append((PAYLOAD_FORMAT, str(message.payload_format).encode()))
    if message.response_topic is not None:
        out.append((RESPONSE_TOPIC, message.response_topic.encode()))
    if message.correlation_data is not None:
        out.append((CORRELATION_DATA, message.correlation_data))
    if message.message_expiry is not None:
        out.append((MESSAGE_EXPIRY, str(message.message_expiry).encode()))
    out.extend((USER_PREFIX + name, value.encode()) for name, value in message.user_properties)
    return out


class FromHeaders(NamedTuple):
    properties: Properties | None  # to send to MQTT 5 subscribers
    expiry: int | None  # the message expiry interval, seconds
    retain: bool  # the record carries mqtt-retain: 1


def _text(value: bytes) -> str | None:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def from_headers(headers: tuple[tuple[str, bytes | None], ...]) -> FromHeaders:
    """Read the ``mqtt-*`` headers of a consumed record; a malformed one is ignored."""
    props: dict[str, object] = {}
    users: list[tuple[str, str]] = []
    expiry: int | None = None
    retain = False
    for name, value in headers:
        if value is None or not name.startswith("mqtt-"):
            continue
        if name.startswith(USER_PREFIX):
            key, text = name[len(USER_PREFIX):], _text(value)
            if text is not None and "\x00" not in key:
                users.append((key, text))
        elif name == RETAIN:
            retain = value == b"1"
        elif name == CORRELATION_DATA:
            props["correlation_data"] = value
        elif name in (CONTENT_TYPE, RESPONSE_TOPIC):
            text = _text(value)
            # A response topic is a topic name: no wildcards, not empty.
            if text is not None and (name == CONTENT_TYPE or (
                    text and "+" not in text and "#" not in text)):
                props["content_type" if name == CONTENT_TYPE else "response_topic"] = text
        elif name == PAYLOAD_FORMAT and value in (b"0", b"1"):
            props["payload_format_indicator"] = int(value)
        elif name == MESSAGE_EXPIRY and value.isdigit() and len(value) <= 10:
            seconds = int(value)
            if seconds <= _MAX_U32:
                expiry = seconds
    if users:
        props["user_properties"] = users
    return FromHeaders(Properties(**props) if props else None, expiry, retain)  # type: ignore[arg-type]
