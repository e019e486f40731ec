"""Acknowledged means delivered, at the edge (issue #10 defects 1, 2, 5), against
the real ``lastmile serve`` process, a real tansu broker and real sockets.

- a client-supplied field librdkafka cannot take is a 4xx, and never wedges the spool;
- what Kafka will always refuse (too large, no such partition, no such topic) is
  refused before any ack, MQTT and HTTP alike;
- an Idempotency-Key retry after a retriable failure retries the failed records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import Broker
from tests.integration.http_support import RULES, http_gateway, tenant

pytestmark = pytest.mark.integration

JSON_V2 = "application/vnd.kafka.json.v2+json"
# gateway.config's RECORD_FRAMING, DEAD_LETTER_ROOM and RULE_ROOM (spelled out so this
# module also runs against a gateway from before them, to see these tests fail there).
RECORD_FRAMING, DEAD_LETTER_ROOM, RULE_ROOM = 36, 1024, 8192
DEFAULT_RECORD_LIMIT = 1_000_000 - RECORD_FRAMING - DEAD_LETTER_ROOM
DEFAULT_EDGE_LIMIT = DEFAULT_RECORD_LIMIT - RULE_ROOM
WRITE_AHEAD = {"spool__enabled": True, "spool__mode": "write-ahead"}


async def post(url: str, body: bytes | str, headers: dict[str, str] | None = None
               ) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers=headers or {}) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None, dict(resp.headers)


def rest_body(*records: dict[str, object]) -> str:
    return json.dumps({"records": list(records)})


# --- defect 1: client-supplied fields ------------------------------------------------


async def test_partition_beyond_int32_is_400_and_the_spool_keeps_flowing(
        tmp_path: Path, broker: Broker) -> None:
    topic = f"edge.p31.{tenant()}"
    with http_gateway(tmp_path, broker.bootstrap, spool__enabled=True,
                      spool__spill_after_ms=500) as gw:
        url = f"{gw.url}/topics/{topic}"
        status, answer, _ = await post(url, rest_body({"value": 1, "partition": 2**31}),
                                       {"Content-Type": JSON_V2})
        assert status == 400 and answer["error_code"] == 400, answer
        assert "partition" in answer["message"]
        # Later records are not stuck behind it, well past spill_after_ms.
        for i in range(3):
            await asyncio.sleep(0.3)
            status, answer, _ = await post(url, rest_body({"value": i}),
                                           {"Content-Type": JSON_V2})
            assert status == 200, answer
        got = await asyncio.to_thread(broker.read, topic, 3, 30)
        assert sorted(m.value() for m in got) == [b"0", b"1", b"2"]


def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """One request with header bytes no HTTP client library would send."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                     + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = None  # aiohttp's own parser refused the request (plain text)
    return int(head_part.split(b" ")[1]), answer


@pytest.mark.parametrize("header", [b"X-Client-Id: dev\xff\xfe", b"X-User-Property-App: \xc3",
                                    b"X-Client-Id: a\x00b"])
async def test_text_headers_that_are_not_utf8_are_400(tmp_path: Path, broker: Broker,
                                                     header: bytes) -> None:
    with http_gateway(tmp_path, broker.bootstrap) as gw:
        head = (b"POST /v1/publish/in/%s/x HTTP/1.1\r\nHost: gw\r\n" % tenant().encode()
                + header + b"\r\n")
        status, answer = await asyncio.to_thread(raw_http, gw.ports["http"], head, b"p")
    assert status == 400, answer
    if b"\x00" not in header:  # NUL is refused by aiohttp's parser before ours
        assert answer["error"] == "bad_request", answer


# --- defect 2: what Kafka will always refuse is refused before the ack --------------


