"""The backpressure signal: sources pause reading while it is set."""

from __future__ import annotations

from collections.abc import Callable


class FlowControl:
    """Bytes-based hysteresis (pause above ``high``, resume below ``low``) plus named holds.

    A hold (``hold("spool full", True)``) pauses regardless of bytes; the signal
    is paused while the bytes are over the mark or any hold is on.
    """

    __slots__ = ("_holds", "_listeners", "_over", "high", "low", "paused", "pending_bytes")

    def __init__(self, high: int, low: int) -> None:
        self.high = high
        self.low = low
        self.pending_bytes = 0
        self.paused = False
        self._over = False
        self._holds: set[str] = set()
        self._listeners: list[Callable[[bool], None]] = []

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """``listener(True)`` on pause, ``listener(False)`` on resume. Returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def add(self, nbytes: int) -> None:
        self.pending_bytes += nbytes
        if not self._over and self.pending_bytes >= self.high:
            self._over = True
            self._update()

    def remove(self, nbytes: int) -> None:
        self.pending_bytes -= nbytes
        if self._over and self.pending_bytes <= self.low:
            self._over = False
            self._update()

    def hold(self, reason: str, on: bool) -> None:
        """Pause for ``reason`` (spool full, spool broken) until the same hold is released."""
        if on:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        self._update()

    def set(self, paused: bool) -> None:
        """Force the state (tests, operators): a hold of its own."""
        self.hold("forced", paused)

    def _update(self) -> None:
        paused = self._over or bool(self._holds)
        if paused == self.paused:
            return
        self.paused = paused
        for listener in list(self._listeners):
            listener(paused)
