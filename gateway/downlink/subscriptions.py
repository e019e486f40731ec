"""The subscription trie: which clients receive a message published to a topic.

Sans-IO and clock-free.  Filters follow MQTT 5 section 4.7 (and 3.1.1's, which
is the same without shared subscriptions):

- ``+`` fills one level, ``#`` the rest (including the parent level); both
  must fill a whole level and ``#`` must come last;
- a topic starting with ``$`` is never matched by a filter starting with a
  wildcard [MQTT-4.7.2-1];
- ``$share/GROUP/FILTER`` is a shared subscription: each message goes to one
  member of the group, chosen round-robin (4.8.2);
- one client's overlapping subscriptions collapse into one delivery at the
  highest QoS, carrying every matching subscription identifier (3.3.4).

Subscribing again to the same filter replaces the subscription (3.8.4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from gateway.protocols.mqtt.subscribe_codec import SHARE, Options

# SUBACK / UNSUBACK reason codes (MQTT 5 section 3.9.3 / 3.11.3).
GRANTED_QOS0, GRANTED_QOS1, GRANTED_QOS2 = 0x00, 0x01, 0x02
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
IMPLEMENTATION_SPECIFIC = 0x83
NOT_AUTHORIZED = 0x87
TOPIC_FILTER_INVALID = 0x8F
PACKET_ID_IN_USE = 0x91
QUOTA_EXCEEDED = 0x97
SHARED_NOT_SUPPORTED = 0x9E
SUBSCRIPTION_IDS_NOT_SUPPORTED = 0xA1
WILDCARDS_NOT_SUPPORTED = 0xA2


class FilterRefused(ValueError):
    """A topic filter the server refuses; ``reason_code`` goes into SUBACK."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class Filter(NamedTuple):
    """A validated filter: ``text`` as the client sent it, split for the trie."""

    text: str
    group: str | None  # the share name of a shared subscription
    levels: tuple[str, ...]  # of the filter proper (after $share/GROUP/)

    @property
    def wildcard(self) -> bool:
        return any(lv in ("+", "#") for lv in self.levels)


def parse_filter(text: str, *, shared: bool = True, wildcards: bool = True) -> Filter:
    """Validate ``text``; raise FilterRefused with the SUBACK reason code."""
    group = None
    body = text
    if text.startswith(SHARE):
        rest = text[len(SHARE):]
        name, slash, body = rest.partition("/")
        if not name or not slash or any(c in name for c in "+#"):
            raise FilterRefused(TOPIC_FILTER_INVALID,
                                f"shared subscription needs $share/NAME/FILTER: {text!r}")
        if not shared:
            raise FilterRefused(SHARED_NOT_SUPPORTED, "shared subscriptions are not supported")
        group = name
    if not body:
        raise FilterRefused(TOPIC_FILTER_INVALID, "empty topic filter")
    if "\x00" in body:
        raise FilterRefused(TOPIC_FILTER_INVALID, "topic filter contains U+0000")
    levels = tuple(body.split("/"))
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            if level == "#" and i != last:
                raise FilterRefused(TOPIC_FILTER_INVALID, f"'#' must be the last level: {text!r}")
        elif "+" in level or "#" in level:
            raise FilterRefused(TOPIC_FILTER_INVALID,
                                f"'+' and '#' must fill a whole level: {text!r}")
    result = Filter(text, group, levels)
    if not wildcards and result.wildcard:
        raise FilterRefused(WILDCARDS_NOT_SUPPORTED, "wildcard subscriptions are not supported")
    return result


class Subscription:
    """One client's subscription to one filter."""

    __slots__ = ("client_id", "filter", "identifier", "options")

    def __init__(
        self, client_id: str, topic_filter: Filter, options: Options, identifier: int | None
    ) -> None:
        self.client_id = client_id
        self.filter = topic_filter
        self.options = options
        self.identifier = identifier

    def __repr__(self) -> str:
        return (f"Subscription({self.client_id!r}, {self.filter.text!r}, {self.options}, "
                f"{self.identifier})")


class Target(NamedTuple):
    """One delivery of a message: to ``client_id``, at most ``qos``."""

    client_id: str
    qos: int  # the highest of the client's matching subscriptions
    identifiers: tuple[int, ...]  # every matching subscription's identifier, ascending
    retain_as_published: bool  # any matching subscription asked for it
    group: str | None  # the share name when this is a shared subscription's delivery


class _Group:
    """The members of one shared subscription ($share/NAME/filter) and the turn."""

    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, Subscription] = {}  # insertion order = rotation order
        self.turn = 0

    def pick(self, eligible: Callable[[str], bool] | None) -> Subscription | None:
        members = list(self.members.values())
        n = len(members)
        for step in range(n):
            sub = members[(self.turn + step) % n]
            if eligible is None or eligible(sub.client_id):
                self.turn = (self.turn + step + 1) % n
                return sub
        return None


