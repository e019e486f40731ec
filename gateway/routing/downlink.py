"""Downlink rules: which Kafka records reach which MQTT topics, and who may subscribe.

The ``downlink:`` section of a bridge-rules file (docs/downlink.md)::

    downlink:
      - name: commands
        kafka: {topic: commands}               # cluster: default unless named
        mqtt: {topic: "cmd/{key}", qos: 1}     # retain: false unless set
        allow: {usernames: ["{key}"]}          # optional: who may subscribe

The MQTT topic is a template over ``{key}``, ``{header.NAME}``, ``{topic}``
and ``{partition}``; it is parsed when the rules load (templates.split_fields)
so a typo is a located load error.  ``allow`` has the uplink rules' semantics
(usernames, identities, claims; ``gateway.routing.trie.Allow``); its patterns
may name the template's variables that fill a whole topic level, bound from the
literal levels of the filter being subscribed.

Pure: no I/O, no clock.  The wiring (consumer, fan-out) is not here yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial
from typing import Literal, NamedTuple

from gateway.auth import Identity
from gateway.downlink.record import ConsumedRecord
from gateway.model import Message
from gateway.protocols.mqtt.properties import Properties
from gateway.routing import mqtt_headers
from gateway.routing.allow import compile_allow
from gateway.routing.mqtt_headers import FromHeaders, from_headers
from gateway.routing.rules import AllowSpec, Path, _Spec
from gateway.routing.templates import TemplateError, split_fields, valid_kafka_topic
from gateway.routing.trie import Allow

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
HEADER = "header."
VARIABLES = ("key", "topic", "partition", "header.NAME")
# Characters a rendered variable may never bring into an MQTT topic name.
_FORBIDDEN = ("+", "#", "\x00")
MAX_TOPIC_BYTES = 65_535

Problem = tuple[str, Path]


class DownlinkKafkaSpec(_Spec):
    topic: str
    cluster: str = "default"


class DownlinkMqttSpec(_Spec):
    topic: str
    # At least once unless the rule says otherwise: what a command usually needs.
    qos: Literal[0, 1, 2] = 1
    # "header": retained when the record carries mqtt-retain: 1 (an uplink rule with
    # kafka.mqtt_properties: true writes it for a retained PUBLISH).
    retain: bool | Literal["header"] = False


class DownlinkSpec(_Spec):
    name: str
    kafka: DownlinkKafkaSpec
    mqtt: DownlinkMqttSpec
    allow: AllowSpec | None = None


class _Level(NamedTuple):
    """One level of an MQTT topic template, for the subscribe-time overlap check."""

    literal: str | None  # the level's text when it holds no variable
    variable: str | None  # the variable's name when the level is exactly one variable
    regex: re.Pattern[str]  # what a rendered level may look like


class MqttTemplate:
    """A parsed MQTT topic template; renders from a consumed record."""

    __slots__ = ("dollar", "levels", "parts", "source", "tail", "whole_level")

    def __init__(self, source: str) -> None:
        """Parse ``source``; raise TemplateError naming the problem."""
        self.source = source
        if not source:
            raise TemplateError("empty MQTT topic")
        pieces, _ = split_fields(source)
        parts: list[str | tuple[str, bool]] = []  # literal text or (variable, may span levels)
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                bad = sorted({c for c in piece if c in _FORBIDDEN})
                if bad:
                    raise TemplateError(f"an MQTT topic name may not contain {bad}")
                if piece:
                    parts.append(piece)
                continue
            if not piece:
                raise TemplateError("empty variable '{}'; write '{{}}' for literal braces")
            if "/" in piece or not (
                piece in ("key", "topic", "partition")
                or (piece.startswith(HEADER) and len(piece) > len(HEADER))
            ):
                raise TemplateError(
                    f"unknown variable {{{piece}}}; known: {', '.join(VARIABLES)}"
                )
            parts.append((piece, False))
        self.levels = _levels(parts)
        last = self.levels[-1]
        # A variable that is the whole last level may render several levels ("{key}" of
        # "a/b/c"): what the broker-on-kafka sample needs.  Anywhere else '/' is refused.
        self.tail = last.variable is not None
        end = parts[-1]
        if self.tail and not isinstance(end, str):
            parts[-1] = (end[0], True)
        self.parts = tuple(parts)
        self.whole_level = tuple(sorted({lv.variable for lv in self.levels if lv.variable}))
        # Topics starting with '$' are the server's; only a template that says so renders one.
        self.dollar = isinstance(parts[0], str) and parts[0].startswith("$")

    def render(self, record: ConsumedRecord) -> str:
        """The MQTT topic for ``record``; LookupError says why there is none."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name, spans = part
            value = _value(name, record)
            bad = [c for c in _FORBIDDEN if c in value]
            if bad or (not spans and "/" in value):
                shown = bad or ["/"]
                raise LookupError(f"{{{name}}} contains {shown}, not allowed in this topic")
            out.append(value)
        topic = "".join(out)
        if not self.dollar and topic.startswith("$"):
            raise LookupError("the topic would start with '$' (reserved for the server)")
        if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise LookupError("the topic would be longer than 65535 bytes")
        return topic

    def overlaps(self, levels: list[str]) -> bool:
        """Can a topic this template renders match the filter split into ``levels``?"""
        t = self.levels
        for i, fl in enumerate(levels):
            if i == 0:
                first = t[0]
                wild = fl in ("+", "#")
                if wild and self.dollar:
                    return False  # [MQTT-4.7.2-1]
                if not wild and fl.startswith("$") and first.literal is None:
                    return False  # a variable never renders a '$' topic
            if fl == "#":
                return True
            if i >= len(t):
                return False
            if i == len(t) - 1 and self.tail:
                return True  # the last variable may render all the filter's remaining levels
            if fl != "+" and t[i].regex.fullmatch(fl) is None:
                return False
        return len(levels) == len(t)

    def captures(self, levels: list[str]) -> dict[str, str]:
        """Whole-level variables bound by literal filter levels; unbound ones are ''."""
        out = dict.fromkeys(self.whole_level, "")
        for i, lv in enumerate(self.levels):
            if lv.variable is None or i >= len(levels):
                continue
            if i == len(self.levels) - 1 and self.tail:
                rest = levels[i:]
                if not any(x in ("+", "#") for x in rest):
                    out[lv.variable] = "/".join(rest)
            elif levels[i] not in ("+", "#"):
                out[lv.variable] = levels[i]
        return out


