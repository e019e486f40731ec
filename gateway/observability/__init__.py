"""Logging, metrics and health.

Logs: ``gateway.observability.logs``; metrics: ``metrics``; the metrics listener
(``/metrics``, ``/healthz``, ``/readyz``): ``http``; worker status: ``health``.
"""

from __future__ import annotations

from gateway.observability.logs import configure_logging, set_worker

__all__ = ["configure_logging", "set_worker"]
