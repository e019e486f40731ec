"""Matching primitives: MQTT topic filters in a trie, globs, allow lists.

The trie makes the cost of matching a topic grow with its number of levels,
not with the number of rules.  Each filter is stored with its rule's position
in file order, and `match` returns positions sorted, so first-match and
`continue` keep the order operators wrote.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.model import Message
from gateway.routing.templates import BUILTINS, is_identifier

# A level that holds wildcards or braces anywhere but alone is almost always a typo.
_SPECIAL = frozenset("+#{}")


class FilterError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TopicFilter:
    text: str
    levels: tuple[str, ...]  # named captures are stored as "+"
    captures: tuple[tuple[str, int], ...]  # (name, level index)


def parse_filter(text: str) -> TopicFilter:
    """Parse an MQTT topic filter with optional ``{name}`` single-level captures."""
    if not text:
        raise FilterError("empty topic filter")
    if "\x00" in text:
        raise FilterError("topic filter contains a NUL character")
    raw = text.split("/")
    levels: list[str] = []
    captures: list[tuple[str, int]] = []
    for i, level in enumerate(raw):
        if level == "#":
            if i != len(raw) - 1:
                raise FilterError(f"'#' must be the last level in {text!r}")
        elif level.startswith("{") and level.endswith("}") and len(level) > 2:
            name = level[1:-1]
            if not is_identifier(name):
                raise FilterError(f"capture name {name!r} must be letters, digits and '_'")
            if name in BUILTINS:
                raise FilterError(f"capture name {{{name}}} hides the built-in variable")
            if any(name == n for n, _ in captures):
                raise FilterError(f"capture {{{name}}} appears twice in {text!r}")
            captures.append((name, i))
            level = "+"
        elif level != "+" and _SPECIAL.intersection(level):
            raise FilterError(f"level {level!r}: '+', '#' and '{{name}}' must fill a whole level")
        levels.append(level)
    return TopicFilter(text, tuple(levels), tuple(captures))


class _Node:
    __slots__ = ("children", "hash_rules", "plus", "rules")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.rules: list[int] = []  # filters that end exactly here
        self.hash_rules: list[int] = []  # filters ending in '#' below this node


class Trie:
    """Topic filters -> rule indexes.  ``match`` returns indexes in rule order."""

    def __init__(self, filters: Iterable[tuple[int, tuple[str, ...]]] = ()) -> None:
        self.root = _Node()
        for index, levels in filters:
            self.add(index, levels)

    def add(self, index: int, levels: tuple[str, ...]) -> None:
        node = self.root
        for level in levels:
            if level == "#":
                node.hash_rules.append(index)
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                node = node.children.setdefault(level, _Node())
        node.rules.append(index)

    def match(self, levels: list[str]) -> list[int]:
        out: list[int] = []
        n = len(levels)
        # MQTT: wildcards at the first level never match topics starting with '$'.
        dollar = levels[0].startswith("$")
        stack: list[tuple[_Node, int]] = [(self.root, 0)]
        while stack:
            node, i = stack.pop()
            wild = not (dollar and i == 0)
            if node.hash_rules and wild:
                out.extend(node.hash_rules)  # '#' also matches the parent level
            if i == n:
                out.extend(node.rules)
                continue
            child = node.children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.plus is not None and wild:
                stack.append((node.plus, i + 1))
        if len(out) > 1:
            out.sort()
        return out


class Glob:
    """Shell-style patterns (``*``, ``?``, ``[ab]``); a plain name is compared exactly."""

    __slots__ = ("exact", "patterns", "regex")

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = tuple(patterns)
        exact = [p for p in patterns if not _is_glob(p)]
        globs = [p for p in patterns if _is_glob(p)]
        self.exact = frozenset(exact)
        self.regex = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if value in self.exact:
            return True
        return self.regex is not None and self.regex.match(value) is not None


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class Patterns:
    """Globs that may name the rule's captures: ``plant-*``, ``{device}``, ``plant-{plant}``.

    A captured value is matched literally (a topic level ``*`` matches only the
    name ``*``), and an empty one matches nobody: ``devices//x`` names no device.
    """

    __slots__ = ("dynamic", "static")

    def __init__(self, static: list[str], dynamic: list[list[str]]) -> None:
        self.static = Glob(static)
        # Literal text at even indexes, capture names at odd ones (templates.split_fields).
        self.dynamic = tuple(tuple(pieces) for pieces in dynamic)

    def __bool__(self) -> bool:
        return bool(self.static.patterns or self.dynamic)

    def matches(self, value: str | None, captures: Mapping[str, str]) -> bool:
        if not value:  # None (anonymous) or an empty name never matches
            return False
        if self.static.matches(value):
            return True
        return any(_matches_rendered(p, value, captures) for p in self.dynamic)


def _matches_rendered(pieces: tuple[str, ...], value: str, captures: Mapping[str, str]) -> bool:
    parts = []
    for i, piece in enumerate(pieces):
        if i % 2:
            captured = captures[piece]
            if not captured:
                return False
            parts.append(glob.escape(captured))
        else:
            parts.append(piece)
    return fnmatch.fnmatchcase(value, "".join(parts))


class Allow:
    """Who may publish under a rule: a verified username, certificate identity, or JWT claims.

    Never the client id: a client chooses its own, so it proves nothing.
    """

    __slots__ = ("claims", "identities", "usernames")

    def __init__(
        self, usernames: Patterns, identities: Patterns, claims: list[tuple[str, Patterns]]
    ) -> None:
        self.usernames = usernames
        self.identities = identities
        self.claims = tuple(claims)

    def permits(self, message: Message, captures: Mapping[str, str]) -> bool:
        if self.usernames.matches(message.username, captures):
            return True
        if self.identities.matches(message.cert_identity, captures):
            return True
        claims = message.claims
        if not self.claims or not claims:
            return False
        # Every named claim must match one of its globs.
        return all(p.matches(claims.get(name), captures) for name, p in self.claims)
