"""A SUBSCRIBE or UNSUBSCRIBE, answered: the session's future handler, without I/O.

Composes the pieces in the order the spec and the rules want them: the
packet's own checks (``subscribe_codec``), each filter's validity
(``parse_filter``: 0x8F, 0x9E), the downlink rules' ``allow`` (0x87), the
trie, then the SUBACK and the retained messages the new subscriptions get.
A ``ProtocolError`` from the packet ends the connection (the caller's job).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from gateway.auth import Identity
from gateway.downlink.fanout import with_identifiers
from gateway.downlink.outbound import Outgoing
from gateway.downlink.retained import RetainedStore
from gateway.downlink.subscriptions import (
    NO_SUBSCRIPTION_EXISTED,
    NOT_AUTHORIZED,
    FilterRefused,
    SubscriptionTrie,
    parse_filter,
    sends_retained,
)
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.subscribe_codec import (
    encode_suback,
    encode_unsuback,
    read_subscribe,
    read_unsubscribe,
)
from gateway.routing.downlink import DownlinkRules


class Wants(NamedTuple):
    """A granted subscription that gets the retained messages its filter matches."""

    filter: str
    levels: tuple[str, ...]
    qos: int
    identifier: int | None


class Answer(NamedTuple):
    reply: bytes  # SUBACK / UNSUBACK to write
    codes: tuple[int, ...]  # one per filter (MQTT 5 codes; 3.1.1 gets them mapped)
    reasons: tuple[str, ...]  # why each refused filter was refused ("" when granted)
    retained: tuple[Outgoing, ...]  # retained messages to queue after the reply
    wants: tuple[Wants, ...] = ()  # the subscriptions that get retained messages


def retained_for(store: RetainedStore, wants: Wants, version: int) -> list[Outgoing]:
    """The retained messages ``wants`` gets from ``store`` now (unexpired ones)."""
    out: list[Outgoing] = []
    now = time.monotonic()
    for message in store.match(wants.levels):
        if message.expires and message.expires <= now:
            continue  # expired while retained (MQTT 5 message expiry)
        props = message.properties
        if version == p.MQTT5 and wants.identifier is not None:
            props = with_identifiers(props, [wants.identifier])
        out.append(Outgoing(message.topic, message.payload, min(message.qos, wants.qos),
                            True, properties=props, expires=message.expires))
    return out


def handle_subscribe(
    pk: p.Subscribe, version: int, client_id: str, identity: Identity,
    rules: DownlinkRules, trie: SubscriptionTrie, retained: RetainedStore | None = None,
    *, shared: bool = True, max_packet_size: int | None = None,
) -> Answer:
    request = read_subscribe(pk, version)
    codes: list[int] = []
    reasons: list[str] = []
    out: list[Outgoing] = []
    wanted: list[Wants] = []
    for text, options in request.entries:
        try:
            topic_filter = parse_filter(text, shared=shared)
        except FilterRefused as exc:
            codes.append(exc.reason_code)
            reasons.append(str(exc))
            continue
        grant = rules.authorize("/".join(topic_filter.levels), identity)
        if not grant.granted:
            codes.append(NOT_AUTHORIZED)
            reasons.append(grant.reason)
            continue
        existed = trie.subscribe(client_id, topic_filter, options, request.identifier)
        codes.append(min(options.qos, grant.max_qos))
        reasons.append("")
        if not sends_retained(topic_filter, options, existed):
            continue
        wants = Wants(text, tuple(topic_filter.levels), options.qos, request.identifier)
        wanted.append(wants)
        if retained is not None:
            out.extend(retained_for(retained, wants, version))
    reply = encode_suback(request.packet_id, codes, version, max_packet_size=max_packet_size)
    return Answer(reply, tuple(codes), tuple(reasons), tuple(out), tuple(wanted))


def handle_unsubscribe(
    pk: p.Unsubscribe, version: int, client_id: str, trie: SubscriptionTrie,
    *, max_packet_size: int | None = None,
) -> Answer:
    request = read_unsubscribe(pk)
    codes = tuple(
        0x00 if trie.unsubscribe(client_id, text) else NO_SUBSCRIPTION_EXISTED
        for text in request.filters
    )
    reply = encode_unsuback(request.packet_id, codes, version, max_packet_size=max_packet_size)
    return Answer(reply, codes, ("",) * len(codes), ())
