"""Small helpers shared by the load generator, the Kafka checker and the runner."""

from __future__ import annotations

import math
import os
import re
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (None if empty)."""
    n = len(sorted_values)
    if not n:
        return None
    k = min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))
    return float(sorted_values[k])


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, object]:
    """count, p50, p99, p999, max of values multiplied by scale."""
    s = sorted(values)
    out: dict[str, object] = {"count": len(s)}
    for name, p in (("p50", 50.0), ("p99", 99.0), ("p999", 99.9)):
        v = percentile(s, p)
        out[name] = None if v is None else round(v * scale, digits)
    out["max"] = round(s[-1] * scale, digits) if s else None
    return out


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_rss(pid: int) -> int:
    """Summed RSS of a process and its descendants."""
    return sum(rss_bytes(p) for p in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def cpu_seconds_reaped(pid: int) -> float:
    """cpu_seconds(pid) plus the CPU of its children that have exited and been waited
    for (cutime + cstime of pid): a load generator joins its workers before it reports."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return cpu_seconds(pid)
    return cpu_seconds(pid) + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def box_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat, not idle or
    iowait): the other processes on a shared box show up as busy minus what we sampled."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def collapsed_stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """py-spy's collapsed stacks: (frames, samples) per line, each frame as
    "func (file.py)" (line numbers dropped: one entry per function, not per line)."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            yield [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")], int(count)
