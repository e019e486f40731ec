"""TCP backpressure seen from the client's socket, and /readyz saying so.

With the spool off and Kafka hung, records wait in memory until the buffer's
high-water mark; then the gateway stops reading its connections. A publisher
that keeps writing fills the kernel buffers between it and the gateway and its
writes block. When Kafka answers, the buffer drains, reading resumes and every
QoS 0 record written is in Kafka: nothing dropped while the writer was held.
"""

from __future__ import annotations

import json
import select
import socket
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from tests.helpers import Broker, wait_until

pytestmark = pytest.mark.integration

PAYLOAD = 8 * 1024
HIGH_WATER = 64 * 1024
# Far more than the gateway's high-water mark plus every kernel buffer on the way
# (tcp_rmem tops out at 32 MiB here): a gateway that keeps reading gets this far.
LIMIT = 160 * 1024 * 1024
BLOCKED_FOR = 3.0


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def connect(port: int, client_id: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    sock.sendall(encode(p.Connect(protocol_level=4, client_id=client_id, keep_alive=0), 4))
    packets, _ = decode_packets(sock.recv(64), 4, 1 << 20)
    assert packets == [p.Connack(reason_code=0)]
    return sock


class Publisher:
    """Numbered QoS 0 PUBLISHes of one size, written without blocking."""

    def __init__(self, sock: socket.socket, topic: str) -> None:
        self.sock, self.topic = sock, topic
        self.size = len(self.packet(0))
        self.offset = 0  # bytes the kernel took
        self.chunk = b""

    def packet(self, n: int) -> bytes:
        return encode(p.Publish(topic=self.topic, payload=b"%08d" % n + b"x" * PAYLOAD, qos=0), 4)

    def _fill(self) -> None:
        # The rest of the packet under way plus a few whole ones.
        n = self.offset // self.size
        head = self.packet(n)[self.offset % self.size:]
        self.chunk = head + b"".join(self.packet(n + 1 + i) for i in range(4))

    def write_until_blocked(self) -> None:
        """Write until the socket stays unwritable for BLOCKED_FOR seconds.

        Fails if LIMIT bytes went through without blocking.
        """
        self.sock.setblocking(False)
        while self.offset < LIMIT:
            if not self.chunk:
                self._fill()
            try:
                n = self.sock.send(self.chunk)
            except BlockingIOError:
                _, writable, _ = select.select([], [self.sock], [], BLOCKED_FOR)
                if not writable:
                    return
                continue
            self.offset += n
            self.chunk = self.chunk[n:]
        raise AssertionError(f"wrote {self.offset} bytes and the gateway kept reading: "
                             "no backpressure")

    def finish_packet(self) -> int:
        """Blocking: complete the packet the last write cut; returns packets written."""
        self.sock.setblocking(True)
        self.sock.settimeout(120)
        if self.offset % self.size:
            self.sock.sendall(self.packet(self.offset // self.size)[self.offset % self.size:])
            self.offset += self.size - self.offset % self.size
        return self.offset // self.size


def test_paused_gateway_blocks_the_publishers_writes_then_resumes(
    gateway_factory: Any, fresh_broker: Broker
) -> None:
    gw, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__enabled=False,
                                buffer__high_water_bytes=HIGH_WATER,
                                buffer__low_water_bytes=HIGH_WATER // 2,
                                kafka__clusters__default__message_timeout_ms=300_000)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    client_id = f"bp-{uuid.uuid4().hex[:8]}"
    topic = f"bench/{client_id}/x"
    sock = connect(ports["mqtt"], client_id)
    sock.sendall(encode(p.Publish(topic=topic, payload=b"warm", qos=1, packet_id=1), 4))
    assert decode_packets(sock.recv(64), 4, 1 << 20)[0] == [p.Puback(packet_id=1)]
    status, body = readyz(ports["metrics"])
    assert (status, body["ready"], body["paused"]) == (200, True, False)

    pub = Publisher(sock, topic)
    fresh_broker.pause()
    try:
        pub.write_until_blocked()
        # Held: the gateway says so, to HTTP clients and to the load balancer.
        status, body = readyz(ports["metrics"])
        assert (status, body["ready"], body["paused"]) == (503, False, True), body
        req = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/v1/publish/{topic}",
                                     data=b"over http", headers={"X-Client-Id": client_id})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=20)
        assert refused.value.code == 503 and int(refused.value.headers["Retry-After"]) > 0
        # Still held a little later (nothing reads the socket behind our back).
        _, writable, _ = select.select([], [sock], [], 1.0)
        assert not writable
    finally:
        fresh_broker.resume()

    # Kafka answers: the buffer drains below low water and the gateway reads again.
    _, writable, _ = select.select([], [sock], [], 120)
    assert writable, "the gateway never resumed reading"
    sent_packets = pub.finish_packet()
    sock.sendall(encode(p.Publish(topic=topic, payload=b"last", qos=1, packet_id=2), 4))
    assert decode_packets(sock.recv(64), 4, 1 << 20)[0] == [p.Puback(packet_id=2)]
    sock.close()
    wait_until(lambda: readyz(ports["metrics"])[0] == 200, 60, what="/readyz 200 again")

    got = [m.value() for m in fresh_broker.read_all("bench", timeout=120)
           if m.key() == client_id.encode()]
    numbers = [int(v[:8]) for v in got if v not in (b"warm", b"last")]
    assert numbers == list(range(sent_packets)), "QoS 0 records lost or reordered while held"
    assert got[0] == b"warm" and got[-1] == b"last"
    assert pub.offset < 64 * 1024 * 1024  # held within kernel buffers, not read on