def mqtt_packet(first: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([first])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def mqtt_str(text: str) -> bytes:
    return len(text).to_bytes(2, "big") + text.encode()


def big_publish(port: int, version: int, payload_len: int) -> tuple[bytes, bytes]:
    """CONNECT, then one QoS 1 PUBLISH; returns (CONNACK bytes, everything after)."""
    props = b"\x00" if version == 5 else b""
    connect = mqtt_packet(0x10, mqtt_str("MQTT") + bytes([version, 0x02, 0, 60]) + props
                          + mqtt_str(f"big-{version}"))
    publish = mqtt_packet(0x32, mqtt_str(f"ws/{tenant()}/big") + b"\x00\x01" + props
                          + b"x" * payload_len)
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(connect)
        connack = sock.recv(4096)
        # The gateway may refuse while the payload is still on its way: send it from a
        # thread and read whatever comes back until the connection closes.
        sender = threading.Thread(target=_send_quietly, args=(sock, publish), daemon=True)
        sender.start()
        rest = b""
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        sender.join(20)
        return connack, rest
    finally:
        sock.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the gateway closed: expected
        sock.sendall(data)


@pytest.mark.parametrize("version", [5, 4])
async def test_mqtt_publish_kafka_cannot_take_is_refused_before_puback(
        tmp_path: Path, broker: Broker, version: int) -> None:
    # The reproduction: 1,000,100 bytes at QoS 1 in write-ahead mode got PUBACK 0x00.
    with http_gateway(tmp_path, broker.bootstrap, **WRITE_AHEAD) as gw:
        connack, rest = await asyncio.to_thread(big_publish, gw.ports["mqtt"], version,
                                                1_000_100)
    assert connack[0] == 0x20
    if version == 5:
        # CONNACK announces the derived Maximum Packet Size (property 0x27)...
        assert b"\x27" + DEFAULT_EDGE_LIMIT.to_bytes(4, "big") in connack
        # ... and the oversize PUBLISH gets DISCONNECT 0x95, never a PUBACK.
        assert rest[:1] == b"\xe0" and rest[2] == 0x95, rest[:8]
    else:
        assert rest == b""  # 3.1.1: closed without a PUBACK
    assert b"\x40\x02\x00\x01" not in rest


async def test_http_body_kafka_cannot_take_is_413(tmp_path: Path, broker: Broker) -> None:
    with http_gateway(tmp_path, broker.bootstrap, **WRITE_AHEAD) as gw:
        url = f"{gw.url}/v1/publish/in/{tenant()}/big"
        status, answer, _ = await post(url, b"x" * 1_000_100)
        assert status == 413 and answer["error"] == "body_too_large", answer
        status, answer, _ = await post(url, b"x" * DEFAULT_EDGE_LIMIT)
        assert status == 200 and answer["deliveries"][0]["spooled"], answer


async def test_record_grown_past_the_limit_by_rules_is_413(tmp_path: Path,
                                                           broker: Broker) -> None:
    pad = "p" * (RULE_ROOM + 100)  # a rule header larger than the room kept for rules
    rules = RULES + (f'  - name: padded\n    match: {{topic: "pad/{{tenant}}/#", source: http}}\n'
                     f'    kafka: {{topic: "t.pad.{{tenant}}", headers: {{pad: "{pad}"}}}}\n')
    name = tenant()
    with http_gateway(tmp_path, broker.bootstrap, rules_text=rules, **WRITE_AHEAD) as gw:
        status, answer, _ = await post(f"{gw.url}/v1/publish/pad/{name}/x",
                                       b"x" * DEFAULT_EDGE_LIMIT)
        assert status == 413 and answer["error"] == "record_too_large", answer
        status, answer, _ = await post(f"{gw.url}/v1/publish/pad/{name}/x", b"small")
        assert status == 200, answer


def publish_once(port: int, version: int, topic: str, payload: bytes) -> bytes:
    """CONNECT, one QoS 1 PUBLISH; the bytes the gateway answers until it closes or 10 s."""
    props = b"\x00" if version == 5 else b""
    connect = mqtt_packet(0x10, mqtt_str("MQTT") + bytes([version, 0x02, 0, 60]) + props
                          + mqtt_str(f"pad-{version}"))
    publish = mqtt_packet(0x32, mqtt_str(topic) + b"\x00\x07" + props + payload)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect)
        assert sock.recv(4096)[:1] == b"\x20"
        sock.sendall(publish)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
                if len(got) >= 4:
                    break
        return got


@pytest.mark.parametrize("version", [5, 4])
async def test_mqtt_record_grown_past_the_limit_by_rules_is_refused(
        tmp_path: Path, broker: Broker, version: int) -> None:
    pad = "p" * (RULE_ROOM + 100)
    rules = RULES + (f'  - name: padded\n    match: {{topic: "mpad/{{tenant}}/#"}}\n'
                     f'    kafka: {{topic: "t.mpad.{{tenant}}", headers: {{pad: "{pad}"}}}}\n')
    with http_gateway(tmp_path, broker.bootstrap, rules_text=rules, **WRITE_AHEAD) as gw:
        got = await asyncio.to_thread(publish_once, gw.ports["mqtt"], version,
                                      f"mpad/{tenant()}/x", b"x" * (DEFAULT_EDGE_LIMIT - 100))
        log = gw.proc.log_text()
    if version == 5:
        # PUBACK for packet id 7 with 0x83 (0x95 is not a PUBACK reason code).
        assert got[:1] == b"\x40" and got[2:4] == b"\x00\x07" and got[4] == 0x83, got[:16]
    else:
        # 3.1.1 has no failure PUBACK, and closing would bring the same message back on
        # every reconnect: a permanent refusal is acked and logged (docs/mqtt.md).
        assert got[:4] == b"\x40\x02\x00\x07", got[:16]
        assert "mqtt_publish_refused" in log and "record_too_large" in log


