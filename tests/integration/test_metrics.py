"""The metrics listener shows what an operator watches: traffic, Kafka, rules, health."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.protocols.mqtt import packets as p
from tests.helpers import (
    ROOT,
    Broker,
    GatewayProcess,
    child_pids,
    log_events,
    one_per_worker,
    wait_port,
    wait_until,
    write_config,
)
from tests.integration.test_mqtt_e2e import RawClient

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def metrics_when(base: str, name: str, at_least: float) -> str | None:
    """The /metrics text once ``name`` has reached ``at_least`` (else None)."""
    _, text = get(f"{base}/metrics")
    try:
        return text if sample(text, name) >= at_least else None
    except AssertionError:  # not exported yet
        return None


def test_metrics_health_and_readiness(gateway_factory, broker: Broker) -> None:
    import paho.mqtt.client as mqtt

    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['metrics']}"
    assert get(f"{base}/healthz")[0] == 200
    # Ready once every stage is up (shortly after the listeners open).
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 30, what="/readyz 200")
    assert json.loads(get(f"{base}/readyz")[1])["ready"] is True

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="metrics-1")
    client.connect("127.0.0.1", ports["mqtt"])
    client.loop_start()
    for i in range(5):
        client.publish("bench/metrics-1/x", str(i), qos=1).wait_for_publish(10)
    client.publish("metrics/unrouted", b"?", qos=1).wait_for_publish(10)  # dead-lettered
    # The pump copies counters once a second: wait for the copy, not for a second.
    text = wait_until(lambda: metrics_when(base, "lastmile_messages_received_total", 6),
                      30, what="the counters in /metrics")
    assert sample(text, "lastmile_messages_received_total") >= 5
    assert sample(text, 'lastmile_records_total{cluster="default",result="delivered"}') >= 5
    assert sample(text, "lastmile_mqtt_connections") == 1
    assert sample(text, 'lastmile_messages_total{outcome="routed"}') >= 5
    assert sample(text, 'lastmile_refused_total{reason="no_matching_rule"}') >= 1
    assert 'lastmile_rules_info{version="' in text
    client.disconnect()
    client.loop_stop()


def test_metrics_are_summed_over_workers(gateway_factory, broker: Broker) -> None:
    """With two workers any worker's /metrics shows the sum: 3 messages through one
    worker and 4 through the other read 7, whichever worker answers."""
    gw, ports = gateway_factory(workers=2)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.proc is not None
    wait_until(lambda: len(log_events(gw.log_text(), "gateway_started")) == 2, 60,
               what="both workers started")
    workers = child_pids(gw.proc.pid)
    by_worker = one_per_worker(lambda n: RawClient(ports["mqtt"], f"sum-{n}"), workers)
    for count, raw in zip((3, 4), by_worker.values(), strict=True):
        for i in range(count):
            raw.send(p.Publish(topic="bench/sum/x", payload=b"%d" % i, qos=1, packet_id=i + 1))
            assert raw.recv(30) == p.Puback(packet_id=i + 1)
    base = f"http://127.0.0.1:{ports['metrics']}"

    def summed() -> bool:
        _, text = get(f"{base}/metrics")
        try:
            return (sample(text, "lastmile_messages_received_total") == 7
                    and sample(text, "lastmile_mqtt_connections") == 2)
        except AssertionError:
            return False

    wait_until(summed, 30, what="/metrics to show the sum over both workers")
    for _ in range(3):  # the supervisor answers: the same sum every time
        assert summed()
    for raw in by_worker.values():
        raw.close()


class PipedGateway(GatewayProcess):
    """``lastmile serve`` with stderr on a pipe, as a container runtime reads it: the
    workers' and the supervisor's lines arrive interleaved as the kernel took them."""

    def start(self, wait_for: tuple[str, int] | None = None) -> PipedGateway:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=self.env)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait_for is not None:
            wait_port(*wait_for, timeout=30, proc=self.proc)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(1 << 16):
            self.chunks.append(chunk)

    def log_text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def documented_metrics() -> set[str]:
    """Metric names in the tables of docs/metrics.md."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))


