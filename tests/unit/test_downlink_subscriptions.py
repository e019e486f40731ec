"""The subscription trie against MQTT 5 (sections 4.7, 4.8.2, 3.3.4) and a naive matcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.downlink.subscriptions import (
    SHARED_NOT_SUPPORTED,
    TOPIC_FILTER_INVALID,
    WILDCARDS_NOT_SUPPORTED,
    FilterRefused,
    Options,
    SubscriptionTrie,
    Target,
    parse_filter,
    sends_retained,
)

pytestmark = pytest.mark.unit


def naive_matches(topic_filter: str, topic: str) -> bool:
    """Section 4.7 read literally, level by level, with no trie."""
    f = topic_filter.split("/")
    t = topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def _sub(trie: SubscriptionTrie, client: str, text: str, qos: int = 0,
         ident: int | None = None, **kw: bool) -> bool:
    return trie.subscribe(client, parse_filter(text), Options(qos, **kw), ident)


def _clients(targets: list[Target]) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {t.client_id: (t.qos, t.identifiers) for t in targets if t.group is None}


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/x", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/x", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/$x", "a/$x", True),
    ("+/$x", "a/$x", True),
    ("ACCOUNTS", "Accounts", False),
])
def test_spec_examples(topic_filter: str, topic: str, matches: bool) -> None:
    trie = SubscriptionTrie()
    _sub(trie, "c", topic_filter)
    assert bool(trie.match(topic)) is matches
    assert naive_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(("text", "code"), [
    ("", TOPIC_FILTER_INVALID),
    ("a/#/b", TOPIC_FILTER_INVALID),
    ("a#", TOPIC_FILTER_INVALID),
    ("a/b+", TOPIC_FILTER_INVALID),
    ("+a", TOPIC_FILTER_INVALID),
    ("a\x00", TOPIC_FILTER_INVALID),
    ("$share/g", TOPIC_FILTER_INVALID),
    ("$share/g/", TOPIC_FILTER_INVALID),
    ("$share//a", TOPIC_FILTER_INVALID),
    ("$share/g+/a", TOPIC_FILTER_INVALID),
    ("$share/#/a", TOPIC_FILTER_INVALID),
])
def test_invalid_filters_are_refused_with_0x8f(text: str, code: int) -> None:
    with pytest.raises(FilterRefused) as info:
        parse_filter(text)
    assert info.value.reason_code == code


def test_shared_and_wildcards_can_be_switched_off() -> None:
    assert parse_filter("$share/g/a/+").group == "g"
    assert parse_filter("$share/g/a/+").levels == ("a", "+")
    with pytest.raises(FilterRefused) as info:
        parse_filter("$share/g/a", shared=False)
    assert info.value.reason_code == SHARED_NOT_SUPPORTED
    with pytest.raises(FilterRefused) as info:
        parse_filter("a/#", wildcards=False)
    assert info.value.reason_code == WILDCARDS_NOT_SUPPORTED
    assert parse_filter("a/b", wildcards=False).wildcard is False
    # "$shared/..." and "$share" alone are ordinary (if odd) filters.
    assert parse_filter("$shared/x").group is None
    assert parse_filter("$share").group is None


def test_options_byte_round_trip() -> None:
    for byte in range(0x40):
        if byte & 0x03 == 3 or (byte >> 4) & 0x03 == 3:
            continue
        assert Options.from_byte(byte).to_byte() == byte
    assert Options.from_byte(0x2D) == Options(1, True, True, 2)


def test_overlapping_subscriptions_collapse_to_max_qos_and_all_identifiers() -> None:
    trie = SubscriptionTrie()
    _sub(trie, "c", "a/+", 0, 5)
    _sub(trie, "c", "a/#", 2, 3)
    _sub(trie, "c", "a/b", 1)  # no identifier
    _sub(trie, "d", "a/b", 1, 9)
    targets = trie.match("a/b")
    assert sorted(targets) == [
        Target("c", 2, (3, 5), False, None), Target("d", 1, (9,), False, None)]
    assert trie.match("a") == [Target("c", 2, (3,), False, None)]


def test_resubscribing_replaces_options_and_identifier() -> None:
    trie = SubscriptionTrie()
    assert _sub(trie, "c", "a/b", 2, 7) is False
    assert _sub(trie, "c", "a/b", 0) is True
    assert trie.match("a/b") == [Target("c", 0, (), False, None)]
    assert len(trie) == 1


def test_no_local_skips_only_the_publishers_own_subscription() -> None:
    trie = SubscriptionTrie()
    _sub(trie, "c", "a/b", 1, 1, no_local=True)
    _sub(trie, "c", "a/#", 0, 2)
    _sub(trie, "d", "a/b", 1, no_local=True)
    assert sorted(trie.match("a/b", publisher="c")) == [
        Target("c", 0, (2,), False, None), Target("d", 1, (), False, None)]
    assert _clients(trie.match("a/b", publisher="d")) == {"c": (1, (1, 2))}
    assert _clients(trie.match("a/b")) == {"c": (1, (1, 2)), "d": (1, ())}


def test_retain_as_published_is_kept_when_any_matching_subscription_asks() -> None:
    trie = SubscriptionTrie()
    _sub(trie, "c", "a/+", 0, retain_as_published=True)
    _sub(trie, "c", "a/b", 1)
    [target] = trie.match("a/b")
    assert target.retain_as_published is True and target.qos == 1


def test_shared_subscription_round_robin_and_eligibility() -> None:
    trie = SubscriptionTrie()
    for client in ("m1", "m2", "m3"):
        _sub(trie, client, "$share/g/jobs/+", 1, 4)
    _sub(trie, "m1", "$share/h/jobs/#", 0)
    _sub(trie, "watcher", "jobs/#", 0)
    picks = []
    for _ in range(6):
        targets = trie.match("jobs/1")
        assert Target("watcher", 0, (), False, None) in targets
        [g] = [t for t in targets if t.group == "g"]
        [h] = [t for t in targets if t.group == "h"]
        assert (g.qos, g.identifiers, h.client_id) == (1, (4,), "m1")
        picks.append(g.client_id)
    assert picks == ["m1", "m2", "m3", "m1", "m2", "m3"]
    # Members that cannot take a message now (offline, queue full) are passed over.
    chosen = [t.client_id for t in trie.match("jobs/1", eligible=lambda c: c != "m2")
              if t.group == "g"]
    assert chosen == ["m1"]
    assert [t.client_id for t in trie.match("jobs/1", eligible=lambda c: c != "m2")
            if t.group == "g"] == ["m3"]
    assert [t for t in trie.match("jobs/1", eligible=lambda c: False) if t.group == "g"] == []
    # A member leaving keeps the rotation going over the others.
    assert trie.unsubscribe("m1", "$share/g/jobs/+") is True
    assert {t.client_id for _ in range(4) for t in trie.match("jobs/1") if t.group == "g"} == {
        "m2", "m3"}


def test_unsubscribe_and_remove_client_prune_the_trie() -> None:
    trie = SubscriptionTrie()
    _sub(trie, "c", "a/b/c")
    _sub(trie, "c", "$share/g/a/#")
    _sub(trie, "d", "a/+/c")
    assert trie.unsubscribe("c", "a/b") is False
    assert trie.unsubscribe("x", "a/b/c") is False
    assert trie.unsubscribe("c", "a/b/c") is True
    assert [t.client_id for t in trie.match("a/b/c")] == ["d", "c"]
    assert trie.remove_client("c") == 1
    assert trie.remove_client("d") == 1
    assert trie.root.empty() and trie.by_client == {} and len(trie) == 0


@pytest.mark.parametrize(("text", "rh", "existed", "sends"), [
    ("a", 0, True, True), ("a", 1, False, True), ("a", 1, True, False),
    ("a", 2, False, False), ("$share/g/a", 0, False, False),
])
def test_retain_handling(text: str, rh: int, existed: bool, sends: bool) -> None:
    assert sends_retained(parse_filter(text), Options(retain_handling=rh), existed) is sends


# Few level names, so that filters overlap often (one client's subscriptions collapse).
LEVEL = st.sampled_from(["a", "", "$x"])
TOPICS = st.lists(LEVEL, min_size=1, max_size=3).map("/".join)
FILTER_LEVEL = st.sampled_from(["a", "", "$x", "+", "+"])
FILTERS = st.builds(
    lambda levels, hashed: "/".join([*levels, "#"] if hashed else levels) or "#",
    st.lists(FILTER_LEVEL, min_size=0, max_size=3), st.booleans())
SUBS = st.lists(
    st.tuples(st.sampled_from(["c1", "c2"]), FILTERS, st.integers(0, 2),
              st.none() | st.integers(1, 268_435_455), st.booleans()),
    max_size=12)


@settings(max_examples=300, deadline=None)
@given(SUBS, TOPICS, st.sampled_from([None, "c1", "c2"]), st.lists(st.integers(0, 11)))
def test_trie_agrees_with_the_naive_matcher(
    subs: list[tuple[str, str, int, int | None, bool]], topic: str, publisher: str | None,
    removals: list[int],
) -> None:
    trie = SubscriptionTrie()
    current: dict[tuple[str, str], tuple[int, int | None, bool]] = {}
    for client, text, qos, ident, no_local in subs:
        existed = _sub(trie, client, text, qos, ident, no_local=no_local)
        assert existed is ((client, text) in current)
        current[(client, text)] = (qos, ident, no_local)
    for i in removals:
        if i < len(subs):
            client, text = subs[i][:2]
            assert trie.unsubscribe(client, text) is ((client, text) in current)
            current.pop((client, text), None)
    expected: dict[str, tuple[int, tuple[int, ...]]] = {}
    for (client, text), (qos, ident, no_local) in current.items():
        if not naive_matches(text, topic) or (no_local and client == publisher):
            continue
        old_qos, ids = expected.get(client, (0, ()))
        expected[client] = (max(old_qos, qos), tuple(sorted(ids + ((ident,) if ident else ()))))
    assert _clients(trie.match(topic, publisher)) == expected
    assert len(trie) == len(current)
    for client in ("c1", "c2", "c3"):
        trie.remove_client(client)
    assert trie.root.empty()
