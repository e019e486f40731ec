"""The rules language as data: msgspec schema, located errors.

Operators edit these files by hand every day, so every error must say where:
file, line, rule name and key path.  The YAML parsing and the mapping of
msgspec's ``$.kafka.topc``-style error paths back to a line are
``gateway.config.yamlsrc``'s; this module only collects errors instead of
raising the first, and adds the rule name to each.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from gateway.config import yamlsrc
from gateway.config.sizes import BYTES, convert_sizes, size_paths
from gateway.config.yamlsrc import format_path
from gateway.errors import ConfigError

SourceName = Literal["mqtt", "http", "bridge"]
Unmatched = Literal["dead-letter", "reject", "drop"]
Path = yamlsrc.PathKey
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
    # Stamp lastmile-client-id, -session and -seq headers (docs/rules.md, "Sequence stamps").
    sequence: bool = False
    # Add the publish's QoS, retain flag and MQTT 5 properties as mqtt-* headers
    # (gateway/routing/mqtt_headers.py; docs/rules.md, "MQTT 5 properties").
    mqtt_properties: bool = False


class PayloadSpec(_Spec):
    format: Literal["raw", "json"] = "raw"
    max_bytes: Annotated[int, BYTES] | None = None  # or "64KiB" (gateway/config/sizes.py)
    on_invalid: Literal["dead-letter", "reject"] | None = None


class AllowSpec(_Spec):
    usernames: list[str] = []
    identities: list[str] = []
    claims: dict[str, list[str]] = {}
    # No longer accepted (a client id is the client's own choice); read only to say so.
    client_ids: list[str] | msgspec.UnsetType = msgspec.UNSET


class RuleSpec(_Spec):
    name: str
    match: str | MatchSpec
    action: Literal["kafka", "drop", "reject", "deny"] = "kafka"
    reason: str | None = None
    kafka: KafkaSpec | None = None
    payload: PayloadSpec | None = None
    allow: AllowSpec | None = None
    where: dict[str, list[str]] | None = None
    # high: spooled apart and drained first after an outage (docs/spool.md, priority drain).
    priority: Literal["high", "normal"] = "normal"
    continue_: bool = msgspec.field(default=False, name="continue")


class DeadLetterSpec(_Spec):
    topic: str
    cluster: str = "default"


class FileSpec(_Spec):
    # Rules and globals are converted one by one so one bad rule does not hide the next.
    rules: list[Any] = []
    # Kafka -> MQTT rules (gateway.routing.downlink), beside the uplink ones.
    downlink: list[Any] = []
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


class SourceMap(yamlsrc.SourceMap):
    """Key path -> line for one rules file; collects located errors instead of raising."""

    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.errors: list[ConfigError] = []

    def error(self, message: str, path: Path = (), rule: str = "", base: int = 0) -> RuleError:
        """An error at ``path``; the key shown drops the first ``base`` parts (rules[i])."""
        return RuleError(
            message,
            file=self.file,
            line=self.line_of(path),
            rule=rule,
            key=format_path(path[base:]),
        )


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one rules file into plain data and its source map (duplicates recorded)."""
    smap = SourceMap(file)
    try:
        node = yamlsrc.compose(text, file)
    except ConfigError as exc:
        raise RuleError(exc.reason, file=file, line=exc.line) from exc
    if node is None:
        return {}, smap
    return yamlsrc.build(node, (), smap), smap


def convert(data: Any, kind: type[T], smap: SourceMap, base: Path, rule: str = "") -> T | None:
    """msgspec.convert that records a located error and returns None on failure."""
    skip = len(base) if base and base[0] in ("rules", "downlink") else 0
    if kind not in _SIZE_PATHS:
        _SIZE_PATHS[kind] = size_paths(kind)
    bad_sizes = list(convert_sizes(data, _SIZE_PATHS[kind]))  # "64KiB" -> 65536
    for path, message in bad_sizes:
        smap.errors.append(smap.error(message, (*base, *path), rule, skip))
    try:
        value = msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        message, path = yamlsrc.locate(exc, data)
        smap.errors.append(smap.error(message, (*base, *path), rule, skip))
        return None
    return None if bad_sizes else value


_SIZE_PATHS: dict[Any, list[tuple[object, ...]]] = {}
