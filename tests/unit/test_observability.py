"""Log lines, the metrics pump's failures, and the pod-wide health verdict."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway.observability.health import WorkerView, evaluate
from gateway.observability.logs import configure_logging, set_worker
from gateway.observability.metrics import Pump

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_logging() -> Any:
    hook = threading.excepthook
    yield
    set_worker(0)
    structlog.reset_defaults()
    logging.basicConfig(handlers=[], force=True)
    logging.captureWarnings(False)
    threading.excepthook = hook


def _lines_from_children(children: int, lines: int, size: int) -> list[bytes]:
    """``children`` processes log ``lines`` lines of ``size`` bytes each at once into
    one pipe (as workers share the supervisor's stderr); returns what arrived."""
    read_fd, write_fd = os.pipe()
    pids = []
    for n in range(children):
        pid = os.fork()
        if pid == 0:  # child: log, then leave without running the parent's cleanup
            try:
                os.close(read_fd)
                configure_logging("info", "json", file=os.fdopen(write_fd, "w"))
                set_worker(n)
                log = structlog.get_logger("test")
                for i in range(lines):
                    log.info("line", i=i, fill="x" * size)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    os.close(read_fd)
    for pid in pids:
        os.waitpid(pid, 0)
    return data.splitlines()


@pytest.mark.skipif(sys.platform != "linux", reason="fork and pipe semantics of Linux")
def test_two_processes_logging_at_once_never_merge_a_line(restore_logging: Any) -> None:
    lines = _lines_from_children(2, 300, 3_000)  # < PIPE_BUF: one atomic write each
    assert len(lines) == 600
    entries = [json.loads(line) for line in lines]
    for worker in (0, 1):
        mine = [e for e in entries if e["worker"] == worker]
        assert [e["i"] for e in mine] == list(range(300))
        assert len({e["pid"] for e in mine}) == 1


def test_every_line_has_worker_and_pid_first_keys_and_str_for_odd_values(
        tmp_path: Path, restore_logging: Any) -> None:
    out = tmp_path / "log"
    with out.open("w") as fh:
        configure_logging("info", "json", file=fh)
        set_worker("supervisor")
        log = structlog.get_logger("test")
        log.info("plain", path=tmp_path)
        log.info("about_a_child", child_worker=1)
        log.info("explicit", worker=3)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["plain", "about_a_child", "explicit", "failed"]
    for entry in lines:
        assert list(entry)[:5] == ["timestamp", "level", "event", "worker", "pid"]
        assert entry["pid"] == os.getpid()
    assert [e["worker"] for e in lines] == ["supervisor", "supervisor", 3, "supervisor"]
    assert lines[0]["path"] == str(tmp_path)
    assert "ValueError: boom" in lines[3]["exception"]


def test_stdlib_logging_warnings_and_thread_crashes_are_json_lines_too(
        tmp_path: Path, restore_logging: Any) -> None:
    out = tmp_path / "log"
    with out.open("w") as fh:
        configure_logging("info", "json", file=fh)
        set_worker(1)
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("aiohttp.access").info("GET / 200")  # below warning: not shown
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning, stacklevel=1)

        def crash() -> None:
            raise RuntimeError("thread died")

        thread = threading.Thread(target=crash, name="poller")
        thread.start()
        thread.join()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["event"] == "Task exception was never retrieved"
    assert lines[0]["logger"] == "asyncio" and lines[0]["level"] == "error"
    assert "old API" in lines[1]["event"] and lines[1]["logger"] == "py.warnings"
    assert lines[2]["event"] == "thread_failed" and lines[2]["thread"] == "poller"
    assert "RuntimeError: thread died" in lines[2]["exception"]
    assert len(lines) == 3
    assert all(e["worker"] == 1 and e["pid"] == os.getpid() for e in lines)


class _Broken:
    """A pipeline whose counters cannot be read."""

    @property
    def counters(self) -> dict[str, int]:
        raise RuntimeError("half started")


class _Reloader:
    reloads_ok = 0
    reloads_failed = 0


class _App:
    worker_id = 7
    sinks: dict[str, Any] = {}
    router = None
    mqtt = None
    auth = None
    http = None

    def __init__(self) -> None:
        self.pipeline = _Broken()
        self.reloader = _Reloader()


