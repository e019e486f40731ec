"""Worker processes sharing every listener (SO_REUSEPORT).

The supervisor starts the embedded dev broker once (if configured), then
``workers`` child processes (``lastmile worker``), each with its own event loop,
Kafka producer per cluster and spool directory.  It restarts a worker that dies,
forwards SIGHUP (rules reload) and turns SIGTERM/SIGINT into a graceful drain
with a deadline; a second signal kills the workers at once.

It serves the metrics listener itself (``/metrics`` summed over the workers,
``/healthz`` and ``/readyz`` judged from every worker's status file: see
``gateway.observability.health``), so the answer is the whole gateway's.

The workers share one MQTT session registry (``sources/mqtt_registry``) in a
directory created here and removed at exit.  When a worker dies, what it owned
there is released at once (``forget_worker``), so its clients reconnect to the
other workers without waiting for it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import structlog

from gateway.app import App
from gateway.config.schema import Config
from gateway.observability import set_worker
from gateway.observability.health import HEALTH_DIR_ENV, WorkerView, read_status
from gateway.sources import mqtt_registry_db

if TYPE_CHECKING:
    from gateway.observability.http import MetricsServer

log = structlog.get_logger("lastmile.supervisor")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


class Supervisor:
    def __init__(self, config: Config, rules_dir: str, config_path: str) -> None:
        self.config = config
        self.rules_dir = rules_dir
        self.config_path = config_path
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, int] = {}
        self.stopping = 0
        self.reload_requested = False
        self.metrics_dir = tempfile.mkdtemp(prefix="lastmile-metrics-")
        # A short path: the workers' AF_UNIX sockets live there (108-byte limit).
        self.sessions_dir = tempfile.mkdtemp(prefix="lastmile-sessions-")
        mqtt_registry_db.create(self.sessions_dir)
        self.health_dir = tempfile.mkdtemp(prefix="lastmile-health-")
        self.stall_timeout_s = config.listeners.metrics.stall_timeout_s

    def _spawn(self, worker_id: int, bootstrap: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "gateway.cli", "worker", "--config", self.config_path,
               "--rules", self.rules_dir, "--worker-id", str(worker_id)]
        for name, servers in bootstrap.items():
            cmd += ["--bootstrap", f"{name}={servers}"]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
               mqtt_registry_db.ENV: self.sessions_dir, HEALTH_DIR_ENV: self.health_dir}
        self.workers[worker_id] = subprocess.Popen(cmd, env=env)
        log.info("worker_started", child_worker=worker_id, child_pid=self.workers[worker_id].pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
            return
        self.stopping += 1

    def _broadcast(self, sig: int) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    # --- health (read by the metrics listener's threads) ---------------------------

    def views(self) -> list[WorkerView]:
        views = []
        for worker_id in range(self.config.workers):
            proc = self.workers.get(worker_id)
            running = proc is not None and proc.returncode is None
            status = read_status(self.health_dir, worker_id) if running else None
            if status is not None and proc is not None and status.get("pid") != proc.pid:
                status = None  # the previous process's, before a restart
            views.append(WorkerView(worker_id, running, status, self.restarts.get(worker_id, 0)))
        return views

    @property
    def draining(self) -> bool:
        return self.stopping > 0

    def _serve_metrics(self) -> MetricsServer | None:
        listener = self.config.listeners.metrics
        if not listener.enabled:
            return None
        from prometheus_client import multiprocess

        from gateway.observability.http import Exposition, MetricsServer
        from gateway.observability.metrics import SupervisorProcess

        workers = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=self.metrics_dir)
        server = MetricsServer(listener, self, Exposition(self, [SupervisorProcess(workers)]))
        server.start()
        return server

    # --- running --------------------------------------------------------------------

    def run(self) -> int:
        set_worker("supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            server = self._serve_metrics()
        except OSError as exc:
            listener = self.config.listeners.metrics
            log.error("metrics_listen_failed", host=listener.host, port=listener.port,
                      error=str(exc))
            self._cleanup_dirs()
            return 1
        # The embedded broker (dev only) is shared by all workers.
        resolver = App(self.config, self.rules_dir)
        try:
            resolver.resolve_embedded()
            for worker_id in range(self.config.workers):
                self._spawn(worker_id, resolver.bootstrap)
            self._watch(resolver.bootstrap)
            return self._drain()
        finally:
            if resolver.embedded is not None:
                resolver.embedded.stop()
            if server is not None:
                server.stop()
            self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        for directory in (self.metrics_dir, self.sessions_dir, self.health_dir):
            shutil.rmtree(directory, ignore_errors=True)

    def _watch(self, bootstrap: dict[str, str]) -> None:
        """Until a stop signal: restart dead workers, forward reloads."""
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                log.info("rules_reload_forwarded", workers=len(self.workers))
                self._broadcast(signal.SIGHUP)
            for worker_id, proc in list(self.workers.items()):
                code = proc.poll()
                if code is None:
                    continue
                self._mark_dead(proc.pid)
                self._forget(worker_id)
                count = self.restarts.get(worker_id, 0)
                self.restarts[worker_id] = count + 1
                delay = RESTART_BACKOFF_S[min(count, len(RESTART_BACKOFF_S) - 1)]
                log.error("worker_died", child_worker=worker_id, child_pid=proc.pid, code=code,
                          restart_in_s=delay)
                time.sleep(delay)
                if not self.stopping:
                    self._spawn(worker_id, bootstrap)
            time.sleep(0.2)

    def _drain(self) -> int:
        log.info("supervisor_stopping", workers=len(self.workers))
        self._broadcast(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout_s + 5
        while time.monotonic() < deadline and self.stopping < 2:
            if all(proc.poll() is not None for proc in self.workers.values()):
                break
            time.sleep(0.1)
        code = 0
        for worker_id, proc in self.workers.items():
            if proc.poll() is None:
                log.warning("worker_killed", child_worker=worker_id, child_pid=proc.pid)
                proc.kill()
                proc.wait()
                code = 1
            self._mark_dead(proc.pid)
        log.info("supervisor_stopped")
        return code

    def _forget(self, worker_id: int) -> None:
        """A dead worker owns no client id any more (its clients may connect elsewhere)."""
        try:
            mqtt_registry_db.forget_worker(self.sessions_dir, worker_id)
        except Exception:
            log.exception("session_registry_cleanup_failed", child_worker=worker_id)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def run_supervisor(config: Config, rules_dir: str, config_path: str) -> int:
    return Supervisor(config, rules_dir, config_path).run()
