"""`lastmile serve` as an operator runs it: shipped config, embedded broker, signals."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, GatewayProcess, free_port, readme_commands, wait_port

pytestmark = pytest.mark.integration


DEFAULT_PORTS = {"1883": "mqtt", "9100": "metrics", "8080": "http"}


def walkthrough_argv(command: str, ports: dict[str, int]) -> list[str]:
    """A README walkthrough command on this test's ports, ``lastmile`` from this checkout."""
    command = re.sub(r"localhost:(\d+)", lambda m: f"127.0.0.1:{ports[DEFAULT_PORTS[m[1]]]}",
                     command)
    command = re.sub(r"-p (\d+)", lambda m: f"-p {ports[DEFAULT_PORTS[m[1]]]}", command)
    argv = shlex.split(command)
    if argv[0] == ".venv/bin/lastmile":
        argv = [sys.executable, "-m", "gateway.cli", *argv[1:]]
    return argv


def test_readme_walkthrough_on_the_shipped_config(tmp_path: Path) -> None:
    """The README's 60-second walkthrough, read from README.md and run as written (ports
    moved to free ones): shipped config, embedded broker, and what each comment says."""
    ports = {"mqtt": free_port(), "http": free_port(), "metrics": free_port()}
    kafka = free_port()
    env = {
        "LASTMILE_MQTT_PORT": str(ports["mqtt"]),
        "LASTMILE_HTTP_PORT": str(ports["http"]),
        "LASTMILE_LISTENERS__METRICS__PORT": str(ports["metrics"]),
        "LASTMILE_KAFKA__EMBEDDED__PORT": str(kafka),
        "LASTMILE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    steps = readme_commands("## 60-second walkthrough")
    assert steps[0][0] == "make run"  # what `make run` runs is what we start here
    assert "lastmile serve --config config/gateway.yaml" in (ROOT / "Makefile").read_text()
    gw = GatewayProcess(ROOT / "config" / "gateway.yaml", tmp_path / "gw.log", env=env)
    gw.start(wait_for=("127.0.0.1", ports["mqtt"]))
    outputs: list[tuple[str, str, str]] = []
    try:
        wait_port("127.0.0.1", kafka)  # the embedded broker answers where the log says
        for command, comment in steps[1:]:
            out = subprocess.run(walkthrough_argv(command, ports), capture_output=True,
                                 text=True, cwd=ROOT, timeout=60, env={**os.environ, **env})
            assert out.returncode == 0, (command, out.stderr)
            outputs.append((command, comment, out.stdout))
    finally:
        code = gw.stop(signal.SIGTERM)
    assert code == 0, gw.log_text()[-3000:]
    checked = 0
    for command, comment, stdout in outputs:
        if comment.startswith("prints: "):  # lastmile consume
            assert stdout.splitlines() == [comment.removeprefix("prints: ")], stdout
            checked += 1
        elif command.endswith("/readyz"):
            body = json.loads(stdout)
            assert body["ready"] is True and body["rules_version"] and body["workers"]
            checked += 1
        elif "/v1/publish/" in command:
            assert json.loads(stdout)["deliveries"][0]["topic"] == "mobile.events", stdout
            checked += 1
        elif " rules test " in command:
            topic, key = re.fullmatch(r"topic (\S+), key (\S+)", comment).groups()  # type: ignore[union-attr]
            assert f"topic {topic} key '{key}'" in stdout, stdout
            checked += 1
    assert checked == 4, outputs
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
        "auth: {allow_anonymous: true}\n"
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
