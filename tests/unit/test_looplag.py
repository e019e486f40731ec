"""The event-loop lag sampler sees a callback that blocks the loop."""

from __future__ import annotations

import asyncio
import time

from gateway.observability.looplag import LoopLag


def test_a_blocking_callback_shows_as_lag() -> None:
    async def main() -> tuple[float, list[float], float, list[float]]:
        lag = LoopLag(interval=0.01)
        lag.start()
        await asyncio.sleep(0.1)
        lag.take()  # forget the start-up
        time.sleep(0.3)  # noqa: ASYNC251 (the point: a callback that blocks the loop)
        await asyncio.sleep(0.05)
        worst, samples = lag.take()
        await asyncio.sleep(0.1)
        after, later = lag.take()
        lag.stop()
        return worst, samples, after, later

    worst, samples, after, later = asyncio.run(main())
    assert worst >= 0.25  # the 0.3 s block, seen by the next tick
    assert max(samples) == worst
    assert after < worst and later  # reset by take; sampling goes on
