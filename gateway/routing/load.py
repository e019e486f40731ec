"""Read a rules directory as one whole: every file parsed, every error collected.

The set is validated as a whole before it can replace the running rules, and
the operator gets every error in one go rather than one per edit-deploy cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path as FsPath
from typing import Any

from gateway.config.yamlsrc import format_path
from gateway.errors import ConfigError
from gateway.routing.compile import (
    CompiledRule,
    DeadLetter,
    RuleTable,
    check_dead_letter,
    compile_rule,
)
from gateway.routing.downlink import DownlinkRule, DownlinkRules, DownlinkSpec, compile_downlink
from gateway.routing.rules import (
    DeadLetterSpec,
    FileSpec,
    RuleError,
    RulesError,
    RuleSpec,
    SourceMap,
    Unmatched,
    convert,
    parse_yaml,
)

GLOBALS = ("dead_letter", "unmatched")


class _Collected:
    """What the first pass over all files found, before anything is compiled."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.rules: list[tuple[RuleSpec, SourceMap, int]] = []
        self.downlink: list[tuple[DownlinkSpec, SourceMap, int]] = []
        self.globals: dict[str, tuple[Any, SourceMap]] = {}
        self.digest = hashlib.sha256()


def rule_files(directory: FsPath) -> list[FsPath]:
    # Dot files are editor swap files and Kubernetes ConfigMap internals (..data).
    return sorted(
        (p for p in directory.iterdir() if p.suffix == ".yaml" and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _read_file(path: FsPath, found: _Collected) -> None:
    file = str(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        found.errors.append(RuleError(f"cannot read: {exc}", file=file, line=None))
        return
    found.digest.update(path.name.encode() + b"\0" + raw + b"\0")
    try:
        data, smap = parse_yaml(text, file)
    except RuleError as exc:
        found.errors.append(exc)
        return
    if data == {} and not text.strip(" \t\r\n{}"):
        # Usually a file caught mid-write by the watcher; "rules: []" says "no rules" on purpose.
        found.errors.append(RuleError("file is empty; write 'rules: []'", file=file, line=1))
        return
    if not isinstance(data, dict):
        found.errors.append(RuleError("expected a mapping with 'rules:'", file=file, line=1))
        return
    spec = convert(data, FileSpec, smap, ())
    labels: list[str] = []
    down_labels: list[str] = []
    if spec is not None:
        _collect_globals(spec, smap, found)
        for i, item in enumerate(spec.rules):
            name = item.get("name") if isinstance(item, dict) else None
            labels.append(name if isinstance(name, str) else f"rules[{i}]")
            rule = convert(item, RuleSpec, smap, ("rules", i), labels[i])
            if rule is not None:
                found.rules.append((rule, smap, i))
        for i, item in enumerate(spec.downlink):
            name = item.get("name") if isinstance(item, dict) else None
            down_labels.append(name if isinstance(name, str) else f"downlink[{i}]")
            down = convert(item, DownlinkSpec, smap, ("downlink", i), down_labels[i])
            if down is not None:
                found.downlink.append((down, smap, i))
    for dup, line in smap.duplicates:
        section = {"rules": labels, "downlink": down_labels}.get(str(dup[0]))
        index = dup[1] if len(dup) > 2 and section is not None else None
        label = (
            section[index]
            if section is not None and isinstance(index, int) and index < len(section)
            else ""
        )
        key = format_path(dup[2:] if index is not None else dup)
        smap.errors.append(
            RuleError("duplicate key", file=smap.file, line=line, rule=label, key=key)
        )
    found.errors.extend(smap.errors)


def _collect_globals(spec: FileSpec, smap: SourceMap, found: _Collected) -> None:
    for key in GLOBALS:
        value = getattr(spec, key)
        if value is None:
            continue
        if key in found.globals:
            first = found.globals[key][1]
            where = f"{first.file}:{first.line_of((key,))}"
            smap.errors.append(smap.error(f"set twice; first set at {where}", (key,)))
            continue
        found.globals[key] = (value, smap)


def _globals(found: _Collected) -> tuple[DeadLetter | None, str]:
    dead_letter = None
    if "dead_letter" in found.globals:
        data, smap = found.globals["dead_letter"]
        spec = convert(data, DeadLetterSpec, smap, ("dead_letter",))
        if spec is not None:
            for message, path in check_dead_letter(spec.cluster, spec.topic):
                smap.errors.append(smap.error(message, path))
            dead_letter = DeadLetter(spec.cluster, spec.topic)
    unmatched = "dead-letter" if "dead_letter" in found.globals else "reject"
    if "unmatched" in found.globals:
        data, smap = found.globals["unmatched"]
        value = convert(data, Unmatched, smap, ("unmatched",))  # type: ignore[arg-type]
        if value == "dead-letter" and "dead_letter" not in found.globals:
            smap.errors.append(smap.error("dead-letter needs a global dead_letter", ("unmatched",)))
        unmatched = value or unmatched
    for _, smap in found.globals.values():
        found.errors.extend(e for e in smap.errors if e not in found.errors)
    return dead_letter, unmatched


def _compile_all(found: _Collected, has_dead_letter: bool) -> list[CompiledRule]:
    compiled: list[CompiledRule] = []
    seen: dict[str, CompiledRule] = {}
    for index, (spec, smap, i) in enumerate(found.rules):
        base = ("rules", i)
        line = smap.line_of(base)
        rule, problems = compile_rule(spec, index, smap.file, line, has_dead_letter)
        if spec.name in seen:
            first = seen[spec.name]
            problems.append((f"duplicate rule name; first at {first.file}:{first.line}", ("name",)))
        seen.setdefault(spec.name, rule)
        for message, path in problems:
            found.errors.append(smap.error(message, (*base, *path), spec.name, 2))
        compiled.append(rule)
    return compiled


def _compile_downlink(found: _Collected) -> DownlinkRules:
    compiled: list[DownlinkRule] = []
    seen: dict[str, DownlinkRule] = {}
    for index, (spec, smap, i) in enumerate(found.downlink):
        base = ("downlink", i)
        rule, problems = compile_downlink(spec, index, smap.file, smap.line_of(base))
        if spec.name in seen:
            first = seen[spec.name]
            problems.append((
                f"duplicate downlink rule name; first at {first.file}:{first.line}", ("name",)))
        seen.setdefault(spec.name, rule)
        for message, path in problems:
            found.errors.append(smap.error(message, (*base, *path), spec.name, 2))
        compiled.append(rule)
    return DownlinkRules(compiled)


def load_rules(directory: str | FsPath, clusters: Collection[str] | None = None) -> RuleTable:
    """Load, validate and compile every ``*.yaml`` in ``directory`` (name order).

    ``clusters``: the Kafka clusters the gateway has; a rule naming another is an
    error (at startup and on every reload alike).  Raises RulesError listing every
    problem found; nothing is half-loaded.
    """
    path = FsPath(directory)
    if not path.is_dir():
        raise RulesError([RuleError("rules directory not found", file=str(path), line=None)])
    files = rule_files(path)
    if not files:
        raise RulesError([RuleError("no *.yaml rule files", file=str(path), line=None)])
    found = _Collected()
    for file in files:
        _read_file(file, found)
    dead_letter, unmatched = _globals(found)
    compiled = _compile_all(found, dead_letter is not None)
    downlink = _compile_downlink(found)
    if clusters is not None:
        for rule in compiled:
            if rule.action == "kafka" and rule.cluster not in clusters:
                found.errors.append(RuleError(
                    f"no Kafka cluster '{rule.cluster}' in the gateway config "
                    f"(has: {', '.join(sorted(clusters))})",
                    file=rule.file, line=rule.line, rule=rule.name, key="kafka.cluster"))
        for down in downlink.rules:
            if down.cluster not in clusters:
                found.errors.append(RuleError(
                    f"no Kafka cluster '{down.cluster}' in the gateway config "
                    f"(has: {', '.join(sorted(clusters))})",
                    file=down.file, line=down.line, rule=down.name, key="kafka.cluster"))
        if dead_letter is not None and dead_letter.cluster not in clusters:
            found.errors.append(RuleError(
                f"no Kafka cluster '{dead_letter.cluster}' in the gateway config",
                file=str(path), line=None, key="dead_letter.cluster"))
    if found.errors:
        # File then line order reads like the files themselves.
        found.errors.sort(key=lambda e: (e.file, e.line or 0))
        raise RulesError(found.errors)
    return RuleTable(
        compiled,
        version=found.digest.hexdigest()[:12],
        files=tuple(f.name for f in files),
        dead_letter=dead_letter,
        unmatched=unmatched,
        downlink=downlink,
    )