def _levels(parts: list[str | tuple[str, bool]]) -> tuple[_Level, ...]:
    levels: list[list[str | tuple[str, bool]]] = [[]]
    for part in parts:
        if isinstance(part, str):
            chunks = part.split("/")
            if chunks[0]:
                levels[-1].append(chunks[0])
            for chunk in chunks[1:]:
                levels.append([chunk] if chunk else [])
        else:
            levels[-1].append(part)
    out = []
    for level in levels:
        variables = [p[0] for p in level if not isinstance(p, str)]
        if not variables:
            text = "".join(p for p in level if isinstance(p, str))
            out.append(_Level(text, None, re.compile(re.escape(text))))
            continue
        regex = "".join(re.escape(p) if isinstance(p, str) else "[^/]*" for p in level)
        whole = variables[0] if len(level) == 1 else None
        out.append(_Level(None, whole, re.compile(regex, re.DOTALL)))
    return tuple(out)


def _value(name: str, record: ConsumedRecord) -> str:
    if name == "topic":
        return record.topic
    if name == "partition":
        return str(record.partition)
    if name == "key":
        raw = record.key
        if raw is None:
            raise LookupError("the record has no key")
        what = "key"
    else:
        header = name[len(HEADER) :]
        for hname, hvalue in record.headers:
            if hname == header:
                raw = hvalue
                break
        else:
            raise LookupError(f"the record has no header {header!r}")
        if raw is None:
            raise LookupError(f"header {header!r} has no value")
        what = f"header {header!r}"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LookupError(f"the {what} is not UTF-8") from None


class DownlinkRule:
    """One compiled downlink rule."""

    __slots__ = ("allow", "cluster", "file", "index", "kafka_topic", "line", "name", "qos",
                 "retain", "topic")

    def __init__(
        self, spec: DownlinkSpec, index: int, file: str, line: int | None
    ) -> None:
        self.name = spec.name
        self.index = index
        self.file = file
        self.line = line
        self.cluster = spec.kafka.cluster
        self.kafka_topic = spec.kafka.topic
        self.qos = spec.mqtt.qos
        self.retain: bool | Literal["header"] = spec.mqtt.retain
        self.topic: MqttTemplate | None = None
        self.allow: Allow | None = None


class Delivery(NamedTuple):
    """What one rule makes of one record: publish ``payload`` to ``topic``."""

    rule: str
    topic: str
    qos: int  # the rule's; each subscriber gets min(this, its subscription's QoS)
    retain: bool
    payload: bytes
    # Retained rules only: an empty value (or a tombstone) deletes the topic's retained message.
    delete: bool
    # From the record's mqtt-* headers (gateway/routing/mqtt_headers.py): MQTT 5 properties
    # for the PUBLISH and the message expiry interval in seconds.
    properties: Properties | None = None
    expiry: int | None = None


class Skipped(NamedTuple):
    rule: str
    reason: str


class Grant(NamedTuple):
    """The answer to "may this client subscribe to this filter?"."""

    granted: bool
    reason: str
    max_qos: int  # the highest QoS any rule serving the filter publishes at
    rules: tuple[str, ...]  # the rules serving the filter (all permit the client)


# A record header with the QoS it was published at (an uplink rule writes it with
# ``headers: {mqtt-qos: "{qos}"}``): delivery never goes above it, as a broker's would not.
QOS_HEADER = mqtt_headers.QOS
_QOS_VALUES = {b"0": 0, b"1": 1, b"2": 2}


