"""The write side and connect storms (issue 13) against `lastmile serve` and tansu.

- a client (TCP or WebSocket) that floods SUBSCRIBE and never reads is closed after
  limits.slow_reader_timeout_s, counted as lastmile_mqtt_limit_closes_total{limit=
  "slow_reader"}, with a debug log line; a paho QoS 1 publisher meanwhile gets every
  PUBACKed message into Kafka (the buffered-output bound itself is counted in-process:
  test_mqtt_write_bounds.py);
- a connect storm at the default limits never starves the acks of a connected publisher:
  every PUBACK arrives and it is never disconnected (latency is printed, not asserted);
- paho MQTT 5 clients over limits.connect_rate_per_s get CONNACK 0x9F and get in on a
  later retry; a source address over limits.max_connections_per_source is closed unread.

Verdicts poll with deadlines; nothing is decided by a fixed sleep.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.properties import Properties
from tests.helpers import Broker, log_events, wait_until
from tests.integration.test_mqtt_idle_alias_bounds import (
    GoodPublisher,
    in_kafka,
    limit_closes,
    metric,
)
from tests.integration.test_mqtt_write_bounds import ws_frame

pytestmark = pytest.mark.integration

RULES = """
rules:
  - {name: mqbounds, match: "mqbounds/{run}/#", kafka: {topic: "mqbounds.{run}"}}