async def test_partition_the_topic_does_not_have_is_404_before_the_ack(
        tmp_path: Path, broker: Broker) -> None:
    # Write-ahead acks from the spool: without the check, partition 5 of a two-partition
    # topic was acked, then refused by Kafka for good.
    known, fresh = f"edge.parts.{tenant()}", f"edge.fresh.{tenant()}"
    broker.create_topic(known, partitions=2)
    with http_gateway(tmp_path, broker.bootstrap, **WRITE_AHEAD) as gw:
        headers = {"Content-Type": JSON_V2}
        status, answer, _ = await post(f"{gw.url}/topics/{known}",
                                       rest_body({"value": 1, "partition": 5}), headers)
        assert (status, answer["error_code"]) == (404, 40402), answer
        status, answer, _ = await post(f"{gw.url}/topics/{known}",
                                       rest_body({"value": 2, "partition": 1}), headers)
        assert status == 200, answer
        # A topic the gateway has not seen: 503 (retry) until its metadata is known.
        broker.create_topic(fresh, partitions=2)
        deadline = time.monotonic() + 30
        while True:
            status, answer, resp_headers = await post(
                f"{gw.url}/topics/{fresh}", rest_body({"value": 3, "partition": 1}), headers)
            if status != 503 or time.monotonic() > deadline:
                break
            assert resp_headers.get("Retry-After")
            await asyncio.sleep(0.2)
        assert status == 200, answer
        status, answer, _ = await post(f"{gw.url}/topics/{fresh}",
                                       rest_body({"value": 4, "partition": 2}), headers)
        assert (status, answer["error_code"]) == (404, 40402), answer
    got = await asyncio.to_thread(broker.read, known, 1, 30)
    assert [(m.value(), m.partition()) for m in got] == [(b"2", 1)]


async def test_missing_topic_is_refused_before_the_spill_acks_it(tmp_path: Path,
                                                                  broker: Broker) -> None:
    # A cluster that does not auto-create topics; hand-off mode spills (and acks) records
    # Kafka has not confirmed within spill_after_ms.  librdkafka waited 30 s
    # (topic.metadata.propagation.max.ms) before saying "unknown topic": by then the
    # record was acked from the spool.
    clusters = {"default": {"bootstrap_servers": broker.bootstrap, "connect_timeout_s": 5,
                            "producer": {"allow.auto.create.topics": False}}}
    with http_gateway(tmp_path, broker.bootstrap, spool__enabled=True,
                      spool__spill_after_ms=2000, kafka__clusters=clusters) as gw:
        started = time.monotonic()
        status, answer, _ = await post(f"{gw.url}/topics/edge.missing.{tenant()}",
                                       rest_body({"value": 1}), {"Content-Type": JSON_V2})
        assert (status, answer["error_code"]) == (404, 40401), answer
        assert time.monotonic() - started < 30


# --- defect 5: Idempotency-Key keeps only final answers --------------------------------


async def test_idempotent_batch_retry_produces_only_the_failed_records(
        tmp_path: Path, broker: Broker, fresh_broker: Broker) -> None:
    name = tenant()
    rules = RULES + ('  - name: other-cluster\n'
                     '    match: {topic: "other/{tenant}/#", source: http}\n'
                     '    kafka: {cluster: other, topic: "t.other.{tenant}"}\n')
    clusters = {"default": {"bootstrap_servers": broker.bootstrap, "connect_timeout_s": 5},
                "other": {"bootstrap_servers": fresh_broker.bootstrap, "connect_timeout_s": 5,
                          "message_timeout_ms": 1500}}
    batch = json.dumps([{"topic": f"in/{name}/a", "payload_text": "to-default"},
                        {"topic": f"other/{name}/b", "payload_text": "to-other"}])
    headers = {"Content-Type": "application/json", "Idempotency-Key": "batch-1",
               "X-Client-Id": "app-1"}
    with http_gateway(tmp_path, broker.bootstrap, rules_text=rules,
                      kafka__clusters=clusters) as gw:
        fresh_broker.pause()  # the other cluster hangs after the gateway started
        status, answer, resp_headers = await post(f"{gw.url}/v1/batch", batch, headers)
        assert status == 207, answer
        assert answer["results"][0]["status"] == 200
        assert answer["results"][1]["status"] >= 500
        first_headers = resp_headers
        # A retry while the cluster is still down tries record 1 again (a second
        # timeout), and only it.
        status, answer, _ = await post(f"{gw.url}/v1/batch", batch, headers)
        assert status == 207 and answer["results"][1]["status"] >= 500, answer
        fresh_broker.resume()  # the cluster is back
        deadline = time.monotonic() + 60
        while status != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            status, answer, _ = await post(f"{gw.url}/v1/batch", batch, headers)
        assert status == 200, answer
        # Settled now: the same answer is replayed, nothing produced again.
        replay_status, replay, _ = await post(f"{gw.url}/v1/batch", batch, headers)
        assert (replay_status, replay) == (200, answer)
    assert "Retry-After" in first_headers  # a retriable record failure says when to retry
    default_records = await asyncio.to_thread(broker.read, f"t.http.{name}", 2, 5)
    assert [m.value() for m in default_records] == [b"to-default"]  # produced once
    other_records = await asyncio.to_thread(fresh_broker.read, f"t.other.{name}", 1, 30)
    assert [m.value() for m in other_records] == [b"to-other"]
