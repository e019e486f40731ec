"""One MQTT session registry for all workers: `lastmile serve` with workers: 2, paho clients.

The kernel picks a worker per connection (SO_REUSEPORT, a hash of the 4-tuple),
so each test chooses the client's source port: it probes ports until one lands
on the wanted worker (found through /proc), then connects from that port.  A
small TCP proxy in front of the gateway does the same for a client that
reconnects on its own (paho), and can swallow what the gateway sends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import (
    Broker,
    GatewayProcess,
    child_pids,
    free_port,
    pid_holding,
    tcp_inodes,
    wait_until,
)
from tests.integration.test_mqtt_tls import make_pki

pytestmark = pytest.mark.integration

RULES = """
rules:
  - {name: sessions, match: "sess/{run}/#", kafka: {topic: "sessions.{run}", key: "{client_id}"}}
"""
LINGER_RST = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT on a reused port


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    return wait_until(predicate, timeout, 0.05, what or str(predicate))


# --- which worker holds a connection ------------------------------------------------------


def listening(server_port: int, pid: int) -> bool:
    """Whether worker ``pid`` holds a listening socket on ``server_port`` (SO_REUSEPORT)."""
    return pid_holding(tcp_inodes(server_port), [pid]) is not None


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def port_for(server_port: int, worker: int, pids: list[int]) -> int:
    """A local port whose connections to ``server_port`` the kernel gives to ``worker``.

    The probe may land on any live worker, one the supervisor restarted after ``pids``
    was taken included: every current worker is a candidate, not only ``pids``.
    """
    wait_for(partial(listening, server_port, worker), 90, f"worker {worker} listening")
    supervisor = _parent(worker)

    def acceptor(client_port: int) -> int | None:
        workers = list(dict.fromkeys([*pids, *child_pids(supervisor)]))
        return pid_holding(tcp_inodes(server_port, client_port), workers)

    for _ in range(200):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.connect(("127.0.0.1", server_port))
        try:
            got = wait_for(partial(acceptor, port), 10, "accept")
        finally:
            sock.close()
        if got == worker:
            return int(port)
    raise AssertionError(f"no port maps to worker {worker}")


# --- a TCP proxy whose upstream source port (hence worker) the test chooses ----------------


class Proxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.upstream_port = 0
        self.drop_downstream = False  # swallow what the gateway sends
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket()
            up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            up.bind(("127.0.0.1", self.upstream_port))
            up.connect(("127.0.0.1", self.target))
            self.pairs.append((down, up))
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not (downstream and self.drop_downstream):
                    dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every connection, as a mobile network does."""
        pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
                sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


# --- paho clients ------------------------------------------------------------------------


class Device:
    """A paho client run by its own network thread, recording what happened to it."""

    def __init__(self, client_id: str, version: int, reconnect_s: int = 3600,
                 transport: str = "tcp") -> None:
        protocol = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {} if version == 5 else {"clean_session": False}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, transport=transport, **kwargs)
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        self.client.reconnect_delay_set(min_delay=reconnect_s, max_delay=reconnect_s)
        self.version = version
        self.connacks: list[bool] = []  # session present, per CONNACK
        self.disconnects: list[int] = []  # reason code values
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self.connacks.append(bool(flags.session_present))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnects.append(int(reason.value))

    def connect(self, port: int, bind_port: int = 0) -> Device:
        props = None
        if self.version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
            self.client.connect("127.0.0.1", port, bind_port=bind_port, clean_start=False,
                                properties=props)
        else:
            self.client.connect("127.0.0.1", port, bind_port=bind_port)
        self.client.loop_start()
        wait_for(lambda: self.connacks, 20, "CONNACK")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def start(factory: Any, rules_dir: Path, **overrides: Any) -> tuple[GatewayProcess, dict[str, int],
                                                                     list[int]]:
    (rules_dir / "05-sessions.yaml").write_text(RULES)
    gw, ports = factory(workers=2, **overrides)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    pids = wait_for(lambda: (p := child_pids(gw.proc.pid)) and len(p) == 2 and p, 30, "workers")
    for pid in pids:  # both workers listen (each has its own SO_REUSEPORT socket)
        wait_for(partial(listening, ports["mqtt"], pid), 90, f"worker {pid} listening")
    return gw, ports, pids


