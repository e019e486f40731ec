"""The conformance table (tests/unit/test_mqtt_conformance.py) against the real server.

Every row that needs no clock runs here over loopback TCP against ``MqttServer``
with a pipeline that answers each message with the row's verdict: the same
bytes in, the same bytes out, and the connection really closed (EOF) or still
answering a PINGREQ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.auth import AuthRefusal, Credentials, Identity
from gateway.errors import GatewayError
from gateway.model import Message, Outcome
from gateway.sources.mqtt_server import MqttServer
from tests.unit.test_mqtt_conformance import CASES, LIMITS, Case

pytestmark = pytest.mark.integration
DEADLINE = 10.0


class Flow:
    paused = False

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        return lambda: None


class VerdictPipeline:
    """Answers every message at once with the row's verdict (None: never)."""

    def __init__(self, case: Case) -> None:
        self.flow = Flow()
        self.case = case
        self.held: list[Callable[[Outcome], None]] = []
        self.messages: list[Message] = []

    def publish(self, message: Message, on_done: Callable[[Outcome], None]) -> None:
        self.messages.append(message)
        verdict = self.case.verdict
        if verdict is None:
            self.held.append(on_done)
        elif verdict == 0:
            on_done(Outcome(ok=True))
        else:
            error = GatewayError("no rule")
            error.mqtt_reason = verdict
            error.retriable = self.case.retriable
            on_done(Outcome(ok=False, error=error))


class RowAuth:
    """An Authenticator answering the row's verdict, always through ``verify`` (the slow
    path): what the client pipelined behind CONNECT waits across a real await."""

    def __init__(self, verdict: Identity | AuthRefusal) -> None:
        self.verdict = verdict

    def quick(self, creds: Credentials) -> Identity | AuthRefusal | None:
        return None

    def delay_for(self, peer_host: str) -> float:
        return 0.0

    async def verify(self, creds: Credentials) -> Identity | AuthRefusal:
        await asyncio.sleep(0.01)
        return self.verdict


async def read_packet(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        head += bytes((byte,))
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return head + await reader.readexactly(length)


async def run_wire(case: Case) -> None:
    auth = RowAuth(case.login) if case.login is not None else None
    pipeline = VerdictPipeline(case)
    srv = MqttServer(pipeline, LIMITS, sweep_interval=3600, auth=auth)
    await srv.start("127.0.0.1", 0)
    conns: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    try:
        last = 0
        for conn, data, expect in case.norm_steps():
            last = conn
            if conn not in conns:
                conns[conn] = await asyncio.open_connection("127.0.0.1", srv.ports[0])
            reader, writer = conns[conn]
            if data == "LOST":
                port = writer.get_extra_info("sockname")[1]
                writer.close()
                # Wait until the server has seen it go (its session state is released).
                loop = asyncio.get_running_loop()
                end = loop.time() + DEADLINE
                while any(c.peer.endswith(f":{port}") for c in srv.connections):
                    assert loop.time() < end, "the server never saw the connection go"
                    await asyncio.sleep(0.01)
                continue
            if data:
                writer.write(bytes.fromhex(data.replace(" ", "")))
            if expect is None:
                await asyncio.wait_for(read_packet(reader), DEADLINE)  # a CONNACK
            elif expect:
                want = bytes.fromhex(expect.replace(" ", ""))
                try:
                    got = await asyncio.wait_for(reader.readexactly(len(want)), DEADLINE)
                except asyncio.IncompleteReadError as exc:
                    got = exc.partial
                assert got.hex() == want.hex(), (conn, data)
        reader, writer = conns[last]
        if case.close:
            rest = await asyncio.wait_for(reader.read(), DEADLINE)  # until EOF
            assert rest == b"", rest.hex()
        else:
            writer.write(b"\xc0\x00")
            pong = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
            assert pong == b"\xd0\x00", pong.hex()
        if isinstance(case.login, AuthRefusal):  # not one byte of a refused client goes on
            assert pipeline.messages == []
        elif case.login is not None:  # and an accepted one publishes as who it proved to be
            assert [m.username for m in pipeline.messages] == [case.login.name]
    finally:
        for _, writer in conns.values():
            writer.close()
        await srv.close(0.1)


WIRE = [case for case in CASES if case.wire]


@pytest.mark.parametrize("case", WIRE, ids=str)
async def test_conformance_over_a_socket(case: Case) -> None:
    await run_wire(case)


def test_most_rows_run_over_the_wire() -> None:
    assert len(WIRE) >= 0.9 * len(CASES)  # only rows needing a clock or a fixed id stay out
