"""`lastmile spool inspect` as an operator runs it, on the spool of a real gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.protocols.mqtt import packets as p
from tests.helpers import ROOT, Broker, wait_until
from tests.integration.test_mqtt_e2e import RawClient

pytestmark = pytest.mark.integration

ACKED = 5


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "spool", "inspect", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_inspect_shows_what_the_spool_owes_kafka(gateway_factory: Any, fresh_broker: Broker,
                                                  tmp_path: Path) -> None:
    gw, ports = gateway_factory(bootstrap=fresh_broker.bootstrap, spool__spill_after_ms=300)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    client_id = f"insp-{uuid.uuid4().hex[:8]}"
    raw = RawClient(ports["mqtt"], client_id)
    raw.send(p.Publish(topic=f"bench/{client_id}/x", payload=b"warm", qos=1, packet_id=1))
    assert raw.recv(30) == p.Puback(packet_id=1)
    fresh_broker.pause()
    try:
        for i in range(ACKED):  # Kafka hung: the PUBACKs come from the spool
            raw.send(p.Publish(topic=f"bench/{client_id}/x", payload=b"%d" % i, qos=1,
                               packet_id=i + 2))
        for i in range(ACKED):
            assert raw.recv(60) == p.Puback(packet_id=i + 2)
        gw.kill9()
    finally:
        fresh_broker.resume()

    config = str(tmp_path / "gateway-0.yaml")  # the factory's config: spool.dir from it
    out = inspect("--config", config, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["records"] == ACKED and report["topics"] == {"default/bench": ACKED}, report
    assert report["damage"] == [] and report["oldest_record_age_s"] >= 0
    assert list(report["workers"]) == ["worker-0"]
    text = inspect(str(tmp_path / "spool"))
    assert text.returncode == 0, text.stderr
    assert f"{ACKED} records waiting for Kafka" in text.stdout
    assert "default/bench: 5" in text.stdout

    # Restarted with Kafka back, the gateway drains the spool: inspect sees it empty.
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    wait_until(lambda: json.loads(inspect(str(tmp_path / "spool"), "--json").stdout)["records"]
               == 0, 60, what="the spool to drain")
    assert gw.stop() == 0
    got = [m.value() for m in fresh_broker.read_all("bench") if m.key() == client_id.encode()]
    # Sent before the kill and replayed after it: at least once allows the copies.
    assert set(got) == {b"warm", *(b"%d" % i for i in range(ACKED))}


def test_inspect_of_a_missing_spool_exits_2(tmp_path: Path) -> None:
    out = inspect(str(tmp_path / "nothing-here"))
    assert out.returncode == 2
    assert "no spool directory" in out.stderr


def test_inspect_of_a_fresh_spool_says_empty(gateway_factory: Any, tmp_path: Path) -> None:
    # A gateway that started and stopped with Kafka up never spooled: no ledger, no segment.
    gw, ports = gateway_factory()
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    assert gw.stop() == 0
    assert (tmp_path / "spool" / "worker-0").is_dir()
    out = inspect(str(tmp_path / "spool"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"spool {tmp_path / 'spool'}: empty, nothing waiting for "
                                  "Kafka (1 worker spool(s))")
    assert "damaged" not in out.stdout
    report = json.loads(inspect(str(tmp_path / "spool"), "--json").stdout)
    assert report["empty"] is True and report["records"] == 0
    assert report["workers"]["worker-0"]["ledger"] == "empty"


def test_inspect_of_a_damaged_ledger_says_damaged(tmp_path: Path) -> None:
    worker = tmp_path / "spool" / "worker-0"
    worker.mkdir(parents=True)
    (worker / "ledger").write_bytes(b"LML1 torn")  # there, but not a ledger
    out = inspect(str(tmp_path / "spool"))
    assert out.returncode == 1, out.stdout
    assert "ledger: watermark 0, DAMAGED: every record on disk replays" in out.stdout
    report = json.loads(inspect(str(tmp_path / "spool"), "--json").stdout)
    assert report["empty"] is False and report["workers"]["worker-0"]["ledger"] == "damaged"
