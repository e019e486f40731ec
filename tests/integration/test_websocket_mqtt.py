"""MQTT over WebSocket (``GET /mqtt``) with real clients: paho-mqtt and aiomqtt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import aiomqtt
import paho.mqtt.client as paho
import pytest

from tests.helpers import Broker
from tests.integration.http_support import Gateway, http_gateway, tenant

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Gateway]:
    with http_gateway(tmp_path_factory.mktemp("ws"), broker.bootstrap) as gateway:
        yield gateway


def test_paho_over_websocket_qos_0_1_2(gw: Gateway, broker: Broker) -> None:
    t = tenant()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-ws",
                         transport="websockets", protocol=paho.MQTTv311)
    client.ws_set_options(path="/mqtt")
    client.connect("127.0.0.1", gw.ports["http"], keepalive=30)
    client.loop_start()
    try:
        infos = [client.publish(f"ws/{t}/q{qos}", f"paho-{qos}".encode(), qos=qos)
                 for qos in (0, 1, 2)]
        for info in infos:
            info.wait_for_publish(10)  # QoS 1/2: PUBACK / PUBCOMP came back over the socket
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    got = {m.value(): m.key() for m in broker.read(f"t.ws.{t}", 3)}
    assert got == {b"paho-0": b"paho-ws", b"paho-1": b"paho-ws", b"paho-2": b"paho-ws"}


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_aiomqtt_over_websocket_qos_0_1_2(gw: Gateway, broker: Broker,
                                                version: aiomqtt.ProtocolVersion) -> None:
    t = tenant()
    async with aiomqtt.Client("127.0.0.1", gw.ports["http"], identifier=f"aio-{t}",
                              transport="websockets", websocket_path="/mqtt",
                              protocol=version, timeout=10) as client:
        for qos in (0, 1, 2):
            # publish() returns once the QoS handshake is complete (for 1 and 2).
            await client.publish(f"ws/{t}/q{qos}", f"aio-{qos}".encode(), qos=qos)
    records = broker.read(f"t.ws.{t}", 3)
    assert sorted(m.value() for m in records) == [b"aio-0", b"aio-1", b"aio-2"]


async def test_websocket_without_mqtt_subprotocol_is_closed(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{gw.url}/mqtt", protocols=("chat",)) as ws:
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1002


async def test_many_packets_in_one_frame_and_one_packet_over_frames(gw: Gateway,
                                                                   broker: Broker) -> None:
    t = tenant()
    connect = (b"\x10\x10\x00\x04MQTT\x04\x02\x00\x1e\x00\x04raw1")
    topic = f"ws/{t}/raw".encode()
    var = len(topic).to_bytes(2, "big") + topic + b"\x00\x07"
    publish = bytes([0x32, len(var) + 5]) + var + b"hello"  # QoS 1, packet id 7
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{gw.url}/mqtt", protocols=("mqtt",)) as ws:
        assert ws.protocol == "mqtt"
        await ws.send_bytes(connect + publish[:3])  # CONNECT and a PUBLISH's first bytes
        await ws.send_bytes(publish[3:])
        seen = b""
        while b"\x40\x02\x00\x07" not in seen:  # PUBACK for packet id 7
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            seen += msg.data
        assert seen.startswith(b"\x20\x02\x00\x00")  # CONNACK accepted
    [record] = broker.read(f"t.ws.{t}", 1)
    assert record.value() == b"hello"
