"""The gateway runs under the chart's pod constraints: the rendered gateway.yaml and rules,
uid/gid 10001 with no capabilities and no_new_privs, every mount read-only except a fresh
/tmp (the emptyDir) and the spool directory (the volume). A mount namespace (unshare -m)
stands in for the container; ports and paths are moved by env overrides, as extraEnv
would, so the test shares the box with others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import Engine
from tests.chart.test_chart import docs, gateway_yaml, pod_env
from tests.helpers import ROOT, Broker, free_port, wait_until

pytestmark = pytest.mark.integration

UID = 10001
TOPIC = "chart-pod-sandbox"
# Runs as root inside the new mount namespace, then drops to the pod's user.
SANDBOX = r"""
set -eu
base=$1; repo=$2; shift 2
mount --make-rprivate /
# The checkout (code and .venv) may live under /tmp or /root, which get covered below:
# keep a handle on it and mount it back at the same path, read-only.
mkdir "$base/repo"
mount --bind "$repo" "$base/repo"
# The interpreter lives under /root (0700): show the pod's user only /root/.pyenv.
mount --bind /root/.pyenv "$base/pyenv"
mount -t tmpfs -o mode=755 tmpfs /root
mkdir /root/.pyenv
mount --bind "$base/pyenv" /root/.pyenv
mount --bind "$base/spool" "$base/spool"
for m in / /root/.pyenv; do mount -o remount,bind,ro "$m"; done
mount -t tmpfs -o mode=1777,size=256m tmpfs /tmp
mkdir -p "$repo"
mount --bind "$base/repo" "$repo"
mount -o remount,bind,ro "$repo"
exec setpriv --reuid=10001 --regid=10001 --clear-groups --inh-caps=-all \
  --bounding-set=-all --no-new-privs "$@"
"""


def _sandbox_works() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return "needs root, unshare and setpriv"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m refused here: {probe.stderr.decode().strip()}"
    if not Path(sys.executable).resolve().is_relative_to("/root/.pyenv"):
        return f"the sandbox maps /root/.pyenv only; this Python is {sys.executable}"
    return None


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the pod's user can reach (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lastmile-pod-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def test_gateway_serves_in_the_pods_sandbox(helm: Engine, broker: Broker, base: Path) -> None:
    reason = _sandbox_works()
    if reason:
        pytest.skip(reason)
    rule = ("rules:\n  - {name: t, match: 'devices/{device}/telemetry', "
            "kafka: {topic: %s, key: '{device}'}}\n")
    values = {"auth": {"allowAnonymous": True}, "rules": {"10-t.yaml": rule % TOPIC}}
    case = helm({"pod": {"values": values}})["pod"]
    (base / "pyenv").mkdir()
    (base / "spool").mkdir()
    os.chown(base / "spool", UID, UID)
    (base / "gateway.yaml").write_text(gateway_yaml(case))
    rules = base / "rules"
    rules.mkdir()
    for name, body in docs(case)[("ConfigMap", "lastmile-rules")]["data"].items():
        (rules / name).write_text(body)
    assert yaml.safe_load(gateway_yaml(case))["workers"] == 2
    ports = {"mqtt": free_port(), "http": free_port(), "metrics": free_port()}
    env = {
        "PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONPATH": str(ROOT),
        **pod_env(case),
        "LASTMILE_SPOOL_DIR": str(base / "spool"), "LASTMILE_RULES__DIR": str(rules),
        "LASTMILE_BOOTSTRAP_SERVERS": broker.bootstrap,
        **{f"LASTMILE_LISTENERS__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        **{f"LASTMILE_LISTENERS__{n.upper()}__HOST": "127.0.0.1" for n in ports},
    }
    log = base / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", SANDBOX, "sandbox", str(base), str(ROOT),
             sys.executable, "-m", "gateway.cli", "serve", "--config", str(base / "gateway.yaml")],
            stdout=out, stderr=out, env=env, cwd="/")
    metrics = f"http://127.0.0.1:{ports['metrics']}"
    try:
        wait_until(lambda: proc.poll() is not None or get(f"{metrics}/readyz")[0] == 200,
                   timeout=60)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert get(f"{metrics}/healthz")[0] == 200
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/v1/publish/devices/d1/telemetry",
            data=b'{"t": 21.5}', method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
        (record,) = broker.read(TOPIC, 1)
        assert record.key() == b"d1" and record.value() == b'{"t": 21.5}'
        # Each worker made its spool on the volume, as the pod's user.
        workers = sorted(p.name for p in (base / "spool").iterdir())
        assert workers == ["worker-0", "worker-1"]
        assert all((base / "spool" / w).stat().st_uid == UID for w in workers)
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["level"] != "error" for line in lines), lines[-20:]
