"""Starts every enabled source listener for one gateway process."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import App


async def start_sources(app: App) -> None:
    """Start listeners in order; each registers its own cleanup on the app."""
    from gateway.observability.http import start_metrics

    await start_metrics(app)
