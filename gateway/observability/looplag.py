"""How late this worker's event loop runs a timer: the lag every callback waits.

One ``call_later`` chain per worker: each tick asks to run ``interval`` seconds
later and measures how much later it actually ran.  That drift is what an ack
ready to go waits behind (a long callback, a storm of accepts, a blocking
call).  The metrics pump takes the worst drift of each second (a gauge) and
every sample (a histogram).  Cost: ``1 / interval`` timer callbacks a second.
"""

from __future__ import annotations

import asyncio

__all__ = ["LoopLag"]

# Samples kept between two takes (the pump takes once a second; 20 Hz fills ~20).
_MAX_SAMPLES = 1024


class LoopLag:
    """A drift sampler on the running loop: ``start``, then ``take`` periodically."""

    __slots__ = ("_due", "_handle", "_loop", "_max", "_samples", "interval", "worst")

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.worst = 0.0  # the largest lag seen since start
        self._max = 0.0  # the largest lag since the last take
        self._samples: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def take(self) -> tuple[float, list[float]]:
        """The largest lag and every sample since the previous take (then reset)."""
        worst, samples = self._max, self._samples
        self._max, self._samples = 0.0, []
        return worst, samples

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        if lag > self._max:
            self._max = lag
            if lag > self.worst:
                self.worst = lag
        if len(self._samples) < _MAX_SAMPLES:
            self._samples.append(lag)
        self._schedule(now)