"""


def subscribe_flood() -> bytes:
    """About 64 KiB of MQTT 5 SUBSCRIBE; each is answered by a ~5x larger SUBACK."""
    one = b"".join(encode(p.Subscribe(packet_id=n, subscriptions=[
        p.Subscription(topic_filter="a")], properties=Properties()), 5) for n in range(1, 1001))
    return one * (65_536 // len(one) + 1)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed"
        data += chunk
    return data


def open_hog(ports: dict[str, int], transport: str, client_id: str) -> socket.socket:
    """A MQTT 5 client with a 4 KiB receive buffer, connected; it reads nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    connect = encode(p.Connect(protocol_level=5, client_id=client_id, keep_alive=600,
                               properties=Properties()), 5)
    if transport == "tcp":
        sock.connect(("127.0.0.1", ports["mqtt"]))
        sock.sendall(connect)
        assert recv_exactly(sock, 2)[0] == 0x20
        return sock
    sock.connect(("127.0.0.1", ports["http"]))
    sock.sendall(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += recv_exactly(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(ws_frame(connect))
    frame = recv_exactly(sock, 2)
    assert frame[0] == 0x82 and recv_exactly(sock, frame[1])[0] == 0x20
    return sock


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
def test_serve_closes_a_client_that_never_reads(gateway_factory: Any, rules_dir: Path,
                                                broker: Broker, transport: str) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__max_write_buffer_bytes=65536,
                                limits__slow_reader_timeout_s=2, log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)
    hog = open_hog(ports, transport, f"hog-{run}")
    chunk = ws_frame(subscribe_flood()) if transport == "websocket" else subscribe_flood()
    ended: list[str] = []

    def flood() -> None:
        # At most 16 MB (80 MB of SUBACKs for a gateway that would keep reading).
        try:
            for _ in range(16 * 1024 * 1024 // len(chunk)):
                hog.sendall(chunk)
            ended.append("sent everything: never stopped reading")
        except TimeoutError:
            ended.append("send blocked 30 s: paused, never closed")
        except OSError:
            ended.append("closed")

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    started = time.monotonic()
    n = 0
    while sender.is_alive():
        good.publish(n)
        n += 1
        assert time.monotonic() < started + 120, "the hog was never closed"
        time.sleep(0.05)
    assert ended == ["closed"]
    hog.close()
    for k in range(n, n + 20):
        good.publish(k)
    in_kafka(broker, run, good.finish())
    wait_until(lambda: limit_closes(ports["metrics"], "slow_reader") == 1, 30,
               what="the slow-reader close counted")
    lines = [e for e in log_events(gw.log_text(), "mqtt_disconnected")
             if e.get("limit") == "slow_reader"]
    assert len(lines) == 1 and lines[0]["level"] == "debug", lines


def test_serve_connect_storm_never_starves_connected_acks(gateway_factory: Any,
                                                         rules_dir: Path,
                                                         broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory()  # the default limits: no connect rate limit
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run, keepalive=5)
    disconnects: list[Any] = []
    good.client.on_disconnect = lambda *args: disconnects.append(args)
    sent_at: dict[int, float] = {}
    acked_at: dict[int, float] = {}

    def on_publish(_client: Any, _userdata: Any, mid: int, *_rest: Any) -> None:
        acked_at[mid] = time.monotonic()

    good.client.on_publish = on_publish
    good.publish(-1)  # the topic exists and the path is warm before the storm
    good.infos[0][1].wait_for_publish(30)
    storm_connacks: list[int] = []
    per_thread = 500

    def storm(t: int) -> None:
        for i in range(per_thread):
            with socket.create_connection(("127.0.0.1", ports["mqtt"]), timeout=30) as sock:
                sock.sendall(encode(p.Connect(protocol_level=4, client_id=f"st-{t}-{i}",
                                              keep_alive=60), 4))
                packets, _ = decode_packets(recv_exactly(sock, 4), 4, 1 << 20)
                storm_connacks.append(packets[0].reason_code)  # type: ignore[union-attr]
                # DISCONNECT, and let the gateway close first: the TIME_WAITs stay on its
                # port, not on 2,000 of this host's ephemeral ports (other tests bind them).
                sock.sendall(encode(p.Disconnect(), 4))
                while sock.recv(64):
                    pass

    threads = [threading.Thread(target=storm, args=(t,), daemon=True) for t in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    n = 0
    while any(thread.is_alive() for thread in threads):
        sent_at[len(good.infos) + 1] = time.monotonic()  # paho's mids count from 1
        good.publish(n)
        n += 1
        assert time.monotonic() < started + 240, "the storm never ended"
        time.sleep(0.01)
    storm_end = time.monotonic()
    storm_s = storm_end - started
    for k in range(n, n + 20):
        good.publish(k)
    for _, info in good.infos:
        info.wait_for_publish(30)
    assert disconnects == []  # every PUBACK came on the one connection it opened
    acked = good.finish()  # ... and every message was PUBACKed
    assert storm_connacks == [0] * (4 * per_thread)
    in_kafka(broker, run, acked)
    # Acks kept coming while the storm went on (an order, not a speed: the storm's
    # 2,000 CONNACKs and the publisher's PUBACKs share the loop).
    during = [mid for mid, at in acked_at.items() if mid in sent_at and at < storm_end]
    assert during, "no PUBACK arrived while the connect storm went on"
    latencies = sorted(acked_at[mid] - sent_at[mid] for mid in sent_at)
    print(f"storm: {4 * per_thread / storm_s:.0f} conn/s; {len(during)} of {len(sent_at)} "
          f"PUBACKs during it; latency "
          f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[len(latencies) * 99 // 100] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")


def paho_v5_connect(port: int, client_id: str) -> int:
    """The CONNACK reason code a paho MQTT 5 client gets."""
    got: list[int] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc.value)
    props = PahoProperties(PacketTypes.CONNECT)
    client.connect("127.0.0.1", port, keepalive=60, clean_start=True, properties=props)
    client.loop_start()
    try:
        wait_until(lambda: got, 30, what="a CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def test_serve_connect_rate_paho_gets_0x9f_then_in(gateway_factory: Any, rules_dir: Path,
                                                  broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__connect_rate_per_s=0.5, limits__connect_burst=3,
                                log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    # wait_for's probe took a token: wait until a connection gets in (the bucket refills).
    wait_until(lambda: paho_v5_connect(ports["mqtt"], f"probe-{run}") == 0, 30,
               what="a first connection", interval=0.5)
    good = GoodPublisher(ports["mqtt"], run)
    codes = [paho_v5_connect(ports["mqtt"], f"burst-{run}-{i}") for i in range(6)]
    assert 0x9F in codes and set(codes) <= {0, 0x9F}, codes
    for n in range(10):
        good.publish(n)
    # A retry after the bucket refilled (one token per 2 s) gets in.
    wait_until(lambda: paho_v5_connect(ports["mqtt"], f"retry-{run}") == 0, 30,
               what="a retry getting in", interval=0.5)
    for n in range(10, 20):
        good.publish(n)
    in_kafka(broker, run, good.finish())
    refused = codes.count(0x9F)
    wait_until(lambda: (metric(ports["metrics"],
                               'lastmile_mqtt_connect_limits_total{limit="connect_rate"}')
                        or 0) >= refused, 30, what="the refusals counted")
    assert len(log_events(gw.log_text(), "mqtt_connect_rate_exceeded")) >= refused


def test_serve_per_source_limit(gateway_factory: Any, rules_dir: Path,
                                broker: Broker) -> None:
    (rules_dir / "05-mqbounds.yaml").write_text(RULES)
    gw, ports = gateway_factory(limits__max_connections_per_source=2, log__level="debug")
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    run = uuid.uuid4().hex[:8]
    good = GoodPublisher(ports["mqtt"], run)

    def v4(source: str, client_id: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", ports["mqtt"]), timeout=30,
                                        source_address=(source, 0))
        try:
            sock.sendall(encode(p.Connect(protocol_level=4, client_id=client_id,
                                          keep_alive=60), 4))
            return sock, sock.recv(64)
        except ConnectionResetError:
            return sock, b""

    held = [v4("127.0.0.2", f"nat-{i}-{run}") for i in range(2)]
    assert [reply for _, reply in held] == [b"\x20\x02\x00\x00"] * 2
    extra, reply = v4("127.0.0.2", f"nat-extra-{run}")
    assert reply == b""  # closed unread
    other, reply = v4("127.0.0.3", f"other-{run}")
    assert reply == b"\x20\x02\x00\x00"
    for n in range(10):
        good.publish(n)
    in_kafka(broker, run, good.finish())
    for sock, _ in (*held, (extra, b""), (other, b"")):
        sock.close()
    wait_until(lambda: (metric(ports["metrics"],
                               'lastmile_mqtt_connect_limits_total{limit="per_source"}')
                        or 0) == 1, 30, what="the refusal counted")
    lines = [e for e in log_events(gw.log_text(), "mqtt_connection_refused")
             if e.get("reason") == "per_source"]
    assert len(lines) == 1 and lines[0]["level"] == "debug"
