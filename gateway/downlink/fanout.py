"""One consumed record to every subscriber's outbound flow (sans-IO).

The path per record: hold it in the ``OffsetTracker``, map it through the
downlink rules, update the retained store, look the MQTT topic up in the
trie, and queue one ``Outgoing`` per target at min(rule QoS, subscription
QoS) with the subscription identifiers.  Each queue is bounded on its own,
so a slow client never stalls the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from gateway.downlink.outbound import OffsetTracker, OutboundFlow, Outgoing, Pending
from gateway.downlink.record import ConsumedRecord
from gateway.downlink.retained import Retained, RetainedStore
from gateway.downlink.subscriptions import SubscriptionTrie
from gateway.protocols.mqtt.properties import Properties
from gateway.routing.downlink import DownlinkRules

# Stamped by uplink rules with ``kafka.sequence: true``: who published, for No Local.
PUBLISHER_HEADER = "lastmile-client-id"


@dataclass
class FanoutResult:
    queued: int = 0  # Outgoing messages queued
    dropped: int = 0  # by a full queue's policy (the flow counts them too)
    no_session: int = 0  # a target with no flow (session gone meanwhile)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rule, why no topic)


def publisher(record: ConsumedRecord) -> str | None:
    for name, value in record.headers:
        if name == PUBLISHER_HEADER and value is not None:
            return value.decode("utf-8", "replace")
    return None


def expiry_deadline(expiry: int | None, produced_at: float = 0.0) -> float:
    """The ``Outgoing.expires`` deadline of a message expiry interval (0: none), counted
    from the record's Kafka timestamp ``produced_at`` (from now when unknown or ahead)."""
    if not expiry:
        return 0.0
    age = max(0.0, time.time() - produced_at) if produced_at else 0.0
    return time.monotonic() + expiry - age


def with_identifiers(base: Properties | None, identifiers: Iterable[int]) -> Properties:
    if base is None:
        return Properties(subscription_identifiers=list(identifiers))
    return msgspec.structs.replace(base, subscription_identifiers=list(identifiers))


def fan_out(
    record: ConsumedRecord, rules: DownlinkRules, trie: SubscriptionTrie,
    flows: Mapping[str, OutboundFlow], tracker: OffsetTracker,
    retained: RetainedStore | None = None,
    eligible: Callable[[str], bool] | None = None, *,
    pending: Pending | None = None, only: str | None = None,
) -> FanoutResult:
    """Queue ``record`` for every matching subscription; its offset is held until done.

    ``pending``: the record's hold already taken (``OffsetTracker.adopt``: a record
    fanned out again for a session taken over from another worker); ``only``: that
    session's client id, the one target.
    """
    result = FanoutResult()
    if pending is None:
        pending = tracker.consumed((record.cluster, record.topic, record.partition),
                                   record.offset)
    deliveries, skipped = rules.route(record)
    result.skipped.extend(skipped)
    sender = publisher(record)
    for delivery in deliveries:
        expires = expiry_deadline(delivery.expiry, record.timestamp)
        if retained is not None and delivery.retain:
            retained.set(Retained(delivery.topic, delivery.payload, delivery.qos,
                                  delivery.properties, expires))
        base = delivery.properties
        for target in trie.match(delivery.topic, sender, eligible):
            if only is not None and target.client_id != only:
                continue
            flow = flows.get(target.client_id)
            if flow is None:
                result.no_session += 1
                continue
            props = base
            if target.identifiers:
                props = with_identifiers(base, target.identifiers)
            pending.hold()
            message = Outgoing(
                delivery.topic, delivery.payload, min(delivery.qos, target.qos),
                delivery.retain and target.retain_as_published,
                properties=props, origin=pending, expires=expires,
            )
            if flow.enqueue(message) is not None:
                result.dropped += 1
            result.queued += 1
    tracker.fanned_out(pending)
    return result
