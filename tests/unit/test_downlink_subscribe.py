"""SUBSCRIBE / UNSUBSCRIBE answered end to end from packet bytes: codes, trie, retained."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Identity
from gateway.downlink.retained import Retained, RetainedStore
from gateway.downlink.subscribe import handle_subscribe, handle_unsubscribe
from gateway.downlink.subscriptions import Options, SubscriptionTrie
from gateway.errors import ProtocolError
from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.properties import Properties
from gateway.routing import load_rules
from gateway.routing.downlink import DownlinkRules

pytestmark = pytest.mark.unit

RULES = """\
downlink:
  - name: commands
    kafka: {topic: commands}
    mqtt: {topic: "cmd/{key}", qos: 1}
    allow: {usernames: ["{key}"]}
  - name: config
    kafka: {topic: device-config}
    mqtt: {topic: "cfg/{key}", qos: 2, retain: true}
"""
DEV1 = Identity(method="password", name="dev-1")


@pytest.fixture
def rules(tmp_path: Path) -> DownlinkRules:
    (tmp_path / "60-commands.yaml").write_text(RULES)
    return load_rules(tmp_path).downlink


def _wire(pk: p.AnyPacket, version: int) -> p.AnyPacket:
    """Through the bytes both ways, as the session will get it."""
    [decoded], _ = decode_packets(encode(pk, version), version, 1 << 20)
    return decoded


def _subscribe(version: int, *subs: tuple[str, int], ident: int | None = None) -> p.Subscribe:
    props = None
    if version == 5:
        props = Properties(subscription_identifiers=[ident] if ident else [])
    pk = _wire(p.Subscribe(packet_id=7, subscriptions=[p.Subscription(f, o) for f, o in subs],
                           properties=props), version)
    assert isinstance(pk, p.Subscribe)
    return pk


@pytest.mark.parametrize(("version", "codes"), [
    (5, [0x01, 0x87, 0x8F, 0x9E, 0x00]),
    (4, [0x01, 0x80, 0x80, 0x80, 0x00]),
])
def test_each_filter_gets_its_own_code(rules: DownlinkRules, version: int,
                                       codes: list[int]) -> None:
    trie = SubscriptionTrie()
    pk = _subscribe(version, ("cmd/dev-1", 2), ("cmd/+", 1), ("a/#/b", 0),
                    ("$share/g/cmd/dev-1", 1), ("cfg/dev-1", 0))
    answer = handle_subscribe(pk, version, "c1", DEV1, rules, trie, shared=False)
    [reply], _ = decode_packets(answer.reply, version, 1 << 20)
    assert isinstance(reply, p.Suback)
    assert (reply.packet_id, reply.reason_codes) == (7, codes)
    assert answer.reasons[1] == "not allowed to subscribe by rule commands"
    # Granted QoS is capped by the rule's (commands publishes at 1); the trie holds the request.
    assert sorted(s.filter.text for s in trie.subscriptions("c1")) == ["cfg/dev-1", "cmd/dev-1"]
    [target] = trie.match("cmd/dev-1")
    assert target.qos == 2


def test_a_shared_subscription_is_authorized_on_its_filter(rules: DownlinkRules) -> None:
    trie = SubscriptionTrie()
    answer = handle_subscribe(_subscribe(5, ("$share/g/cmd/dev-1", 1)), 5, "c1", DEV1, rules, trie)
    assert answer.codes == (0x01,)
    answer = handle_subscribe(_subscribe(5, ("$share/g/cmd/dev-2", 1)), 5, "c1", DEV1, rules, trie)
    assert answer.codes == (0x87,)


def test_retained_messages_follow_the_reply_with_retain_and_the_identifier(
    rules: DownlinkRules,
) -> None:
    trie = SubscriptionTrie()
    store = RetainedStore()
    store.set(Retained("cfg/dev-1", b"on", 2))
    store.set(Retained("cfg/dev-2", b"off", 0))
    answer = handle_subscribe(_subscribe(5, ("cfg/+", 1), ident=42), 5, "c1", DEV1, rules, trie,
                              store)
    assert answer.codes == (0x01,)
    got = sorted((m.topic, m.payload, m.qos, m.retain, m.properties) for m in answer.retained)
    ids = Properties(subscription_identifiers=[42])
    assert got == [("cfg/dev-1", b"on", 1, True, ids), ("cfg/dev-2", b"off", 0, True, ids)]
    # Retain handling 1: only for a subscription that did not exist yet.
    again = handle_subscribe(_subscribe(5, ("cfg/+", 0x11)), 5, "c1", DEV1, rules, trie, store)
    assert again.retained == ()
    assert trie.subscriptions("c1")[0].options == Options(1, retain_handling=1)
    # 3.1.1: no properties on the retained messages.
    v4 = handle_subscribe(_subscribe(4, ("cfg/dev-1", 2)), 4, "c2", DEV1, rules, trie, store)
    assert [(m.qos, m.properties) for m in v4.retained] == [(2, None)]


def test_a_protocol_error_in_the_packet_is_raised(rules: DownlinkRules) -> None:
    pk = _subscribe(5, ("$share/g/cfg/x", 0x04))  # No Local on a shared subscription
    with pytest.raises(ProtocolError):
        handle_subscribe(pk, 5, "c1", DEV1, rules, SubscriptionTrie())


@pytest.mark.parametrize(("version", "wire_codes"), [(5, [0x00, 0x11]), (4, [])])
def test_unsubscribe(rules: DownlinkRules, version: int, wire_codes: list[int]) -> None:
    trie = SubscriptionTrie()
    handle_subscribe(_subscribe(version, ("cfg/+", 1)), version, "c1", DEV1, rules, trie)
    pk = _wire(p.Unsubscribe(packet_id=9, topic_filters=["cfg/+", "cmd/#"],
                             properties=Properties() if version == 5 else None), version)
    assert isinstance(pk, p.Unsubscribe)
    answer = handle_unsubscribe(pk, version, "c1", trie)
    assert answer.codes == (0x00, 0x11)
    [reply], _ = decode_packets(answer.reply, version, 1 << 20)
    assert isinstance(reply, p.Unsuback)
    assert (reply.packet_id, reply.reason_codes) == (9, wire_codes)
    assert len(trie) == 0


def test_retained_keep_their_properties_and_expire(rules: DownlinkRules) -> None:
    import time

    store = RetainedStore()
    props = Properties(user_properties=[("a", "1")], content_type="text/plain")
    store.set(Retained("cfg/dev-1", b"on", 2, props, time.monotonic() + 60))
    store.set(Retained("cfg/dev-2", b"gone", 2, None, time.monotonic() - 1))
    answer = handle_subscribe(_subscribe(5, ("cfg/+", 1), ident=7), 5, "c1", DEV1, rules,
                              SubscriptionTrie(), store)
    (message,) = answer.retained  # cfg/dev-2 expired while retained
    assert message.topic == "cfg/dev-1" and message.expires > time.monotonic()
    assert message.properties == Properties(
        user_properties=[("a", "1")], content_type="text/plain", subscription_identifiers=[7])
