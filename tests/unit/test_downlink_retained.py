"""The retained-message store: newest per topic, empty deletes, bounded, matched by filter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.downlink.retained import Retained, RetainedStore
from gateway.downlink.subscriptions import parse_filter
from tests.unit.test_downlink_subscriptions import FILTERS, TOPICS, naive_matches

pytestmark = pytest.mark.unit


def _topics(store: RetainedStore, text: str) -> list[str]:
    return sorted(m.topic for m in store.match(parse_filter(text).levels))


def test_newest_wins_and_an_empty_payload_deletes() -> None:
    store = RetainedStore()
    assert store.set(Retained("cfg/dev-1", b"v1", 1))
    assert store.set(Retained("cfg/dev-1", b"v22", 1))
    assert store.get("cfg/dev-1") == Retained("cfg/dev-1", b"v22", 1)
    assert (len(store), store.bytes) == (1, 3)
    assert store.set(Retained("cfg/dev-1", b"", 1))
    assert store.get("cfg/dev-1") is None and (len(store), store.bytes) == (0, 0)
    assert store.root.children == {}  # pruned
    assert store.delete("cfg/dev-1") is False and store.delete("cfg") is False


def test_filters_find_what_they_match() -> None:
    store = RetainedStore()
    for topic in ("cfg/a", "cfg/b/c", "cfg", "$SYS/x", "other", "/lead"):
        store.set(Retained(topic, b"x", 0))
    assert _topics(store, "cfg/+") == ["cfg/a"]
    assert _topics(store, "cfg/#") == ["cfg", "cfg/a", "cfg/b/c"]
    assert _topics(store, "#") == ["/lead", "cfg", "cfg/a", "cfg/b/c", "other"]
    assert _topics(store, "+/x") == []
    assert _topics(store, "$SYS/#") == ["$SYS/x"]
    assert _topics(store, "+/+") == ["/lead", "cfg/a"]
    assert store.delete("cfg")
    assert _topics(store, "cfg/#") == ["cfg/a", "cfg/b/c"]


def test_bounds_refuse_new_topics_but_not_replacements() -> None:
    store = RetainedStore(max_messages=2, max_bytes=10)
    assert store.set(Retained("a", b"12345", 0)) and store.set(Retained("b", b"1", 0))
    assert store.set(Retained("c", b"1", 0)) is False  # count
    assert store.set(Retained("a", b"123456789", 0))  # replacing is always allowed
    store.delete("b")
    assert store.set(Retained("c", b"12", 0)) is False  # bytes: 9 + 2 > 10
    assert store.refused == 2 and (len(store), store.bytes) == (1, 9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TOPICS, st.binary(max_size=2))), FILTERS)
def test_store_agrees_with_a_dict_and_the_naive_matcher(
    writes: list[tuple[str, bytes]], topic_filter: str
) -> None:
    store = RetainedStore()
    model: dict[str, bytes] = {}
    for topic, payload in writes:
        store.set(Retained(topic, payload, 0))
        if payload:
            model[topic] = payload
        else:
            model.pop(topic, None)
    assert len(store) == len(model) and store.bytes == sum(map(len, model.values()))
    got = sorted((m.topic, m.payload) for m in store.match(topic_filter.split("/")))
    assert got == sorted((t, p) for t, p in model.items() if naive_matches(topic_filter, t))
    for topic in list(model):
        assert store.delete(topic)
    assert store.root.children == {}
