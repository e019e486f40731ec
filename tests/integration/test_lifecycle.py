"""Signals to a real `lastmile serve`: SIGTERM drains, a second signal exits, SIGHUP reloads.

With one worker the signal goes to the gateway process itself; with ``workers: 2``
it goes to the supervisor, which must pass it on to every worker.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.protocols.mqtt import packets as p
from tests.helpers import (
    Broker,
    GatewayProcess,
    child_pids,
    log_events,
    one_per_worker,
    wait_until,
)
from tests.integration.test_mqtt_e2e import RawClient

pytestmark = pytest.mark.integration

QOS0 = 200
HTTP_ASYNC = 20


def start(gateway_factory: Any, workers: int, **overrides: Any) -> tuple[GatewayProcess, dict]:
    gw, ports = gateway_factory(workers=workers, **overrides)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    # Every worker up (signal handlers installed) before any test signal is sent.
    wait_until(lambda: len(log_events(gw.log_text(), "gateway_started")) == workers, 60,
               what=f"{workers} workers started")
    return gw, ports


def post_async(port: int, topic: str, body: bytes, client_id: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/publish/{topic}?async=true",
                                 data=body, headers={"X-Client-Id": client_id})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return int(resp.status)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def warm_client(ports: dict[str, int], prefix: str) -> tuple[RawClient, str, str]:
    """A connected client whose first record is in Kafka (topic made, producer up)."""
    client_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    topic = f"bench/{client_id}/x"
    raw = RawClient(ports["mqtt"], client_id)
    raw.send(p.Publish(topic=topic, payload=b"warm", qos=1, packet_id=1))
    assert raw.recv(30) == p.Puback(packet_id=1)
    return raw, client_id, topic


def taken(raw: RawClient) -> None:
    """The gateway answers a PINGREQ when it reads it: everything sent before was taken."""
    raw.send(p.Pingreq())
    assert raw.recv(30) == p.Pingresp()


def stopping(gw: GatewayProcess, workers: int) -> None:
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: len(log_events(gw.log_text(), "shutdown_requested")) == workers, 30,
               what="every worker to start its shutdown")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_flushes_every_accepted_record_to_kafka(
    gateway_factory: Any, fresh_broker: Broker, workers: int
) -> None:
    """Spool off, Kafka hung: async HTTP 202s are in the producer's queue only (no
    connection waits for them). SIGTERM closes the listeners, then waits on the Kafka
    flush; once Kafka answers, every accepted record is there and the gateway exits 0."""
    gw, ports = start(gateway_factory, workers, bootstrap=fresh_broker.bootstrap,
                      spool__enabled=False, shutdown_timeout_s=90,
                      kafka__clusters__default__message_timeout_ms=120_000)
    raw, client_id, topic = warm_client(ports, "drain")
    raw.close()
    expected = {b"warm"}
    fresh_broker.pause()
    try:
        for i in range(HTTP_ASYNC):
            assert post_async(ports["http"], topic, b"http-%d" % i, client_id) == 202
            expected.add(b"http-%d" % i)
            # Spaced past linger.ms: one produce request each, so after the first five
            # (the idempotent producer's in-flight limit; sent requests land even if
            # the gateway dies) the rest wait in librdkafka's queue for the flush.
            time.sleep(0.03)
        stopping(gw, workers)
        # Listeners close in reverse start order, metrics last: after that only the
        # buffer and the Kafka flush are left, and Kafka is still hung. (With workers
        # the supervisor serves the metrics listener until it exits: /readyz says 503.)
        for name in ("mqtt", "http", "metrics")[:3 if workers == 1 else 2]:
            wait_until(lambda name=name: refused(ports[name]), 30, what=f"{name} closed")
        if workers > 1:
            with pytest.raises(urllib.error.HTTPError) as not_ready:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/readyz", timeout=10)
            assert not_ready.value.code == 503
        # A gateway that skips the flush exits now and its queued records are gone; one
        # that flushes waits for Kafka. (This grace can only miss a break on a very slow
        # machine; a correct gateway passes however long it takes.)
        assert gw.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            gw.proc.wait(5)
        assert gw.proc.poll() is None, "exited with accepted records unsent and Kafka hung"
    finally:
        fresh_broker.resume()
    assert gw.proc.wait(90) == 0, gw.log_text()[-3000:]
    mine = [m.value() for m in fresh_broker.read_all("bench") if m.key() == client_id.encode()]
    missing = expected - set(mine)
    assert not missing, f"{len(missing)} accepted records not in Kafka, e.g. {sorted(missing)[:3]}"
    assert set(mine) == expected


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_inflight_acks(gateway_factory: Any, fresh_broker: Broker,
                                       workers: int) -> None:
    """Messages waiting for Kafka at SIGTERM (QoS 0 records, one QoS 1) are answered
    before the gateway closes the connection: the PUBACK comes and every record is in
    Kafka. New connections are refused meanwhile."""
    gw, ports = start(gateway_factory, workers, bootstrap=fresh_broker.bootstrap,
                      spool__enabled=False, shutdown_timeout_s=90,
                      kafka__clusters__default__message_timeout_ms=120_000)
    raw, client_id, topic = warm_client(ports, "inflight")
    expected = [b"warm", *(b"q0-%d" % i for i in range(QOS0)), b"inflight"]
    fresh_broker.pause()
    try:
        for value in expected[1:-1]:
            raw.send(p.Publish(topic=topic, payload=value, qos=0))
        raw.send(p.Publish(topic=topic, payload=b"inflight", qos=1, packet_id=2))
        taken(raw)
        stopping(gw, workers)
        wait_until(lambda: refused(ports["mqtt"]), 30, what="the listener to stop accepting")
        assert gw.proc is not None and gw.proc.poll() is None, \
            "exited while a PUBACK was owed and Kafka was hung"
    finally:
        fresh_broker.resume()
    assert raw.recv(60) == p.Puback(packet_id=2), "the in-flight PUBACK was not answered"
    assert raw.recv(30) is None  # then the connection ends (3.1.1: closed, no DISCONNECT)
    assert gw.proc.wait(90) == 0, gw.log_text()[-3000:]
    mine = [m.value() for m in fresh_broker.read_all("bench") if m.key() == client_id.encode()]
    assert mine == expected  # one key, one partition: in the order sent


@pytest.mark.parametrize("workers", [1, 2])
def test_second_signal_exits_at_once(gateway_factory: Any, fresh_broker: Broker,
                                     workers: int) -> None:
    """A drain stuck on a hung Kafka (300 s deadline) ends at the second SIGTERM."""
    gw, ports = start(gateway_factory, workers, bootstrap=fresh_broker.bootstrap,
                      spool__enabled=False, shutdown_timeout_s=300,
                      kafka__clusters__default__message_timeout_ms=300_000)
    client_id = f"twice-{uuid.uuid4().hex[:8]}"
    raw = RawClient(ports["mqtt"], client_id)
    raw.send(p.Publish(topic=f"bench/{client_id}/x", payload=b"warm", qos=1, packet_id=1))
    assert raw.recv(30) == p.Puback(packet_id=1)
    fresh_broker.pause()
    try:
        raw.send(p.Publish(topic=f"bench/{client_id}/x", payload=b"stuck", qos=1, packet_id=2))
        raw.send(p.Pingreq())
        assert raw.recv(30) == p.Pingresp()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: len(log_events(gw.log_text(), "shutdown_requested")) == workers, 30,
                   what="the graceful shutdown to start")
        assert gw.proc.poll() is None  # draining: the PUBACK is still owed
        gw.proc.send_signal(signal.SIGTERM)
        # Far inside the 300 s drain deadline: the second signal did not wait for it.
        code = gw.proc.wait(60)
        assert code != 0
        if workers > 1:
            wait_until(lambda: not child_pids(gw.proc.pid), 10, what="workers gone")
    finally:
        fresh_broker.resume()


RULES = """\
rules:
  - {{name: hup, match: "hup/{{run}}/#", kafka: {{topic: "hup.{{run}}.{version}"}}}}
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_rules_in_every_worker(gateway_factory: Any, broker: Broker,
                                              rules_dir: Path, workers: int) -> None:
    run = uuid.uuid4().hex[:8]
    (rules_dir / "05-hup.yaml").write_text(RULES.format(version="v1"))
    gw, ports = start(gateway_factory, workers, rules__watch=False)
    assert gw.proc is not None
    pids = child_pids(gw.proc.pid) if workers > 1 else [gw.proc.pid]
    assert len(pids) == workers
    # One connection on each worker (the kernel spreads them; open more until it has).
    by_worker = one_per_worker(lambda n: RawClient(ports["mqtt"], f"hup-{run}-{n}"), pids)

    loaded_before = len(log_events(gw.log_text(), "rules_loaded"))
    (rules_dir / "05-hup.yaml").write_text(RULES.format(version="v2"))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(log_events(gw.log_text(), "rules_loaded")) - loaded_before >= workers,
               30, what="every worker to load the new rules")
    for i, raw in enumerate(by_worker.values()):
        raw.send(p.Publish(topic=f"hup/{run}/w{i}", payload=b"w%d" % i, qos=1, packet_id=1))
        assert raw.recv(30) == p.Puback(packet_id=1)
    got = sorted(m.value() for m in broker.read(f"hup.{run}.v2", workers))
    assert got == [b"w%d" % i for i in range(workers)], "a worker still routes by the old rules"
    assert broker.read_all(f"hup.{run}.v1") == []
    assert gw.proc.poll() is None  # SIGHUP must not end any process
    assert child_pids(gw.proc.pid) == (pids if workers > 1 else [])
    for raw in by_worker.values():
        raw.close()
    assert gw.stop() == 0
