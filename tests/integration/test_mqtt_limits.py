"""limits.max_connections: connections over the limit are closed unread; the others work."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from tests.helpers import Broker

pytestmark = pytest.mark.integration


def connect(port: int, client_id: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(encode(p.Connect(protocol_level=4, client_id=client_id, keep_alive=60), 4))
    try:
        reply = sock.recv(64)
    except ConnectionResetError:
        reply = b""
    return sock, reply


def test_connections_over_the_limit_are_refused(gateway_factory, broker: Broker) -> None:
    gw, ports = gateway_factory(limits__max_connections=3)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    held = [connect(ports["mqtt"], f"lim-{i}") for i in range(3)]
    for _sock, reply in held:
        packets, _ = decode_packets(reply, 4, 1 << 20)
        assert packets == [p.Connack(reason_code=0)]
    extra, reply = connect(ports["mqtt"], "lim-extra")
    assert reply == b""  # closed without a CONNACK
    extra.close()
    # The held connections still publish and get their PUBACK.
    sock = held[0][0]
    sock.sendall(encode(p.Publish(topic="bench/lim-0/x", payload=b"ok", qos=1, packet_id=7), 4))
    packets, _ = decode_packets(sock.recv(64), 4, 1 << 20)
    assert packets == [p.Puback(packet_id=7)]
    # A slot freed by a disconnect is usable again.
    held[1][0].close()
    for _ in range(50):
        again, reply = connect(ports["mqtt"], "lim-again")
        if reply:
            break
        again.close()
    assert decode_packets(reply, 4, 1 << 20)[0] == [p.Connack(reason_code=0)]
    assert "mqtt_connection_refused" in gw.log_text()
    # ... and counted where an operator's alert looks (the pump copies once a second).
    assert refused_metric(ports["metrics"], deadline=time.monotonic() + 20) >= 1


def refused_metric(port: int, deadline: float) -> float:
    name = "lastmile_mqtt_refused_connections_total "
    value = 0.0
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        value = next((float(line.split()[1]) for line in text.splitlines()
                      if line.startswith(name)), 0.0)
        if value >= 1:
            break
        time.sleep(0.2)
    return value
