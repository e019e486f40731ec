"""YAML with line numbers, and msgspec errors mapped back to file:line:key.

Operators edit YAML by hand; an error that says only "expected int" is useless.
We compose the YAML into nodes (which remember their marks), build plain Python
data, and keep a map from key path to line so that a msgspec ValidationError
(which reports a path like ``$.listeners.mqtt.port``) can name the line.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
import yaml

from gateway.errors import ConfigError

T = TypeVar("T")

PathKey = tuple[str | int, ...]


class SourceMap:
    """Key path -> 1-based line, for one YAML document."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[PathKey, int] = {}
        # PyYAML keeps the last duplicate key silently; an operator never means that.
        self.duplicates: list[tuple[PathKey, int]] = []

    def line_of(self, path: PathKey) -> int | None:
        # Walk up until a known node: an unknown key's parent is still a good hint.
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, message: str, path: PathKey = ()) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line_of(path), key=format_path(path))


def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def build(node: yaml.Node, path: PathKey, smap: SourceMap) -> Any:
    """Plain data from a composed node, recording each key path's line in ``smap``."""
    smap.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            child = (*path, str(key))
            if key in result:
                smap.duplicates.append((child, key_node.start_mark.line + 1))
            smap.lines[child] = key_node.start_mark.line + 1
            result[key] = build(value_node, child, smap)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [build(item, (*path, i), smap) for i, item in enumerate(node.value)]
    return _scalar(node)


# LibYAML composes ~10x faster (a reload of 1,000 rules); its nodes carry the same marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_constructor = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node) -> Any:
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    # The safe constructor turns ints, bools and nulls into values exactly as PyYAML would.
    value = _constructor.construct_object(node, deep=True)
    _constructor.constructed_objects.clear()
    return value


def compose(text: str, file: str) -> yaml.Node | None:
    """Compose one YAML document; a syntax error names file and line."""
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        # For an unclosed quote or bracket the error is at the end; where it began helps more.
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            problem = f"{problem} ({context} at line {context_mark.line + 1})"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from exc


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document; return plain data and its source map.

    A duplicate key is an error here; callers that want to report every
    problem at once use ``compose`` and ``build`` and read ``smap.duplicates``.
    """
    smap = SourceMap(file)
    node = compose(text, file)
    if node is None:
        return {}, smap
    data = build(node, (), smap)
    if smap.duplicates:
        path, line = smap.duplicates[0]
        raise ConfigError("duplicate key", file=file, line=line, key=format_path(path))
    return data, smap


_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_TOKEN_RE = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\['([^']*)'\]|(\[\.\.\.\])")
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_MISSING_RE = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def split_error(text: str) -> tuple[str, PathKey]:
    """msgspec's 'message - at `$.a[1].b`' -> ('message', ('a', 1, 'b'))."""
    path: PathKey = ()
    m = _PATH_RE.search(text)
    if m:
        text = text[: m.start()]
        parts: list[str | int] = []
        for attr, index, quoted, anykey in _TOKEN_RE.findall(m.group("path")):
            if anykey:
                parts.append(ANY_KEY)
            elif index:
                parts.append(int(index))
            else:
                parts.append(attr or quoted)
        path = tuple(parts)
    if unknown := _UNKNOWN_RE.search(text):
        return "unknown key (check spelling)", (*path, unknown.group("field"))
    if missing := _MISSING_RE.search(text):
        return "required key missing", (*path, missing.group("field"))
    return text, path


ANY_KEY = "[...]"


def _resolve_any_key(data: Any, path: PathKey, message: str) -> PathKey:
    """msgspec reports a bad dict entry as ``[...]``; find which key it was."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(path):
        if part == ANY_KEY and isinstance(node, dict):
            rest = path[i + 1:]
            candidates = [k for k, v in node.items() if _has_path(v, rest)] or list(node)
            quoted = [k for k in candidates if repr(_get(node[k], rest)) in message]
            part = (quoted or candidates or [part])[0]
        out.append(part)
        node = _get(node, (part,))
    return tuple(out)


def _get(node: Any, path: PathKey) -> Any:
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _has_path(node: Any, path: PathKey) -> bool:
    for part in path:
        if part == ANY_KEY:
            return isinstance(node, dict)
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            node = node[part]
        else:
            return False
    return True


def locate(exc: msgspec.ValidationError, data: Any) -> tuple[str, PathKey]:
    """The message and the exact key path of a validation error on ``data``."""
    message, path = split_error(str(exc))
    if ANY_KEY in path:
        path = _resolve_any_key(data, path, message)
    return message, path


def convert(data: Any, kind: type[T], smap: SourceMap, base: PathKey = ()) -> T:
    """msgspec.convert with errors naming file, line and key path."""
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        message, path = locate(exc, data)
        raise smap.error(message, (*base, *path)) from exc
