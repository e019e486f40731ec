"""Outgoing topic aliases of one network connection (MQTT 5 section 3.3.2.3.4, sans-IO).

The client's CONNECT announces how many aliases it accepts (Topic Alias
Maximum); the gateway maps the topics it sends to aliases 1..maximum.  The
first PUBLISH of a topic carries the topic and its alias, the later ones an
empty topic and the alias only.  The mapping lives as long as the connection:
a reconnect starts with none.

When every alias is taken, the least recently sent topic gives its alias up
(LRU): a client whose set of topics moves over time keeps the saving on the
topics it gets now, where "keep the first N" would hold aliases for topics
it no longer gets.  A topic sent with a reassigned alias carries the topic
again (3 bytes more than no alias at all), so a client that gets more
distinct topics in turn than it has aliases pays little.
"""

from __future__ import annotations

from collections import OrderedDict


class TopicAliases:
    def __init__(self, maximum: int) -> None:
        if maximum <= 0:
            raise ValueError("topic alias maximum must be > 0")
        self.maximum = maximum
        self._by_topic: OrderedDict[str, int] = OrderedDict()  # least recently sent first

    def __len__(self) -> int:
        return len(self._by_topic)

    def choose(self, topic: str) -> tuple[int, bool]:
        """(alias, whether the topic must be sent with it) for the next PUBLISH of
        ``topic``; nothing changes until ``sent``."""
        alias = self._by_topic.get(topic)
        if alias is not None:
            return alias, False
        if len(self._by_topic) < self.maximum:
            return len(self._by_topic) + 1, True
        return next(iter(self._by_topic.values())), True

    def sent(self, topic: str, alias: int) -> None:
        """The PUBLISH ``choose`` answered for was written: the client knows the mapping."""
        if self._by_topic.get(topic) == alias:
            self._by_topic.move_to_end(topic)
            return
        if len(self._by_topic) >= self.maximum:
            self._by_topic.popitem(last=False)  # the least recently sent gives its alias up
        self._by_topic[topic] = alias