def _value(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_a_failing_component_is_counted_logged_once_a_minute_and_the_rest_goes_on() -> None:
    app = _App()
    pump = Pump(app)  # type: ignore[arg-type]
    failures = REGISTRY.get_sample_value("lastmile_metrics_pump_failures_total") or 0.0
    reloads = _value("lastmile_rules_reloads_total", result="ok")
    with capture_logs() as logs:
        app.reloader.reloads_ok = 2
        pump.tick()
        app.reloader.reloads_ok = 3
        pump.tick()
    assert _value("lastmile_metrics_pump_failures_total") == failures + 2
    # The sections after the broken one were still copied.
    assert _value("lastmile_rules_reloads_total", result="ok") == reloads + 3
    assert _value("lastmile_event_loop_lag_seconds", worker="7") >= 0
    lines = [e for e in logs if e["event"] == "metrics_pump_failed"]
    assert len(lines) == 1  # the second failure within a minute is counted, not logged
    assert lines[0]["section"] == "pipeline" and lines[0]["log_level"] == "error"


def _status(tick: float, started: bool = True, reasons: tuple[str, ...] = (),
            draining: bool = False) -> dict[str, Any]:
    return {"worker": 0, "pid": 1, "tick": tick, "started": started, "draining": draining,
            "rules_version": "v1", "rules": 3, "kafka": {"default": True},
            "reasons": list(reasons)}


@pytest.mark.parametrize(("views", "draining", "live", "ready", "reason"), [
    ([WorkerView(0, True, _status(99.0)), WorkerView(1, True, _status(99.5))],
     False, True, True, None),
    # Wedged: not ticking for longer than the limit.
    ([WorkerView(0, True, _status(99.0)), WorkerView(1, True, _status(80.0))],
     False, False, False, "worker 1: event loop stalled for 20.0 s (limit 10 s)"),
    # Wedged while starting (a long spool recovery): not ready, not killed.
    ([WorkerView(0, True, _status(80.0, started=False, reasons=("starting",)))],
     False, True, False, "worker 0: event loop stalled"),
    # Died, being restarted: the supervisor's business, not liveness's.
    ([WorkerView(0, True, _status(99.0)), WorkerView(1, False, None, restarts=1)],
     False, True, False, "worker 1 is not running (restarting)"),
    ([WorkerView(0, True, None)], False, True, False, "worker 0 is starting"),
    ([WorkerView(0, True, _status(99.0, reasons=("backpressure: sources paused",)))],
     False, True, False, "worker 0: backpressure: sources paused"),
    # Draining: not ready; a worker slow in its drain is not killed for it.
    ([WorkerView(0, True, _status(80.0, draining=True))],
     True, True, False, "draining: the gateway is shutting down"),
])
def test_verdict(views: list[WorkerView], draining: bool, live: bool, ready: bool,
                 reason: str | None) -> None:
    verdict = evaluate(views, draining, stall_timeout_s=10, now=100.0)
    assert (verdict.live, verdict.ready) == (live, ready), verdict.body["reasons"]
    assert verdict.body["ready"] is ready and verdict.body["live"] is live
    if reason is None:
        assert verdict.body["reasons"] == []
    else:
        assert any(r.startswith(reason) for r in verdict.body["reasons"]), verdict.body


def test_downlink_queue_full_drops_and_depth_follow_the_flows() -> None:
    """Drops are summed over the live flows: a session ending with drops does not take
    the counter back, and drops after that are counted again."""
    from types import SimpleNamespace

    from gateway.downlink.outbound import OffsetTracker, OutboundFlow, Outgoing

    flows = {"a": OutboundFlow(queue_limit=2), "b": OutboundFlow(queue_limit=2)}
    downlink = SimpleNamespace(records=0, skipped=0, queued=0, sent=0, too_large=0,
                               dropped_ended=0, flows=flows, links={"a": object()}, trie=[],
                               tracker=OffsetTracker(), consumers=[])
    app = SimpleNamespace(worker_id=0, sinks={}, mqtt=SimpleNamespace(
        lifecycle=None, downlink=downlink))
    pump = Pump(app)  # type: ignore[arg-type]
    before = _value("lastmile_downlink_messages_dropped_total", reason="queue_full")

    def push(cid: str, n: int) -> None:
        for _ in range(n):
            flows[cid].enqueue(Outgoing("cmd/x", b"x", 1))

    push("a", 5)  # 3 over the bound of 2
    pump._downlink()
    assert _value("lastmile_downlink_messages_dropped_total", reason="queue_full") == before + 3
    assert _value("lastmile_downlink_queue_messages", state="waiting") == 2
    assert _value("lastmile_downlink_clients", state="online") == 1
    assert _value("lastmile_downlink_clients", state="offline") == 1
    downlink.dropped_ended += flows.pop("a").dropped  # its session ended (Downlink._end)
    pump._downlink()
    push("b", 4)  # 2 dropped
    pump._downlink()
    assert _value("lastmile_downlink_messages_dropped_total", reason="queue_full") == before + 5
    assert _value("lastmile_downlink_queue_messages", state="waiting") == 2
