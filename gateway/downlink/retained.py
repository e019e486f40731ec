"""Retained messages by MQTT topic, looked up by a new subscription's filter (sans-IO).

The newest message per topic is kept; an empty payload deletes the topic's
message (MQTT 3.3.1.3, and ``Delivery.delete`` of a retained downlink rule).
The store is bounded by a count and a byte total: past either, a new topic
is refused and counted (a topic already stored may always be replaced), so
a flood of distinct topics cannot grow the gateway's memory.  Filled from a
compacted Kafka topic at start (docs/downlink.md); this module only holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from gateway.protocols.mqtt.properties import Properties


class Retained(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    properties: Properties | None = None  # MQTT 5 properties to send with it
    expires: float = 0.0  # MQTT 5 message expiry: time.monotonic() deadline, 0.0 for none


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: Retained | None = None


class RetainedStore:
    def __init__(self, *, max_messages: int = 100_000, max_bytes: int = 64 << 20) -> None:
        self.root = _Node()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self.refused = 0  # new topics refused at a bound

    def __len__(self) -> int:
        return self.count

    def set(self, message: Retained) -> bool:
        """Keep ``message`` (or delete the topic's when the payload is empty); False: refused."""
        if not message.payload:
            self.delete(message.topic)
            return True
        levels = message.topic.split("/")
        node = self.root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                break
            node = child
        else:
            if node.message is not None:
                self.bytes += len(message.payload) - len(node.message.payload)
                node.message = message
                return True
        if self.count >= self.max_messages or self.bytes + len(message.payload) > self.max_bytes:
            self.refused += 1
            return False
        node = self.root
        for level in levels:
            node = node.children.setdefault(level, _Node())
        node.message = message
        self.count += 1
        self.bytes += len(message.payload)
        return True

    def delete(self, topic: str) -> bool:
        node = self.root
        path: list[tuple[_Node, str]] = []
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.message is None:
            return False
        self.count -= 1
        self.bytes -= len(node.message.payload)
        node.message = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]
        return True

    def get(self, topic: str) -> Retained | None:
        node: _Node | None = self.root
        for level in topic.split("/"):
            node = node.children.get(level) if node is not None else None
        return node.message if node is not None else None

    def match(self, levels: tuple[str, ...] | list[str]) -> list[Retained]:
        """Every retained message whose topic the filter ``levels`` matches."""
        out: list[Retained] = []
        stack: list[tuple[_Node, int]] = [(self.root, 0)]
        n = len(levels)
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.message is not None:
                    out.append(node.message)
                continue
            level = levels[i]
            if level == "#":
                out.extend(_subtree(node, skip_dollar=i == 0))
            elif level == "+":
                for name, child in node.children.items():
                    if not (i == 0 and name.startswith("$")):  # [MQTT-4.7.2-1]
                        stack.append((child, i + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, i + 1))
        return out


def _subtree(node: _Node, skip_dollar: bool) -> Iterator[Retained]:
    """``#`` below ``node``: the node itself (the parent level) and everything under it."""
    if node.message is not None:
        yield node.message
    stack = [
        child for name, child in node.children.items()
        if not (skip_dollar and name.startswith("$"))
    ]
    while stack:
        current = stack.pop()
        if current.message is not None:
            yield current.message
        stack.extend(current.children.values())
