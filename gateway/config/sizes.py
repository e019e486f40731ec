"""Byte sizes in the config: a plain int is bytes; a string may carry a unit.

``512MiB``, ``1GiB``, ``64KiB`` (powers of 1024; Kubernetes' ``Mi``/``Gi`` too),
``10MB``, ``1kB`` (powers of 1000), ``100B``; a space before the unit is allowed.
A field takes units when the schema marks it ``BYTES`` (gateway/config/schema.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
import msgspec.inspect as mi

# The mark on a schema field: Annotated[int, BYTES] (with any other Meta beside it).
BYTES = msgspec.Meta(extra={"unit": "bytes"})

UNITS: dict[str, int] = {
    "": 1, "B": 1,
    "kB": 1000, "KB": 1000, "k": 1000, "MB": 1000**2, "M": 1000**2,
    "GB": 1000**3, "G": 1000**3, "TB": 1000**4, "T": 1000**4,
    "KiB": 1 << 10, "Ki": 1 << 10, "MiB": 1 << 20, "Mi": 1 << 20,
    "GiB": 1 << 30, "Gi": 1 << 30, "TiB": 1 << 40, "Ti": 1 << 40,
}
HELP = ("give bytes (1048576) or a number with a unit: B, kB, MB, GB, TB (powers of 1000) "
        "or KiB, MiB, GiB, TiB (powers of 1024)")
_SIZE = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*")


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    """``"512MiB"`` -> 536870912; a SizeError names what is wrong and what is accepted."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise SizeError(f"invalid size {text!r}: {HELP}")
    unit = m.group("unit")
    if unit not in UNITS:
        raise SizeError(f"unknown unit {unit!r} in {text!r}: {HELP}")
    try:
        value = Decimal(m.group("number")) * UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only digits
        raise SizeError(f"invalid size {text!r}: {HELP}") from exc
    if value != value.to_integral_value():
        raise SizeError(f"{text!r} is not a whole number of bytes")
    return int(value)


PathKey = tuple[str | int, ...]
ANY = object()  # a dict's values, whatever their keys


def size_paths(kind: Any) -> list[tuple[object, ...]]:
    """Key paths of every field marked BYTES under the struct type ``kind``."""
    return list(_walk(mi.type_info(kind), ()))


def _walk(t: mi.Type, path: tuple[object, ...]) -> Iterator[tuple[object, ...]]:
    if isinstance(t, mi.Metadata):
        if (t.extra or {}).get("unit") == "bytes":
            yield path
        yield from _walk(t.type, path)
    elif isinstance(t, mi.StructType):
        for f in t.fields:
            yield from _walk(f.type, (*path, f.encode_name))
    elif isinstance(t, mi.DictType):
        yield from _walk(t.value_type, (*path, ANY))
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            yield from _walk(member, path)


def convert_sizes(data: Any, paths: list[tuple[object, ...]]) -> Iterator[tuple[PathKey, str]]:
    """Replace size strings in ``data`` by their bytes, in place; remove bad ones (their
    defaults apply) and yield (path, error) for each."""
    for pattern in paths:
        yield from _convert(data, pattern, ())


def _convert(node: Any, rest: tuple[object, ...], at: PathKey) -> Iterator[tuple[PathKey, str]]:
    if not isinstance(node, dict) or not rest:
        return
    head, tail = rest[0], rest[1:]
    keys: list[str] = list(node) if head is ANY else [str(head)] if head in node else []
    for key in keys:
        if tail:
            yield from _convert(node[key], tail, (*at, key))
        elif isinstance(node[key], str):
            try:
                node[key] = parse_size(node[key])
            except SizeError as exc:
                del node[key]
                yield (*at, key), str(exc)