@pytest.fixture
def gateway(gateway_factory: Any, rules_dir: Path) -> Iterator[tuple[GatewayProcess, int,
                                                                     list[int]]]:
    gw, ports, pids = start(gateway_factory, rules_dir)
    yield gw, ports["mqtt"], pids
    assert gw.stop(signal.SIGTERM) == 0, gw.log_text()[-3000:]


def read_until_end(broker: Broker, topic: str) -> list[bytes]:
    """Every value of ``topic`` up to the b"end" marker the test published last."""

    def attempt() -> list[bytes] | None:
        values = [m.value() for m in broker.read(topic, 2, timeout=5)]
        return values if b"end" in values else None

    return list(wait_for(attempt, 60, "the end marker"))


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("version", [5, 4])
def test_a_client_id_connected_on_another_worker_is_taken_over(gateway: Any, version: int) -> None:
    _gw, port, pids = gateway
    cid = f"takeover-{version}-{uuid.uuid4().hex[:6]}"
    first = Device(cid, version).connect(port, port_for(port, pids[0], pids))
    second = Device(cid, version).connect(port, port_for(port, pids[1], pids))
    try:
        # The first connection is ended by the gateway, not left beside the second.
        wait_for(lambda: first.disconnects, 15, "the first connection to be ended")
        if version == 5:
            assert first.disconnects[0] == 0x8E  # session taken over
        assert second.connacks == [True]  # the session (created by the first) is present
        assert not second.disconnects
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("version", [5, 4])
def test_qos2_retransmitted_to_another_worker_is_not_produced_twice(
    gateway: Any, broker: Broker, version: int
) -> None:
    _gw, port, pids = gateway
    run = uuid.uuid4().hex[:8]
    topic = f"sess/{run}/x"
    proxy = Proxy(port)
    device = Device(f"q2-{run}", version, reconnect_s=1)
    try:
        proxy.upstream_port = port_for(port, pids[0], pids)
        device.connect(proxy.port)
        proxy.drop_downstream = True  # the PUBREC never reaches the device
        info = device.client.publish(topic, b"exactly-once", qos=2)
        got = broker.read(f"sessions.{run}", 1, timeout=30)
        assert [m.value() for m in got] == [b"exactly-once"]  # safe in Kafka, unanswered

        # The network drops; the device reconnects and lands on the other worker.
        proxy.upstream_port = port_for(port, pids[1], pids)
        proxy.drop_downstream = False
        proxy.cut()
        wait_for(lambda: len(device.connacks) == 2, 30, "the reconnect")
        assert device.connacks[1] is True
        info.wait_for_publish(30)  # PUBREC (from the registry), PUBREL, PUBCOMP
        assert info.is_published()

        end = device.client.publish(topic, b"end", qos=1)
        end.wait_for_publish(30)
        values = read_until_end(broker, f"sessions.{run}")
        assert values.count(b"exactly-once") == 1, values
    finally:
        device.stop()
        proxy.close()


