"""structlog to stderr, one ``write`` per line, ``worker`` and ``pid`` on every line.

Workers share the supervisor's stderr (a pipe under a container runtime).  A line
goes out in one ``os.write`` of its bytes and newline together: the kernel keeps a
write of up to ``PIPE_BUF`` (4096) bytes to a pipe whole, so two processes' lines
never run together.  Python's text and buffered layers may cut a long line into
several writes, so they are bypassed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec
import structlog

__all__ = ["LineLogger", "configure_logging", "set_worker"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Who writes: a worker id (int), or "supervisor".  Set once per process.
_worker: int | str = 0


def set_worker(worker: int | str) -> None:
    """Name this process in every later log line (``worker``)."""
    global _worker
    _worker = worker


def add_process(_logger: Any, _name: str, event: MutableMapping[str, Any]
                ) -> MutableMapping[str, Any]:
    """``worker`` and ``pid`` of the writing process (an explicit ``worker=`` is kept)."""
    event.setdefault("worker", _worker)
    event["pid"] = os.getpid()
    return event


_encoder = msgspec.json.Encoder(enc_hook=str)


_FIRST = ("timestamp", "level", "event", "worker", "pid")


def render_json(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> bytes:
    """The line as JSON bytes, the common keys first; a value JSON cannot carry is
    written as its ``str``."""
    line = {key: event.pop(key) for key in _FIRST if key in event}
    line.update(event)
    return _encoder.encode(line)


class LineLogger:
    """Writes each line with its newline in one ``os.write`` (looping on a short write)."""

    __slots__ = ("_fd", "_file", "_lock")

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file if file is not None else sys.stderr
        try:
            self._fd: int | None = self._file.fileno()
        except (AttributeError, OSError, ValueError):  # a captured stream (tests)
            self._fd = None
        self._lock = threading.Lock()  # the poll and spool threads log too

    def msg(self, message: str | bytes) -> None:
        data = (message.encode("utf-8", "replace") if isinstance(message, str) else message)
        data += b"\n"
        with self._lock:
            if self._fd is None:
                self._file.write(data.decode("utf-8", "replace"))
                self._file.flush()
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._fd, view):]
                except InterruptedError:
                    continue
                except OSError:  # stderr gone (closed pipe): nowhere left to say it
                    return

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineLoggerFactory:
    def __init__(self, file: TextIO | None = None) -> None:
        self._logger = LineLogger(file)

    def __call__(self, *_args: Any) -> LineLogger:
        return self._logger


class StdlibHandler(logging.Handler):
    """Lines of the standard ``logging`` module (asyncio, aiohttp, warnings) as
    structlog lines: the same JSON, ``worker`` and ``pid`` included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            method = record.levelname.lower()
            if method not in ("debug", "info", "warning", "error", "critical"):
                method = "error" if record.levelno >= logging.ERROR else "info"
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(log, method)(record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("lastmile").error(
        "thread_failed", thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def configure_logging(level: str = "info", fmt: str = "auto", file: TextIO | None = None
                      ) -> None:
    """structlog to stderr: JSON when not a TTY (or asked), readable on a TTY.

    The standard ``logging`` module, warnings and exceptions that end a thread
    come out the same way, so every line of stderr is one of ours."""
    out = file if file is not None else sys.stderr
    json_out = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        render_json if json_out else structlog.dev.ConsoleRenderer())
    out.flush()  # anything printed before goes first
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_process,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=LineLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    # Warnings and errors, as Python's last-resort handler printed them before.
    logging.basicConfig(handlers=[StdlibHandler()], force=True,
                        level=max(logging.WARNING, _LEVELS.get(level, logging.INFO)))
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
