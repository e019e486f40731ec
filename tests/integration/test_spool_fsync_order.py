"""No PUBACK before the fsync that covers its record, on the real process (issue 11, item 1).

``lastmile serve`` in write-ahead mode runs under ``strace -f``; a real QoS 1
client publishes numbered messages.  In the trace, each message's payload is
written to a spool segment, that segment's ``fdatasync`` returns, and only then
may the socket write carrying its PUBACK start.  Skipped when ptrace is not
allowed (containers without CAP_SYS_PTRACE).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.helpers import ROOT, Broker, wait_port, write_config

pytestmark = pytest.mark.integration

N = 60
LINE = re.compile(r"^(\d+)\s+(?:(\w+)\((\d+)(.*)|<\.\.\. (\w+) resumed>(.*))$")


def ptrace_allowed() -> bool:
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True)
    return done.returncode == 0


def payload(i: int) -> bytes:
    return b"fsync-order-%03d" % i


def hexed(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


class Trace:
    """Ordered events from ``strace -f -xx``: writes (pid, fd, data) and completed syncs."""

    def __init__(self, text: str) -> None:
        self.events: list[tuple[str, int, str]] = []  # (kind, fd, data as strace printed it)
        pending: dict[str, int] = {}  # pid -> fd of an unfinished fdatasync
        for line in text.splitlines():
            m = LINE.match(line)
            if m is None:
                continue
            pid, call, fd, rest, resumed, after = m.groups()
            if call in ("fdatasync", "fsync"):
                if "<unfinished" in rest:
                    pending[pid] = int(fd)
                elif "= 0" in rest:
                    self.events.append(("synced", int(fd), ""))
            elif resumed in ("fdatasync", "fsync") and pid in pending:
                fd_done = pending.pop(pid)
                if "= 0" in after:
                    self.events.append(("synced", fd_done, ""))
            elif call in ("write", "writev", "sendto", "sendmsg"):
                self.events.append(("write", int(fd), rest))

    def first_write_of(self, needle: str) -> tuple[int, int]:
        for i, (kind, fd, data) in enumerate(self.events):
            if kind == "write" and needle in data:
                return i, fd
        raise AssertionError(f"no write of {needle}")

    def synced_after(self, index: int, fd: int) -> int | None:
        for i in range(index + 1, len(self.events)):
            if self.events[i][:2] == ("synced", fd):
                return i
        return None

    def first_puback(self, mid: int) -> int:
        packet = hexed(bytes([0x40, 0x02, mid >> 8, mid & 0xFF]))
        only_pubacks = re.compile(r'"(?:\\x40\\x02\\x[0-9a-f]{2}\\x[0-9a-f]{2})+"')
        for i, (kind, _, data) in enumerate(self.events):
            if kind == "write" and packet in data and only_pubacks.search(data):
                return i
        raise AssertionError(f"no PUBACK for packet id {mid} in the trace")


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(x) for x in f.read().split()]
    return found


@pytest.mark.timeout(120)
@pytest.mark.skipif(not ptrace_allowed(), reason="strace missing or ptrace not permitted")
def test_no_puback_before_the_fsync_covering_its_record(tmp_path: Path, broker: Broker,
                                                        rules_dir: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    ports = write_config(cfg, bootstrap=broker.bootstrap, rules_dir=rules_dir,
                         spool_dir=tmp_path / "spool", spool__mode="write-ahead",
                         spool__fsync_interval_ms=5)
    trace = tmp_path / "strace.txt"
    log = (tmp_path / "gateway.log").open("ab")
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-xx", "-s", "1000000", "-o", str(trace),
         "-e", "trace=fdatasync,fsync,write,writev,sendto,sendmsg",
         sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
        stdout=log, stderr=log, cwd=ROOT)
    try:
        wait_port("127.0.0.1", ports["mqtt"], timeout=60, proc=proc)
        acked = threading.Event()
        pubacks: list[int] = []

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            pubacks.append(mid)
            if len(pubacks) == N:
                acked.set()

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fsync-order",
                             protocol=paho.MQTTv311)
        client.on_publish = on_publish
        client.connect("127.0.0.1", ports["mqtt"])
        client.loop_start()
        mids = {client.publish("bench/fsync-order/seq", payload(i), qos=1).mid: i
                for i in range(N)}
        assert acked.wait(60), f"{len(pubacks)} of {N} PUBACKs"
        client.disconnect()
        client.loop_stop()
    finally:
        for child in children(proc.pid):
            os.kill(child, signal.SIGTERM)
        proc.wait(60)
    events = Trace(trace.read_text(errors="replace"))
    for mid, i in mids.items():
        spooled_at, fd = events.first_write_of(hexed(payload(i)))
        synced_at = events.synced_after(spooled_at, fd)
        assert synced_at is not None, f"message {i}: written to fd {fd}, never fdatasynced"
        puback_at = events.first_puback(mid)
        assert puback_at > synced_at, (
            f"message {i}: PUBACK (event {puback_at}) before the fdatasync covering it "
            f"(written at {spooled_at}, synced at {synced_at})")
