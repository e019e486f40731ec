"""A storm of CONNECTs is taken ``connects_per_turn`` a turn of the loop (issue 14).

Fake transports, one callback delivering every CONNECT (what one poll of the loop does
when a whole cell reconnects): only the first slice is handled at once, the rest wait
with reading paused, and a callback that was ready meanwhile (an ack, a timer) runs
between two slices.  Before the fix every CONNECT was handled in that one callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.codec import encode
from gateway.protocols.mqtt.events import MqttLimits
from gateway.sources.mqtt_server import MqttConnection, MqttServer
from tests.integration.test_mqtt_idle_alias_bounds import AckingPipeline


class FakeTransport:
    def __init__(self, n: int) -> None:
        self.n = n
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.2", 10_000 + self.n) if name == "peername" else default


def connect_bytes(i: int) -> bytes:
    return encode(p.Connect(protocol_level=4, client_id=f"c{i}", keep_alive=60), 4)


async def test_a_storm_is_taken_a_slice_per_turn_and_others_run_between() -> None:
    server = MqttServer(AckingPipeline(), MqttLimits(), connects_per_turn=4)
    conns, transports = [], []
    for i in range(20):
        conn = MqttConnection(server)
        transport = FakeTransport(i)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conns.append(conn)
        transports.append(transport)
    order: list[str] = []

    def answered() -> int:
        return sum(1 for t in transports if t.written)

    def ready_meanwhile() -> None:  # e.g. the flush of acks from Kafka
        order.append(f"other after {answered()}")

    loop = asyncio.get_running_loop()
    loop.call_soon(ready_meanwhile)
    for i, conn in enumerate(conns):  # one poll: every CONNECT arrives in one callback
        conn.data_received(connect_bytes(i))
    assert answered() == 4  # the first slice only
    assert len(server.connects_waiting) == 16
    assert not any(t.reading for t in transports[4:])  # the rest wait, unread
    for _ in range(100):
        if answered() == 20:
            break
        await asyncio.sleep(0)
    assert answered() == 20  # every CONNECT is served in the end
    assert order == ["other after 4"]  # it ran before the second slice
    assert not server.connects_waiting
    assert all(t.reading for t in transports)


async def test_a_connection_gone_while_it_waits_is_skipped() -> None:
    server = MqttServer(AckingPipeline(), MqttLimits(), connects_per_turn=1)
    a, b, c = (MqttConnection(server) for _ in range(3))
    ta, tb, tc = FakeTransport(0), FakeTransport(1), FakeTransport(2)
    for conn, t, i in ((a, ta, 0), (b, tb, 1), (c, tc, 2)):
        conn.connection_made(t)  # type: ignore[arg-type]
        conn.data_received(connect_bytes(i))
    tb.closing = True
    b.connection_lost(None)
    for _ in range(20):
        await asyncio.sleep(0)
    assert ta.written and tc.written and not tb.written
    assert not server.connects_waiting and len(server.connections) == 2



async def test_the_newest_waiting_connect_goes_first() -> None:
    """Under more CONNECTs than a worker answers, the oldest are the clients giving up:
    the newest is answered first, the oldest meet their CONNECT timeout (and retry)."""
    server = MqttServer(AckingPipeline(), MqttLimits(connect_timeout=1.0),
                        connects_per_turn=1)
    conns = [MqttConnection(server) for _ in range(4)]
    transports = [FakeTransport(i) for i in range(4)]
    for i, (conn, t) in enumerate(zip(conns, transports, strict=True)):
        conn.connection_made(t)  # type: ignore[arg-type]
        conn.data_received(connect_bytes(i))
    await asyncio.sleep(0)  # one turn
    assert [bool(t.written) for t in transports] == [True, False, False, True]
    server.sweep(asyncio.get_running_loop().time() + 5.0)  # past the CONNECT timeout
    assert transports[1].closing and transports[2].closing  # closed while waiting
    for _ in range(20):
        await asyncio.sleep(0)
    assert not server.connects_waiting
    assert not transports[1].written and not transports[2].written
