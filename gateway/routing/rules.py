"""The rules language as data: msgspec schema, YAML with line numbers, errors.

Operators edit these files by hand every day, so every error must say where:
file, line, rule name and key path.  PyYAML's composer keeps a mark on every
node; we build plain data from the nodes and remember the line of each key
path, then map msgspec's ``$.kafka.topc``-style error paths back to a line.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec
import yaml

from gateway.errors import ConfigError

SourceName = Literal["mqtt", "http", "bridge"]
Unmatched = Literal["dead-letter", "reject", "drop"]
Path = tuple[str | int, ...]
T = TypeVar("T")


class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class MatchSpec(_Spec):
    topic: str
    source: SourceName | list[SourceName] | None = None
    client_id: str | list[str] | None = None
    username: str | list[str] | None = None


class KafkaSpec(_Spec):
    topic: str
    cluster: str = "default"
    # UNSET means "the default key" ({client_id}); null means "no key".
    key: str | msgspec.UnsetType | None = msgspec.UNSET
    headers: dict[str, str] = {}


class PayloadSpec(_Spec):
    format: Literal["raw", "json"] = "raw"
    max_bytes: int | None = None
    on_invalid: Literal["dead-letter", "reject"] | None = None


class AllowSpec(_Spec):
    usernames: list[str] = []
    client_ids: list[str] = []
    identities: list[str] = []


class RuleSpec(_Spec):
    name: str
    match: str | MatchSpec
    action: Literal["kafka", "drop", "reject"] = "kafka"
    reason: str | None = None
    kafka: KafkaSpec | None = None
    payload: PayloadSpec | None = None
    allow: AllowSpec | None = None
    continue_: bool = msgspec.field(default=False, name="continue")


class DeadLetterSpec(_Spec):
    topic: str
    cluster: str = "default"


class FileSpec(_Spec):
    # Rules and globals are converted one by one so one bad rule does not hide the next.
    rules: list[Any] = []
    dead_letter: Any = None
    unmatched: Any = None


class RuleError(ConfigError):
    """One problem in the rules, located as file:line: rule: key: message."""

    def __init__(
        self, message: str, *, file: str, line: int | None, rule: str = "", key: str = ""
    ) -> None:
        super().__init__(message, file=file, line=line, key=key)
        self.rule = rule
        self.detail = message
        where = f"{file}:{line}" if line is not None else file
        text = ": ".join(p for p in (where, rule, key, message) if p)
        self.message = text
        self.args = (text,)

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "rule": self.rule,
            "key": self.key,
            "message": self.detail,
        }


class RulesError(ConfigError):
    """The rules are invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[ConfigError]) -> None:
        lines = "\n".join(str(e) for e in errors)
        super().__init__(f"{len(errors)} error(s) in routing rules:\n{lines}")
        self.errors = errors


class SourceMap:
    """Key path -> 1-based line for one YAML file, and a factory for located errors."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path, int] = {}
        self.errors: list[ConfigError] = []
        self.duplicates: list[tuple[Path, int]] = []  # reported once rule names are known

    def line_of(self, path: Path) -> int | None:
        # An unknown or missing key has no node; its parent's line is the best hint.
        while path not in self.lines:
            if not path:
                return None
            path = path[:-1]
        return self.lines[path]

    def error(self, message: str, path: Path, rule: str = "", base: int = 0) -> RuleError:
        """An error at ``path``; the key shown drops the first ``base`` parts (rules[i])."""
        return RuleError(
            message,
            file=self.file,
            line=self.line_of(path),
            rule=rule,
            key=format_path(path[base:]),
        )


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _build(node: yaml.Node, path: Path, smap: SourceMap) -> Any:
    smap.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            child = (*path, str(key))
            if key in result:
                # PyYAML keeps the last duplicate silently; an operator never means that.
                smap.duplicates.append((child, key_node.start_mark.line + 1))
            smap.lines[child] = key_node.start_mark.line + 1
            result[key] = _build(value_node, child, smap)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), smap) for i, item in enumerate(node.value)]
    return _scalar(node)


# LibYAML composes ~10x faster, which keeps a reload of 1,000 rules off the event loop's
# critical path; its nodes carry the same marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_constructor = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node) -> Any:
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    # The safe constructor turns ints, bools and nulls into values exactly as PyYAML would.
    value = _constructor.construct_object(node, deep=True)
    _constructor.constructed_objects.clear()
    return value


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain data and its source map."""
    smap = SourceMap(file)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        # For an unclosed quote or bracket the error is at the end; where it began helps more.
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            problem = f"{problem} ({context} at line {context_mark.line + 1})"
        raise RuleError(f"invalid YAML: {problem}", file=file, line=line) from exc
    if node is None:
        return {}, smap
    return _build(node, (), smap), smap


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_TOKEN = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\['([^']*)'\]|\[\.\.\.\]")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def split_validation_error(text: str) -> tuple[str, Path]:
    """msgspec's 'message - at `$.a[1].b`' -> ('message', ('a', 1, 'b'))."""
    path: list[str | int] = []
    m = _AT.search(text)
    if m:
        text = text[: m.start()]
        for attr, index, quoted in _TOKEN.findall(m.group("path")):
            if index:
                path.append(int(index))
            elif attr or quoted:
                path.append(attr or quoted)
    if unknown := _UNKNOWN.search(text):
        return "unknown key (check spelling)", (*path, unknown.group("field"))
    if missing := _MISSING.search(text):
        return "required key missing", (*path, missing.group("field"))
    return text, tuple(path)


def convert(data: Any, kind: type[T], smap: SourceMap, base: Path, rule: str = "") -> T | None:
    """msgspec.convert that records a located error and returns None on failure."""
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        message, path = split_validation_error(str(exc))
        skip = len(base) if base and base[0] == "rules" else 0
        smap.errors.append(smap.error(message, (*base, *path), rule, skip))
        return None
