"""Outgoing topic aliases of one connection: assignment, reuse, LRU replacement."""

from __future__ import annotations

import pytest

from gateway.downlink.aliases import TopicAliases

pytestmark = pytest.mark.unit


def send(aliases: TopicAliases, topic: str) -> tuple[int, bool]:
    choice = aliases.choose(topic)
    aliases.sent(topic, choice[0])
    return choice


def test_first_publish_carries_the_topic_later_ones_the_alias_only() -> None:
    aliases = TopicAliases(2)
    assert send(aliases, "a") == (1, True)
    assert send(aliases, "a") == (1, False)
    assert send(aliases, "b") == (2, True)
    assert send(aliases, "a") == (1, False)
    assert send(aliases, "b") == (2, False)


def test_never_above_the_maximum_least_recently_sent_gives_its_alias_up() -> None:
    aliases = TopicAliases(2)
    send(aliases, "a")
    send(aliases, "b")
    send(aliases, "a")  # b is now the least recently sent
    assert send(aliases, "c") == (2, True)
    assert send(aliases, "a") == (1, False)
    assert send(aliases, "b") == (2, True)  # c had alias 2 last: b takes it back, with topic
    assert send(aliases, "c") == (1, True)
    assert len(aliases) == 2
    seen = [send(aliases, f"t{n}")[0] for n in range(100)]
    assert set(seen) == {1, 2}


def test_a_choice_not_sent_changes_nothing() -> None:
    aliases = TopicAliases(1)
    assert aliases.choose("a") == (1, True)  # e.g. the PUBLISH was too large: dropped
    assert aliases.choose("a") == (1, True)
    assert len(aliases) == 0


def test_a_maximum_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="maximum"):
        TopicAliases(0)
