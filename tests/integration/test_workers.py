"""Worker processes behind one set of listeners (SO_REUSEPORT) under the supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from tests.helpers import Broker, child_pids, log_events, wait_until

pytestmark = pytest.mark.integration


def established_to(port: int, pids: list[int]) -> int:
    """Established TCP connections to ``port`` held by ``pids`` (from /proc/net/tcp).

    Only the gateway's own: the session's broker also serves this test process's
    consumers and whatever earlier tests left open.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                remote_port = int(fields[2].split(":")[1], 16)
                if remote_port == port and fields[3] == "01":
                    inodes.add(f"socket:[{fields[9]}]")
    count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    count += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
    return count


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


def test_workers_share_listeners_restart_and_keep_kafka_connections_fixed(
    gateway_factory, broker: Broker, tmp_path: Path
) -> None:
    gw, ports = gateway_factory(workers=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    wait_until(lambda: len(log_events(gw.log_text(), "gateway_started")) == 2, 60,
               what="both workers started")
    assert len(child_pids(gw.proc.pid)) == 2
    # A producer (and its bootstrap link) per worker.
    gateway_pids = [gw.proc.pid, *child_pids(gw.proc.pid)]
    wait_until(lambda: 2 <= established_to(broker.port, gateway_pids) <= 2 * 3, 30,
               what="one producer's connections per worker")

    # Many device connections, each answered by a worker: the Kafka side does not grow.
    devices = []
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", ports["mqtt"]), timeout=30)
        sock.sendall(encode(p.Connect(protocol_level=4, client_id=f"dev-{i}", keep_alive=60), 4))
        devices.append(sock)
    for sock in devices:
        assert decode_packets(sock.recv(64), 4, 1 << 20)[0] == [p.Connack(reason_code=0)]
    assert established_to(broker.port, gateway_pids) <= 2 * 3
    for sock in devices:
        sock.close()

    # Publishers on the shared listener (the kernel picks a worker): every ack lands.
    acked = sum(publish(ports["mqtt"], f"wk-{i}", 20) for i in range(10))
    assert acked == 200

    # Kill one worker: the supervisor replaces it and the gateway keeps serving.
    before = child_pids(gw.proc.pid)
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: len(set(child_pids(gw.proc.pid)) - set(before)) == 1, 30,
               what="the killed worker replaced")
    wait_until(lambda: len(log_events(gw.log_text(), "gateway_started")) == 3, 60,
               what="the new worker started")
    assert publish(ports["mqtt"], "wk-after", 20) == 20

    want = {(f"wk-{i}".encode(), str(n).encode()) for i in range(10) for n in range(20)}
    want |= {(b"wk-after", str(n).encode()) for n in range(20)}

    def seen() -> set[tuple[bytes, bytes]]:
        return {(m.key(), m.value()) for m in broker.read_all("bench")}

    # Acks may come from the spool (Kafka slower than spill_after_ms): wait for Kafka.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: want <= seen(), 30)
    missing = want - seen()
    assert not missing, f"{len(missing)} acked records not in Kafka, e.g. {sorted(missing)[:3]}"
    assert gw.stop(signal.SIGTERM) == 0