def publisher_qos(record: ConsumedRecord) -> int:
    for name, value in record.headers:
        if name == QOS_HEADER and value is not None:
            return _QOS_VALUES.get(value, 2)
    return 2


_NO_ATTRS = FromHeaders(None, None, False)


class DownlinkRules:
    """The compiled ``downlink:`` sections of a rules directory; immutable."""

    def __init__(self, rules: Iterable[DownlinkRule] = ()) -> None:
        self.rules = tuple(rules)
        by_topic: dict[tuple[str, str], list[DownlinkRule]] = {}
        for rule in self.rules:
            by_topic.setdefault((rule.cluster, rule.kafka_topic), []).append(rule)
        self.by_topic = {k: tuple(v) for k, v in by_topic.items()}
        self.clusters = frozenset(r.cluster for r in self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def kafka_topics(self, cluster: str = "default") -> frozenset[str]:
        """What the worker's one consumer of ``cluster`` is assigned."""
        return frozenset(t for c, t in self.by_topic if c == cluster)

    def route(self, record: ConsumedRecord) -> tuple[list[Delivery], list[Skipped]]:
        """Every rule's delivery for ``record``, in file order, and why any rule had none."""
        deliveries: list[Delivery] = []
        skipped: list[Skipped] = []
        cap = publisher_qos(record)
        attrs = from_headers(record.headers) if record.headers else _NO_ATTRS
        for rule in self.by_topic.get((record.cluster, record.topic), ()):
            assert rule.topic is not None  # a loaded table has every template
            try:
                topic = rule.topic.render(record)
            except LookupError as exc:
                skipped.append(Skipped(rule.name, str(exc)))
                continue
            payload = record.value or b""
            retain = attrs.retain if rule.retain == "header" else bool(rule.retain)
            deliveries.append(
                Delivery(rule.name, topic, min(rule.qos, cap), retain, payload,
                         retain and not payload, attrs.properties, attrs.expiry)
            )
        return deliveries, skipped

    def authorize(self, topic_filter: str, identity: Identity) -> Grant:
        """May ``identity`` subscribe to ``topic_filter`` (validated; of a shared one, the
        filter after ``$share/NAME/``)?

        Granted when at least one rule can publish to a topic the filter matches
        and every such rule permits the client (a rule without ``allow`` permits
        everyone).  What a client is granted is then exactly what it receives:
        no per-record check on the fan-out path.
        """
        levels = topic_filter.split("/")
        serving: list[DownlinkRule] = []
        as_message: Message | None = None
        for rule in self.rules:
            assert rule.topic is not None
            if not rule.topic.overlaps(levels):
                continue
            if rule.allow is not None:
                if as_message is None:
                    as_message = Message(
                        source="mqtt", topic=topic_filter, payload=b"",
                        username=identity.name, cert_identity=identity.cert,
                        claims=identity.claims,
                    )
                if not rule.allow.permits(as_message, rule.topic.captures(levels)):
                    return Grant(False, f"not allowed to subscribe by rule {rule.name}", 0, ())
            serving.append(rule)
        if not serving:
            return Grant(False, "no downlink rule publishes to this filter", 0, ())
        return Grant(True, "", max(r.qos for r in serving), tuple(r.name for r in serving))


def compile_downlink(
    spec: DownlinkSpec, index: int, file: str, line: int | None
) -> tuple[DownlinkRule, list[Problem]]:
    """Compile one downlink rule; usable only when the problem list is empty."""
    problems: list[Problem] = []
    if not _NAME.fullmatch(spec.name):
        problems.append(("rule names use letters, digits, '.', '_' and '-'", ("name",)))
    rule = DownlinkRule(spec, index, file, line)
    if not spec.kafka.cluster:
        problems.append(("cluster must not be empty", ("kafka", "cluster")))
    if not valid_kafka_topic(spec.kafka.topic):
        problems.append((
            f"invalid Kafka topic name {spec.kafka.topic!r} (a fixed name: the consumer is "
            "assigned it)", ("kafka", "topic")))
    try:
        rule.topic = MqttTemplate(spec.mqtt.topic)
    except TemplateError as exc:
        problems.append((str(exc), ("mqtt", "topic")))
    if spec.allow is not None:
        names = rule.topic.whole_level if rule.topic is not None else ()
        rule.allow = compile_allow(spec.allow, names, partial(_unknown_variable, names=names),
                                   problems)
    return rule, problems


def _unknown_variable(name: str, names: tuple[str, ...]) -> str:
    known = ", ".join(f"{{{n}}}" for n in names) or "none"
    return f"unknown variable {{{name}}}; this rule's topic has whole-level variables: {known}"


__all__ = [
    "Delivery",
    "DownlinkRule",
    "DownlinkRules",
    "DownlinkSpec",
    "Grant",
    "MqttTemplate",
    "Skipped",
    "compile_downlink",
]
