"""`lastmile serve` as an operator runs it: shipped config, embedded broker, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, GatewayProcess, free_port, wait_port

pytestmark = pytest.mark.integration


def test_shipped_config_starts_embedded_broker_and_stops_cleanly(tmp_path: Path) -> None:
    mqtt, kafka, metrics, http = free_port(), free_port(), free_port(), free_port()
    env = {
        "LASTMILE_MQTT_PORT": str(mqtt),
        "LASTMILE_HTTP_PORT": str(http),
        "LASTMILE_LISTENERS__METRICS__PORT": str(metrics),
        "LASTMILE_KAFKA__EMBEDDED__PORT": str(kafka),
        "LASTMILE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    gw = GatewayProcess(ROOT / "config" / "gateway.yaml", tmp_path / "gw.log", env=env)
    gw.start(wait_for=("127.0.0.1", mqtt))
    try:
        wait_port("127.0.0.1", kafka)  # the embedded broker answers where the log says
        subprocess.run(["mosquitto_pub", "-p", str(mqtt), "-i", "walkthrough-1", "-q", "1",
                        "-t", "bench/walkthrough-1/temp", "-m", "21.5"], check=True, timeout=20)
        # As the README says: lastmile consume reads what arrived in the embedded broker.
        out = subprocess.run([sys.executable, "-m", "gateway.cli", "consume", "bench",
                              "--config", str(ROOT / "config" / "gateway.yaml")],
                             capture_output=True, text=True, cwd=ROOT, timeout=60,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1 and lines[0].endswith(" walkthrough-1 21.5"), out.stdout
    finally:
        code = gw.stop(signal.SIGTERM)
    assert code == 0, gw.log_text()[-3000:]
    events = [json.loads(line)["event"] for line in gw.log_text().splitlines()
              if line.startswith("{")]
    assert "embedded_kafka_started" in events
    assert events[-1] == "gateway_stopped"
    assert "embedded_kafka_stopped" in events
    # The child broker is gone with the gateway.
    with pytest.raises(TimeoutError):
        wait_port("127.0.0.1", kafka, timeout=1)


def test_config_error_exits_non_zero_naming_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("listeners:\n  mqtt:\n    port: 1883\n    hots: 0.0.0.0\n")
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}:4: listeners.mqtt.hots: unknown key" in proc.stderr


def test_unreachable_kafka_fails_startup_clearly(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    dead = free_port()
    cfg.write_text(
        "kafka:\n  clusters:\n    default:\n"
        f"      bootstrap_servers: 127.0.0.1:{dead}\n      connect_timeout_s: 1\n"
        f"listeners:\n  mqtt: {{port: {free_port()}}}\n  http: {{port: {free_port()}}}\n"
        f"  metrics: {{port: {free_port()}}}\n"
    )
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert f"127.0.0.1:{dead} did not answer within 1s" in proc.stderr


def test_help_lists_the_commands() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0
    for command in ("serve", "rules", "spool"):
        assert command in proc.stdout
