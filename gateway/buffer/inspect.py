"""``lastmile spool inspect [DIR] [--json]``: what a spool directory holds, read-only.

Safe on a live spool (it never writes, truncates or deletes); on a live spool
the last frame may be mid-write and show as a torn tail.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Any

from gateway.buffer import spool_format as fmt
from gateway.buffer.priority import HIGH_DIR


def inspect_spool(directory: str) -> dict[str, Any]:
    """Records still owed to Kafka, bytes, oldest age, per-topic counts, segments, damage.

    ``directory`` is one worker's spool, or ``spool.dir`` holding ``worker-<n>``
    spools: then the totals are summed and each worker is under ``workers``.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no spool directory at {directory}")
    workers = sorted(n for n in os.listdir(directory)
                     if n.startswith("worker-") and os.path.isdir(os.path.join(directory, n)))
    if workers and not fmt.list_segments(directory):
        return _combine(directory, {n: _inspect_worker(os.path.join(directory, n))
                                    for n in workers})
    return _inspect_worker(directory)


def _inspect_worker(directory: str) -> dict[str, Any]:
    """One worker's spool; its high-priority spool (``high/``) counted in, and under ``high``."""
    report = _inspect_one(directory)
    high_dir = os.path.join(directory, HIGH_DIR)
    if not os.path.isdir(high_dir):
        return report
    high = _inspect_one(high_dir)
    topics: Counter[str] = Counter(report["topics"])
    topics.update(high["topics"])
    ages = [a for a in (report["oldest_record_age_s"], high["oldest_record_age_s"])
            if a is not None]
    report.update(records=report["records"] + high["records"],
                  bytes=report["bytes"] + high["bytes"],
                  oldest_record_age_s=max(ages) if ages else None,
                  topics=dict(sorted(topics.items())),
                  damage=report["damage"] + high["damage"], high=high,
                  empty=report["empty"] and high["empty"])
    return report


def _combine(directory: str, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    topics: Counter[str] = Counter()
    for r in reports.values():
        topics.update(r["topics"])
    ages = [r["oldest_record_age_s"] for r in reports.values()
            if r["oldest_record_age_s"] is not None]
    return {
        "directory": os.path.abspath(directory),
        "records": sum(r["records"] for r in reports.values()),
        "bytes": sum(r["bytes"] for r in reports.values()),
        "oldest_record_age_s": max(ages) if ages else None,
        "topics": dict(sorted(topics.items())),
        "damage": [d for r in reports.values() for d in r["damage"]],
        "empty": all(r["empty"] for r in reports.values()),
        "workers": reports,
    }


# The ledger's state, as the report says it (and exit code 1 for "damaged").
LEDGER_STATES = {
    "ok": "ok",
    "empty": "none yet (nothing was ever spooled)",
    "missing": "missing: every record on disk replays (none was confirmed yet, or it was lost)",
    "damaged": "DAMAGED: every record on disk replays (duplicates possible)",
}


def _ledger_state(directory: str, stored: int | None, segments: int) -> str:
    if stored is not None:
        return "ok"
    if os.path.exists(os.path.join(directory, fmt.LEDGER)):
        return "damaged"
    return "missing" if segments else "empty"


def _inspect_one(directory: str) -> dict[str, Any]:
    stored = fmt.read_ledger(directory)
    watermark = stored or 0
    topics: Counter[str] = Counter()
    segments: list[dict[str, Any]] = []
    damage: list[dict[str, object]] = []
    records = 0
    oldest: float | None = None
    total_bytes = 0
    for first, path in fmt.list_segments(directory):
        scan, dmg, size = fmt.scan_segment(path, keep=True)
        total_bytes += size
        pending = 0
        for seq, body in scan.frames:
            if seq < watermark:
                continue
            item = fmt.decode_body(body)
            pending += 1
            topics[f"{item.cluster}/{item.topic}"] += 1
            oldest = item.spooled_at if oldest is None else min(oldest, item.spooled_at)
        records += pending
        segments.append({"name": os.path.basename(path), "first_seq": first, "bytes": size,
                         "records": scan.records, "pending": pending})
        if dmg is not None:
            damage.append(dmg.as_dict())
    quarantined = sorted(n for n in os.listdir(directory) if ".corrupt-" in n)
    ledger = _ledger_state(directory, stored, len(segments))
    return {
        "directory": os.path.abspath(directory),
        "records": records,
        "bytes": total_bytes,
        "oldest_record_age_s": None if oldest is None else round(time.time() - oldest, 3),
        "topics": dict(sorted(topics.items())),
        "segments": segments,
        "watermark": watermark,
        "ledger": ledger,
        "empty": ledger in ("ok", "empty") and not segments and not quarantined,
        "damage": damage,
        "quarantined": quarantined,
    }


def damaged(report: dict[str, Any]) -> bool:
    """Damage in a segment, or a ledger that is there but unreadable (any worker, any
    priority)."""
    if report["damage"] or report.get("ledger") == "damaged":
        return True
    high = report.get("high")
    return (high is not None and damaged(high)) or any(
        damaged(w) for w in report.get("workers", {}).values())


def _human(report: dict[str, Any]) -> str:
    if report["empty"]:
        count = f" ({len(report['workers'])} worker spool(s))" if "workers" in report else ""
        return f"spool {report['directory']}: empty, nothing waiting for Kafka{count}"
    if "workers" in report:
        head = (f"spool {report['directory']}: {report['records']} records waiting for Kafka, "
                f"{report['bytes']} bytes, {len(report['workers'])} worker spool(s)")
        return "\n".join([head] + [_human(r) for r in report["workers"].values()])
    lines = [f"spool {report['directory']}"]
    age = report["oldest_record_age_s"]
    lines.append(f"  records waiting for Kafka: {report['records']}"
                 + (f" (oldest {age:.1f}s old)" if age is not None else ""))
    lines.append(f"  bytes on disk: {report['bytes']} in {len(report['segments'])} segment(s)")
    lines.append(f"  ledger: watermark {report['watermark']}, {LEDGER_STATES[report['ledger']]}")
    high = report.get("high")
    if high and high["ledger"] not in ("ok", "empty"):
        lines.append(f"  high-priority ledger: {LEDGER_STATES[high['ledger']]}")
    for name, count in report["topics"].items():
        lines.append(f"    {name}: {count}")
    for seg in report["segments"]:
        lines.append(f"  {seg['name']}: {seg['records']} records, {seg['pending']} pending, "
                     f"{seg['bytes']} bytes")
    for d in report["damage"]:
        lines.append(f"  DAMAGE {d['segment']} at byte {d['offset']}: {d['reason']}, "
                     f"{d['bytes']} bytes will be cut at the next start")
    for name in report["quarantined"]:
        lines.append(f"  cut earlier and kept for inspection: {name}")
    return "\n".join(lines)


def main_inspect(directory: str, json_out: bool) -> int:
    """Print the report; exit code 0 clean (or empty), 1 damage found, 2 no such spool."""
    try:
        report = inspect_spool(directory)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print(_human(report))
    return 1 if damaged(report) else 0
