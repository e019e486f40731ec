"""Connect storms (issue 13): the connect-rate token bucket (MQTT 5 CONNACK 0x9F, 3.1.1 a
close without CONNACK) and the per-source-address connection limit, on real sockets with
an in-process MqttServer; a connected QoS 1 publisher loses nothing meanwhile.

Verdicts poll with deadlines; nothing is decided by a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import decode_packets, encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import Properties
from gateway.sources.mqtt_server import MqttServer
from tests.integration.test_mqtt_idle_alias_bounds import AckingPipeline
from tests.integration.test_mqtt_server_auth import FakeAuth
from tests.integration.test_mqtt_write_bounds import GoodClient

pytestmark = pytest.mark.integration


async def connect(port: int, version: int, client_id: str, source: str = "127.0.0.1",
                  password: bytes | None = None) -> tuple[socket.socket, p.Connack | None]:
    """Open a connection from ``source``, send CONNECT; the CONNACK, or None if the gateway
    closed the connection without one."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    with contextlib.suppress(OSError):  # closed unread: the send may meet the reset
        await loop.sock_sendall(sock, encode(p.Connect(
            protocol_level=version, client_id=client_id, keep_alive=60,
            username="u" if password else None, password=password,
            properties=Properties() if version == 5 else None), version))
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 256), 30)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert not data, data
            return sock, None
        data += chunk
        packets, _ = decode_packets(data, version, 1 << 20)
        if packets:
            connack = packets[0]
            assert isinstance(connack, p.Connack), connack
            return sock, connack


async def is_closed(sock: socket.socket) -> bool:
    """The gateway closed ``sock`` (a refused CONNECT is followed by the close)."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 256), 30) == b""
    except ConnectionResetError:
        return True


async def test_over_the_connect_rate_mqtt5_gets_0x9f_and_311_a_close() -> None:
    pipeline = AckingPipeline()
    auth = FakeAuth()
    # One connection per 2 s after a burst of 3: a burst of CONNECTs cannot all get in.
    srv = MqttServer(pipeline, MqttLimits(connect_rate=0.5, connect_burst=3), auth=auth,
                     sweep_interval=0.05)
    await srv.start("127.0.0.1", 0)
    port = srv.ports[0]
    socks: list[socket.socket] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the first token
        writer.write(encode(p.Connect(protocol_level=4, client_id="good", keep_alive=60,
                                      username="u", password=b"quick"), 4))
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"\x20\x02\x00\x00"
        good = GoodClient(reader, writer)
        codes: list[int] = []
        for i in range(8):
            sock, connack = await connect(port, 5, f"burst-{i}", password=b"quick")
            socks.append(sock)
            assert connack is not None
            codes.append(connack.reason_code)
            if connack.reason_code:
                assert await is_closed(sock)
            await good.publish(i + 1)
        assert 0x9F in codes and set(codes) <= {0x00, 0x9F}, codes
        assert codes[:2] == [0, 0]  # the burst's two other tokens
        refused = codes.count(0x9F)
        # Refused before authentication: the Authenticator never saw those CONNECTs.
        assert len(auth.asked) == 1 + codes.count(0)
        # 3.1.1 has no code for it: closed without a CONNACK (the bucket is empty now,
        # unless this box stalled for 2 s: then one more try).
        for attempt in range(5):
            sock, connack = await connect(port, 4, f"v311-{attempt}", password=b"quick")
            socks.append(sock)
            if connack is None:
                break
        assert connack is None
        # A retry once the bucket has refilled gets in.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        n = len(good.acked)
        while True:
            sock, connack = await connect(port, 5, "retry", password=b"quick")
            socks.append(sock)
            assert connack is not None
            if connack.reason_code == 0:
                break
            assert connack.reason_code == 0x9F
            assert loop.time() < deadline, "the bucket never refilled"
            n += 1
            await good.publish(n)
            await asyncio.sleep(0.2)
        assert srv.connect_refusals["connect_rate"] >= refused + 1
        # The connected publisher: every message acked and handed on.
        got = [m.payload for m in pipeline.messages if m.client_id == "good"]
        assert got == [b"%d" % k for k in good.acked]
        writer.close()
    finally:
        for sock in socks:
            sock.close()
        await srv.close(0.1)


async def test_per_source_connection_limit() -> None:
    pipeline = AckingPipeline()
    srv = MqttServer(pipeline, MqttLimits(max_connections_per_source=2), sweep_interval=0.05)
    await srv.start("127.0.0.1", 0)
    port = srv.ports[0]
    socks: list[socket.socket] = []
    try:
        good = await GoodClient.open(port)  # from 127.0.0.1
        first = []
        for i in range(2):
            sock, connack = await connect(port, 5, f"nat-{i}", source="127.0.0.2")
            assert connack is not None and connack.reason_code == 0
            first.append(sock)
        await good.publish(1)
        # The third from 127.0.0.2 is closed unread; 127.0.0.3 is not 127.0.0.2.
        extra, connack = await connect(port, 5, "nat-extra", source="127.0.0.2")
        socks.append(extra)
        assert connack is None
        other, connack = await connect(port, 4, "other", source="127.0.0.3")
        socks.append(other)
        assert connack is not None and connack.reason_code == 0
        await good.publish(2)
        assert srv.connect_refusals == {"per_source": 1}
        assert srv.per_source == {"127.0.0.1": 1, "127.0.0.2": 2, "127.0.0.3": 1}
        # A slot freed by a disconnect is usable again.
        first.pop().close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while srv.per_source.get("127.0.0.2") != 1:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        again, connack = await connect(port, 5, "nat-again", source="127.0.0.2")
        socks.append(again)
        assert connack is not None and connack.reason_code == 0
        await good.publish(3)
        got = [m.payload for m in pipeline.messages if m.client_id == "good"]
        assert got == [b"1", b"2", b"3"]
        good.writer.close()
        for sock in (*first, *socks):
            sock.close()
        while srv.per_source:  # every close gives its address's slot back
            assert loop.time() < deadline, srv.per_source
            await asyncio.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()
        await srv.close(0.1)
