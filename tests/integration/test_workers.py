"""Worker processes behind one set of listeners (SO_REUSEPORT) under the supervisor."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import Broker, wait_port

pytestmark = pytest.mark.integration


def established_to(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (from /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                remote_port = int(fields[2].split(":")[1], 16)
                if remote_port == port and fields[3] == "01":
                    count += 1
    return count


def worker_pids(supervisor_pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if ppid == supervisor_pid and b"worker" in cmd:
            pids.append(int(entry))
    return sorted(pids)


def publish(port: int, client_id: str, count: int) -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    acked = 0

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(f"bench/{client_id}/seq", str(i), qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(20)
    client.disconnect()
    client.loop_stop()
    return acked


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_workers_share_listeners_restart_and_keep_kafka_connections_fixed(
    gateway_factory, broker: Broker, tmp_path: Path
) -> None:
    gw, ports = gateway_factory(workers=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    assert wait_for(lambda: len(worker_pids(gw.proc.pid)) == 2)
    wait_port("127.0.0.1", ports["metrics"])
    time.sleep(2)  # let both workers finish starting their producers
    kafka_conns = established_to(broker.port)
    assert 2 <= kafka_conns <= 2 * 3  # a producer (and its bootstrap link) per worker

    # Many device connections: the Kafka side does not grow.
    devices = [socket.create_connection(("127.0.0.1", ports["mqtt"])) for _ in range(200)]
    time.sleep(1)
    assert established_to(broker.port) == kafka_conns
    for sock in devices:
        sock.close()

    # Publishers on the shared listener (the kernel picks a worker): every ack lands.
    acked = sum(publish(ports["mqtt"], f"wk-{i}", 20) for i in range(10))
    assert acked == 200

    # Kill one worker: the supervisor replaces it and the gateway keeps serving.
    before = worker_pids(gw.proc.pid)
    os.kill(before[0], signal.SIGKILL)
    assert wait_for(lambda: len(set(worker_pids(gw.proc.pid)) - set(before)) == 1)
    assert publish(ports["mqtt"], "wk-after", 20) == 20

    got = broker.read("bench", 10_000, timeout=15)
    seen = {(m.key(), m.value()) for m in got}
    for i in range(10):
        for n in range(20):
            assert (f"wk-{i}".encode(), str(n).encode()) in seen
    assert all((b"wk-after", str(n).encode()) in seen for n in range(20))
    assert gw.stop(signal.SIGTERM) == 0