def test_takeover_across_workers_and_transports(
    gateway_factory: Any, rules_dir: Path, tmp_path: Path
) -> None:
    """TCP on one worker, WebSocket on the other, then TLS: always one live connection."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    tls = free_port()
    gw, ports, pids = start(gateway_factory, rules_dir, listeners__mqtts={
        "enabled": True, "host": "127.0.0.1", "port": tls,
        "certfile": str(pki / "server.crt"), "keyfile": str(pki / "server.key")})
    cid = f"transports-{uuid.uuid4().hex[:6]}"
    tcp = Device(cid, 5).connect(ports["mqtt"], port_for(ports["mqtt"], pids[0], pids))
    ws = Device(cid, 5, transport="websockets")
    secure = Device(cid, 5)
    secure.client.tls_set(ca_certs=str(pki / "ca.crt"))
    try:
        ws.connect(ports["http"], port_for(ports["http"], pids[1], pids))
        wait_for(lambda: tcp.disconnects, 15, "the TCP connection to be taken over")
        assert tcp.disconnects == [0x8E] and ws.connacks == [True]
        secure.connect(tls, port_for(tls, pids[0], pids))
        wait_for(lambda: ws.disconnects, 15, "the WebSocket connection to be taken over")
        assert ws.disconnects == [0x8E] and secure.connacks == [True]
    finally:
        for device in (tcp, ws, secure):
            device.stop()
        assert gw.stop(signal.SIGTERM) == 0, gw.log_text()[-3000:]


def test_a_dead_owner_does_not_block_its_clients(gateway: Any) -> None:
    gw, port, pids = gateway
    cid = f"orphan-{uuid.uuid4().hex[:6]}"
    first = Device(cid, 5).connect(port, port_for(port, pids[0], pids))
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: first.disconnects, 15, "the dead worker's connection to drop")
    first.stop()
    # The supervisor restarts the worker; until then and after, the client connects at once.
    second = Device(cid, 5).connect(port, port_for(port, pids[1], pids))
    try:
        assert second.connacks == [True]  # the session outlives its worker (state is lost)
        new = wait_for(lambda: set(child_pids(gw.proc.pid)) - set(pids), 30, "the restart")
        restarted = new.pop()
        third = Device(cid, 5).connect(port, port_for(port, restarted, [pids[1], restarted]))
        wait_for(lambda: second.disconnects, 15, "the takeover by the restarted worker")
        assert second.disconnects == [0x8E]
        third.stop()
    finally:
        second.stop()


def test_a_verdict_still_due_at_the_takeover_reaches_the_new_worker(
    gateway_factory: Any, rules_dir: Path, fresh_broker: Broker
) -> None:
    """The old worker answers for a message Kafka had not confirmed when the device moved."""
    gw, ports, pids = start(gateway_factory, rules_dir, bootstrap=fresh_broker.bootstrap,
                            spool__enabled=False)  # the verdict waits for Kafka itself
    port, run = ports["mqtt"], uuid.uuid4().hex[:8]
    topic = f"sess/{run}/x"
    proxy = Proxy(port)
    device = Device(f"late-{run}", 5, reconnect_s=1)
    try:
        proxy.upstream_port = port_for(port, pids[0], pids)
        device.connect(proxy.port)
        device.client.publish(topic, b"warm-up", qos=1).wait_for_publish(30)  # the topic exists
        fresh_broker.pause()
        info = device.client.publish(topic, b"late", qos=2)
        in_flight = 'lastmile_kafka_in_flight_records{cluster="default"}'
        wait_for(lambda: metric(ports["metrics"], in_flight) >= 1, 30,
                 "the message to reach the producer")

        proxy.upstream_port = port_for(port, pids[1], pids)
        proxy.cut()
        wait_for(lambda: len(device.connacks) == 2, 30, "the reconnect")
        assert device.connacks[1] is True and not info.is_published()
        fresh_broker.resume()  # worker 0 learns the verdict; worker 1 sends the PUBREC
        info.wait_for_publish(30)
        assert info.is_published()

        device.client.publish(topic, b"end", qos=1).wait_for_publish(30)
        values = read_until_end(fresh_broker, f"sessions.{run}")
        assert values.count(b"late") == 1, values
    finally:
        fresh_broker.resume()
        device.stop()
        proxy.close()
        assert gw.stop(signal.SIGTERM) == 0, gw.log_text()[-3000:]
