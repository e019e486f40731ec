"""/healthz and /readyz answer for the whole gateway, from real processes.

Readiness says no while a worker is stopped (SIGSTOP), while Kafka is down and
the spool is off, and during a drain; liveness fails only for a wedged worker.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from typing import Any

import pytest

from gateway.protocols.mqtt import packets as p
from tests.helpers import Broker, child_pids, wait_until
from tests.integration.test_mqtt_e2e import RawClient

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(port: int, line_prefix: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def not_ready_because(port: int, words: str) -> dict[str, Any] | None:
    status, body = get(port, "/readyz")
    if status == 503 and body["ready"] is False and any(words in r for r in body["reasons"]):
        return body
    return None


def test_a_stopped_worker_fails_readiness_then_liveness(gateway_factory: Any,
                                                        broker: Broker) -> None:
    gw, ports = gateway_factory(workers=2, listeners__metrics__stall_timeout_s=3)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    port = ports["metrics"]
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, what="both workers ready")
    wait_until(lambda: get(port, "/healthz") == (200, {"live": True, "reasons": []}), 30,
               what="/healthz 200")
    assert gw.proc is not None
    stopped = child_pids(gw.proc.pid)[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        body = wait_until(lambda: not_ready_because(port, "event loop stalled"), 30,
                          what="/readyz 503 for the stopped worker")
        assert stopped in [w["pid"] for w in body["workers"].values()
                           if w.get("age_seconds", 0) > 3]
        _, live = wait_until(lambda: (r := get(port, "/healthz"))[0] == 503 and r, 30,
                             what="/healthz 503")
        assert live["live"] is False and "stalled" in live["reasons"][0]
        assert metric(port, "lastmile_ready") == 0
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, what="ready again after SIGCONT")
    assert get(port, "/healthz")[0] == 200
    assert gw.stop() == 0


def test_kafka_down_with_the_spool_off_fails_readiness_not_liveness(
        gateway_factory: Any, fresh_broker: Broker) -> None:
    gw, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__enabled=False)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    port = ports["metrics"]
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, what="ready")
    fresh_broker.stop()
    body = wait_until(lambda: not_ready_because(port, "Kafka cluster default unreachable"), 60,
                      what="/readyz 503 for Kafka")
    assert "the spool is off" in " ".join(body["reasons"])
    assert get(port, "/healthz")[0] == 200  # alive: restarting it would not bring Kafka back
    assert metric(port, 'lastmile_kafka_reachable{cluster="default"}') == 0
    Broker(port=fresh_broker.port).start()  # the same address again
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, what="ready once Kafka is back")
        assert metric(port, 'lastmile_kafka_reachable{cluster="default"}') == 1
    finally:
        gw.stop()
        fresh_broker.proc = None


def test_kafka_down_with_the_spool_on_stays_ready(gateway_factory: Any,
                                                  fresh_broker: Broker) -> None:
    gw, ports = gateway_factory(bootstrap=fresh_broker.bootstrap)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    port = ports["metrics"]
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, what="ready")
    fresh_broker.stop()
    wait_until(lambda: metric(port, 'lastmile_kafka_reachable{cluster="default"}') == 0, 60,
               what="Kafka seen down")
    status, body = get(port, "/readyz")
    assert (status, body["workers"]["0"]["spool_state"]) == (200, "accepting"), body
    assert gw.stop() == 0


def test_readiness_is_false_during_the_drain(gateway_factory: Any,
                                             fresh_broker: Broker) -> None:
    gw, ports = gateway_factory(workers=2, bootstrap=fresh_broker.bootstrap,
                                spool__enabled=False, shutdown_timeout_s=60)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    port = ports["metrics"]
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, what="both workers ready")
    raw = RawClient(ports["mqtt"], "drain-1")
    fresh_broker.pause()  # the publish below stays in flight: the drain waits for it
    try:
        raw.send(p.Publish(topic="bench/drain-1/x", payload=b"x", qos=1, packet_id=1))
        wait_until(lambda: (metric(port, 'lastmile_kafka_in_flight_records{cluster="default"}')
                            or 0) >= 1, 30, what="the publish in flight")
        assert get(port, "/readyz")[0] == 200  # in flight alone is no reason
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        body = wait_until(lambda: not_ready_because(port, "draining"), 30,
                          what="/readyz 503 while draining")
        assert body["draining"] is True
        assert get(port, "/healthz")[0] == 200
        assert gw.proc.poll() is None  # still draining: the answer came from a live gateway
    finally:
        fresh_broker.resume()
    assert raw.recv(30) == p.Puback(packet_id=1)
    raw.close()
    assert gw.proc.wait(60) == 0


def test_a_dead_worker_fails_readiness_until_restarted_never_liveness(
        gateway_factory: Any, broker: Broker) -> None:
    gw, ports = gateway_factory(workers=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    port = ports["metrics"]
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, what="both workers ready")
    assert gw.proc is not None
    dead = child_pids(gw.proc.pid)[0]
    os.kill(dead, signal.SIGKILL)
    seen_live: list[int] = []

    def not_ready() -> dict[str, Any] | None:
        seen_live.append(get(port, "/healthz")[0])
        status, body = get(port, "/readyz")
        return body if status == 503 else None

    body = wait_until(not_ready, 30, what="/readyz 503 for the dead worker")
    # Dead and waiting for its restart, or restarted and not started yet.
    assert any("not running" in r or "starting" in r for r in body["reasons"]), body["reasons"]

    def ready_again() -> bool:
        seen_live.append(get(port, "/healthz")[0])
        return get(port, "/readyz")[0] == 200

    wait_until(ready_again, 60, what="ready once the worker is back")
    assert set(seen_live) == {200}  # the supervisor restarts it: nothing for the kubelet to do
    assert dead not in child_pids(gw.proc.pid)
    assert sum(metric(port, f'lastmile_worker_restarts_total{{worker="{w}"}}') or 0
               for w in ("0", "1")) == 1
    assert gw.stop() == 0
