"""Templates for Kafka topics, keys and headers: parsed once at load time.

A template is text with ``{variable}`` fields; ``{{`` and ``}}`` stand for
literal braces.  Parsing happens when the rules load, so a typo in a variable
name is an operator-facing load error, never a surprise at 3 a.m. on a
device's publish.  Rendering is a join over precomputed parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.model import Message

# Variables every rule may use, whatever its match filter.
BUILTINS = frozenset({"topic", "client_id", "username", "source", "qos"})
# Built-ins fixed by (topic, source): with the captures, what a routing-cache entry may pre-render.
PER_TOPIC = frozenset({"topic", "source"})
USER_PROPERTY = "user_property."
CLAIM = "claim."
JSON = "json:"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class TemplateError(ValueError):
    """A template that cannot be compiled; the loader adds file, line and key."""


class Context:
    """What a template may read while one message is routed."""

    __slots__ = ("captures", "document", "message")

    def __init__(self, message: Message, captures: dict[str, str], document: Any) -> None:
        self.message = message
        self.captures = captures
        # The decoded JSON payload, or None when the rule does not ask for JSON.
        self.document = document


Getter = Callable[[Context], str]


def _user_property(name: str) -> Getter:
    def get(ctx: Context) -> str:
        # MQTT 5 allows a name to repeat; the first one wins, like most brokers.
        for key, value in ctx.message.user_properties:
            if key == name:
                return value
        return ""

    return get


def _claim(name: str) -> Getter:
    # Claims come from a verified JWT only; a client without one renders empty (the
    # router refuses a Kafka topic that needs a claim the client lacks).
    def get(ctx: Context) -> str:
        claims = ctx.message.claims
        return claims.get(name, "") if claims is not None else ""

    return get


def _json_pointer(pointer: str) -> Getter:
    # RFC 6901: "~1" is "/" and "~0" is "~", decoded in that order.
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]

    def get(ctx: Context) -> str:
        node = ctx.document
        for token in tokens:
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise LookupError(f"JSON pointer {pointer} not found in payload")
        if isinstance(node, str):
            return node
        if node is None or isinstance(node, dict | list):
            raise LookupError(f"JSON pointer {pointer} is not a string or number")
        if isinstance(node, bool):
            return "true" if node else "false"
        return str(node)

    return get


def _builtin(name: str) -> Getter:
    if name == "topic":
        return lambda ctx: ctx.message.topic
    if name == "client_id":
        return lambda ctx: ctx.message.client_id
    if name == "username":
        return lambda ctx: ctx.message.username or ""
    if name == "source":
        return lambda ctx: ctx.message.source
    return lambda ctx: str(ctx.message.qos)


def _capture(name: str) -> Getter:
    return lambda ctx: ctx.captures[name]


class Template:
    """A compiled template: literal text and getters, rendered by one join."""

    __slots__ = ("claims", "constant", "parts", "source", "uses_json", "variables")

    def __init__(self, source: str, parts: list[str | Getter], variables: list[str]) -> None:
        self.source = source
        self.parts = tuple(parts)
        self.variables = tuple(variables)
        self.uses_json = any(v.startswith(JSON) for v in variables)
        self.claims = tuple(v[len(CLAIM) :] for v in variables if v.startswith(CLAIM))
        # Most templates are fixed text ("bench") or one variable; skip the join then.
        self.constant: str | None = None if variables else self.literal_text()

    def render(self, ctx: Context) -> str:
        if self.constant is not None:
            return self.constant
        parts = self.parts
        if len(parts) == 1:
            return parts[0](ctx)  # type: ignore[operator]
        return "".join(p if isinstance(p, str) else p(ctx) for p in parts)

    def per_topic(self, captures: Iterable[str]) -> bool:
        """True when the rendered text depends only on the topic, the source and captures."""
        return all(v in PER_TOPIC or v in captures for v in self.variables)

    def literal_text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


def split_fields(source: str) -> tuple[list[str], set[int]]:
    """Split into literal text and variable names; odd indexes are variables."""
    out: list[str] = []
    text: list[str] = []
    i = 0
    while i < len(source):
        ch = source[i]
        if source.startswith("{{", i) or source.startswith("}}", i):
            text.append(ch)
            i += 2
        elif ch == "{":
            end = source.find("}", i)
            if end < 0:
                raise TemplateError(f"unclosed '{{' at position {i + 1} in {source!r}")
            out.append("".join(text))
            out.append(source[i + 1 : end].strip())
            text = []
            i = end + 1
        elif ch == "}":
            raise TemplateError(f"unmatched '}}' at position {i + 1}; write '}}}}' for a brace")
        else:
            text.append(ch)
            i += 1
    out.append("".join(text))
    return out, set(range(1, len(out), 2))


def _getter(name: str, captures: Iterable[str], allow_json: bool) -> Getter:
    if name in BUILTINS:
        return _builtin(name)
    if name in captures:
        return _capture(name)
    if name.startswith(USER_PROPERTY) and len(name) > len(USER_PROPERTY):
        return _user_property(name[len(USER_PROPERTY) :])
    if name.startswith(CLAIM) and len(name) > len(CLAIM):
        return _claim(name[len(CLAIM) :])
    if name.startswith(JSON):
        pointer = name[len(JSON) :]
        if not allow_json:
            raise TemplateError(f"{{{name}}} is allowed in key and headers only")
        if not pointer.startswith("/"):
            raise TemplateError(f"JSON pointer must start with '/': {{{name}}}")
        return _json_pointer(pointer)
    known = [*sorted({*BUILTINS, *captures}), "user_property.NAME", "claim.NAME",
             "json:/POINTER"]
    raise TemplateError(f"unknown variable {{{name}}}; known: {', '.join(known)}")


def compile_template(source: str, captures: Iterable[str], allow_json: bool = True) -> Template:
    """Parse ``source``; raise TemplateError naming the first bad variable."""
    captures = frozenset(captures)
    pieces, var_idx = split_fields(source)
    parts: list[str | Getter] = []
    variables: list[str] = []
    for i, piece in enumerate(pieces):
        if i in var_idx:
            if not piece:
                raise TemplateError("empty variable '{}'; write '{{}}' for literal braces")
            parts.append(_getter(piece, captures, allow_json))
            variables.append(piece)
        elif piece:
            parts.append(piece)
    return Template(source, parts, variables)


def valid_kafka_topic(name: str) -> bool:
    return _KAFKA_TOPIC.fullmatch(name) is not None and name not in (".", "..")


def check_kafka_topic_template(template: Template) -> None:
    """Refuse at load time what can never render to a legal Kafka topic name."""
    literal = template.literal_text()
    bad = sorted({c for c in literal if not _KAFKA_TOPIC.fullmatch(c)})
    if bad:
        raise TemplateError(
            f"Kafka topic names allow only letters, digits, '.', '_' and '-'; got {bad}"
        )
    if template.constant is not None and not valid_kafka_topic(template.constant):
        raise TemplateError(f"invalid Kafka topic name {template.constant!r}")


def is_identifier(name: str) -> bool:
    return _IDENT.fullmatch(name) is not None