# Documented and implemented by the hot-path work (issue 16): checked when present.
LATENCY_HISTOGRAMS = {"lastmile_ack_latency_seconds", "lastmile_kafka_delivery_latency_seconds"}
# One series per downlink partition: none without downlink rules (test_downlink.py has it).
PER_PARTITION = {"lastmile_downlink_consumer_lag"}


def defined_in_gateway(name: str) -> bool:
    return any(name in path.read_text() for path in (ROOT / "gateway").rglob("*.py"))


def test_two_workers_metrics_after_traffic_and_every_log_line_is_json(
        tmp_path: Path, broker: Broker, rules_dir: Path) -> None:
    """A 2-worker gateway after real MQTT and HTTP traffic: the counters moved as the
    traffic implies, pre-initialised counters are there at 0, histograms have
    observations, every name is documented; and every stderr line, both workers
    logging at once included (reload, shutdown), is one JSON object with worker
    and pid."""
    cfg = tmp_path / "gateway.yaml"
    ports = write_config(cfg, bootstrap=broker.bootstrap, rules_dir=rules_dir,
                         spool_dir=tmp_path / "spool", workers=2)
    gw = PipedGateway(cfg, tmp_path / "unused.log").start(("127.0.0.1", ports["mqtt"]))
    base = f"http://127.0.0.1:{ports['metrics']}"
    try:
        assert gw.proc is not None
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, 60, what="both workers ready")
        workers = child_pids(gw.proc.pid)
        assert len(workers) == 2
        by_worker = one_per_worker(lambda n: RawClient(ports["mqtt"], f"traffic-{n}"), workers)
        mqtt_sent = 0
        for count, raw in zip((3, 4), by_worker.values(), strict=True):
            for i in range(count):
                raw.send(p.Publish(topic="bench/traffic/x", payload=b"%d" % i, qos=1,
                                   packet_id=i + 1))
                assert raw.recv(30) == p.Puback(packet_id=i + 1)
                mqtt_sent += 1
        raw = next(iter(by_worker.values()))
        raw.send(p.Publish(topic="metrics/unrouted", payload=b"?", qos=1, packet_id=99))
        assert raw.recv(30) == p.Puback(packet_id=99)  # dead-lettered, then acked
        http_sent = 3
        for i in range(http_sent):
            req = urllib.request.Request(
                f"http://127.0.0.1:{ports['http']}/v1/publish/app/shop/events/click",
                data=json.dumps({"user": {"id": f"u{i}"}}).encode(),
                headers={"X-Client-Id": f"phone-{i}"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 200
        received = mqtt_sent + 1 + http_sent
        records = received  # one record each (the unrouted one to the dead-letter topic)

        def moved() -> dict[str, Any] | None:
            text = get(f"{base}/metrics")[1]
            try:
                done = (sample(text, "lastmile_messages_received_total") == received
                        and sample(text, 'lastmile_records_total{cluster="default",'
                                         'result="delivered"}') == records)
            except AssertionError:
                return None
            return families(text) if done else None

        got = wait_until(moved, 30, what="the traffic in /metrics")

        def value(name: str, **labels: str) -> float:
            for family in got.values():
                for s in family.samples:
                    if s.name == name and s.labels == labels:
                        return float(s.value)
            raise AssertionError(f"{name}{labels} not in /metrics")

        assert value("lastmile_messages_total", outcome="routed") == mqtt_sent + http_sent
        assert value("lastmile_messages_total", outcome="dead_lettered") == 1
        assert value("lastmile_messages_total", outcome="refused") == 0
        assert value("lastmile_refused_total", reason="no_matching_rule") == 1
        assert value("lastmile_records_submitted_total") == records
        assert value("lastmile_auth_accepted_total", method="anonymous") >= 2 + http_sent
        assert value("lastmile_mqtt_connections") == 2
        # At 0 from the start: an alert on increase() sees the first one.
        for name, labels in [("lastmile_buffer_records_total", {"event": "lost_after_ack"}),
                             ("lastmile_buffer_records_total", {"event": "dead_lettered"}),
                             ("lastmile_records_total", {"cluster": "default",
                                                         "result": "failed"}),
                             ("lastmile_refused_total", {"reason": "payload_invalid"}),
                             ("lastmile_auth_refused_total", {"reason": "bad_credentials"}),
                             ("lastmile_http_refused_total", {"reason": "body_timeout"}),
                             ("lastmile_rules_reloads_total", {"result": "failed"}),
                             ("lastmile_metrics_pump_failures_total", {})]:
            assert value(name, **labels) == 0, (name, labels)
        # Per worker, and the supervisor's own.
        for worker in ("0", "1", "supervisor"):
            assert value("process_cpu_seconds_total", worker=worker) > 0
            assert value("process_resident_memory_bytes", worker=worker) > 0
            assert value("process_open_fds", worker=worker) > 0
            assert value("process_start_time_seconds", worker=worker) > 0
        for worker in ("0", "1"):
            assert value("lastmile_worker_up", worker=worker) == 1
            assert value("lastmile_worker_restarts_total", worker=worker) == 0
        assert value("lastmile_ready") == 1
        assert value("lastmile_kafka_reachable", cluster="default") == 1
        assert [s.value for s in got["lastmile_rules_info"].samples] == [1]
        assert value("lastmile_rules_loaded") > 1
        assert value("lastmile_event_loop_lag_samples_seconds_count") > 0
        for name in sorted(LATENCY_HISTOGRAMS):
            if not defined_in_gateway(name):
                continue  # not in this build yet: documented ahead of it
            counts = [s.value for s in got[name].samples if s.name == f"{name}_count"]
            assert sum(counts) >= (mqtt_sent if "ack" in name else records), name
        # Conventions, and every name documented (the dashboard is built from the doc).
        documented = documented_metrics()
        for family in got.values():
            full = family.name + ("_total" if family.type == "counter" else "")
            assert full in documented, f"{full} missing from docs/metrics.md"
            assert family.documentation, f"{full} has no help text"
        exported = {f.name + ("_total" if f.type == "counter" else "") for f in got.values()}
        assert documented - LATENCY_HISTOGRAMS - PER_PARTITION - exported == set(), (
            "documented, not exported")

        # Both workers log at once: a reload through the supervisor, then the shutdown.
        (rules_dir / "95-extra.yaml").write_text(
            'rules:\n  - {name: extra, match: "extra/#", kafka: {topic: extra}}\n')
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: value_now(base, 'lastmile_rules_reloads_total{result="ok"}') >= 2,
                   30, what="both workers reloaded")
    finally:
        for client in list(locals().get("by_worker", {}).values()):
            client.close()
        code = gw.stop()
    gw.reader.join(10)
    assert code == 0
    lines = gw.log_text().splitlines()
    assert len(lines) > 20
    seen: dict[object, set[int]] = {}
    for line in lines:
        entry = json.loads(line)  # every line, whole
        assert isinstance(entry, dict) and {"event", "level", "timestamp"} <= entry.keys(), line
        assert "worker" in entry and isinstance(entry["pid"], int), line
        seen.setdefault(entry["worker"], set()).add(entry["pid"])
    assert set(seen) == {0, 1, "supervisor"}
    assert seen["supervisor"] == {gw.proc.pid}
    assert seen[0] | seen[1] == set(workers) and not seen[0] & seen[1]
    stopped = [json.loads(line)["worker"] for line in lines if '"gateway_stopped"' in line]
    assert sorted(stopped) == [0, 1]


def value_now(base: str, name: str) -> float:
    try:
        return sample(get(f"{base}/metrics")[1], name)
    except AssertionError:
        return 0.0
