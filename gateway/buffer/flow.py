"""The backpressure signal: sources pause reading while it is set."""

from __future__ import annotations

from collections.abc import Callable


class FlowControl:
    """Bytes-based hysteresis: pause above ``high``, resume below ``low``."""

    __slots__ = ("_listeners", "high", "low", "paused", "pending_bytes")

    def __init__(self, high: int, low: int) -> None:
        self.high = high
        self.low = low
        self.pending_bytes = 0
        self.paused = False
        self._listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """``listener(True)`` on pause, ``listener(False)`` on resume. Returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def add(self, nbytes: int) -> None:
        self.pending_bytes += nbytes
        if not self.paused and self.pending_bytes >= self.high:
            self.set(True)

    def remove(self, nbytes: int) -> None:
        self.pending_bytes -= nbytes
        if self.paused and self.pending_bytes <= self.low:
            self.set(False)

    def set(self, paused: bool) -> None:
        """Force the state (e.g. the spool is full regardless of bytes in memory)."""
        if paused == self.paused:
            return
        self.paused = paused
        for listener in list(self._listeners):
            listener(paused)