class _Node:
    __slots__ = ("children", "groups", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}  # '+' and '#' are children like any level
        self.subs: dict[str, Subscription] = {}  # client id -> its subscription ending here
        self.groups: dict[str, _Group] = {}  # share name -> group ending here

    def empty(self) -> bool:
        return not (self.children or self.subs or self.groups)


class SubscriptionTrie:
    """Every client's subscriptions; ``match`` is the fan-out for one published topic."""

    def __init__(self) -> None:
        self.root = _Node()
        # client id -> filter text -> subscription, to list and drop a client's subscriptions.
        self.by_client: dict[str, dict[str, Subscription]] = {}

    def __len__(self) -> int:
        return sum(len(subs) for subs in self.by_client.values())

    def subscribe(
        self, client_id: str, topic_filter: Filter, options: Options,
        identifier: int | None = None,
    ) -> bool:
        """Add or replace; True when the client already had this filter (retain handling 1)."""
        node = self.root
        for level in topic_filter.levels:
            node = node.children.setdefault(level, _Node())
        sub = Subscription(client_id, topic_filter, options, identifier)
        if topic_filter.group is None:
            node.subs[client_id] = sub
        else:
            node.groups.setdefault(topic_filter.group, _Group()).members[client_id] = sub
        own = self.by_client.setdefault(client_id, {})
        existed = topic_filter.text in own
        own[topic_filter.text] = sub
        return existed

    def unsubscribe(self, client_id: str, text: str) -> bool:
        """Remove the client's subscription to the filter ``text``; False when it had none."""
        own = self.by_client.get(client_id)
        sub = own.pop(text, None) if own is not None else None
        if sub is None:
            return False
        if not own:
            del self.by_client[client_id]
        self._remove(sub)
        return True

    def remove_client(self, client_id: str) -> int:
        """Drop every subscription of the client (its session ended); how many there were."""
        own = self.by_client.pop(client_id, {})
        for sub in own.values():
            self._remove(sub)
        return len(own)

    def subscriptions(self, client_id: str) -> list[Subscription]:
        return list(self.by_client.get(client_id, {}).values())

    def _remove(self, sub: Subscription) -> None:
        path: list[tuple[_Node, str]] = []
        node = self.root
        for level in sub.filter.levels:
            path.append((node, level))
            node = node.children[level]
        group = sub.filter.group
        if group is None:
            del node.subs[sub.client_id]
        else:
            members = node.groups[group]
            del members.members[sub.client_id]
            if not members.members:
                del node.groups[group]
        for parent, level in reversed(path):  # prune what no longer leads anywhere
            child = parent.children[level]
            if not child.empty():
                break
            del parent.children[level]

    def _walk(self, levels: list[str]) -> Iterator[_Node]:
        """Every node whose filter matches the topic ``levels``."""
        n = len(levels)
        dollar = levels[0].startswith("$")
        stack: list[tuple[_Node, int]] = [(self.root, 0)]
        while stack:
            node, i = stack.pop()
            wild = not (dollar and i == 0)
            children = node.children
            if wild:
                hashed = children.get("#")
                if hashed is not None:
                    yield hashed  # '#' also matches the parent level
            if i == n:
                yield node
                continue
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if wild:
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))

    def match(
        self, topic: str, publisher: str | None = None,
        eligible: Callable[[str], bool] | None = None,
    ) -> list[Target]:
        """Who receives a message on ``topic`` (a valid topic name).

        ``publisher``: the client that published it, for no-local (None for
        messages from Kafka without one).  ``eligible``: which shared-group
        members may be chosen now (online, room in the queue); default all.
        """
        merged: dict[str, tuple[int, list[int], bool]] = {}
        shared: list[Target] = []
        for node in self._walk(topic.split("/")):
            for client_id, sub in node.subs.items():
                opts = sub.options
                if opts.no_local and client_id == publisher:
                    continue
                seen = merged.get(client_id)
                ids = [] if seen is None else seen[1]
                if sub.identifier is not None:
                    ids.append(sub.identifier)
                if seen is None:
                    merged[client_id] = (opts.qos, ids, opts.retain_as_published)
                else:
                    merged[client_id] = (max(seen[0], opts.qos), ids,
                                         seen[2] or opts.retain_as_published)
            for name, group in node.groups.items():
                chosen = group.pick(eligible)
                if chosen is not None:
                    ident = () if chosen.identifier is None else (chosen.identifier,)
                    shared.append(Target(chosen.client_id, chosen.options.qos, ident,
                                         chosen.options.retain_as_published, name))
        out = [Target(c, q, tuple(sorted(ids)), rap, None) for c, (q, ids, rap) in merged.items()]
        out.extend(shared)
        return out


def sends_retained(topic_filter: Filter, options: Options, existed: bool) -> bool:
    """Whether a new subscription gets the retained messages (3.8.3.1, 4.8.2)."""
    if topic_filter.group is not None:
        return False  # never on a shared subscription
    if options.retain_handling == 0:
        return True
    return options.retain_handling == 1 and not existed
