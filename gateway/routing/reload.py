"""Hot reload: watch the rules directory (and SIGHUP) and swap in a valid new set.

A rules edit must never take the gateway down or loosen what it enforces, so a
failed load keeps the old table in force, logs every error and counts it.
Reload is idempotent (the table version is a hash of the files), which lets us
react to any change in the directory, including Kubernetes' ConfigMap symlink
swap, without filtering events by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from gateway.routing.load import load_rules
from gateway.routing.router import Router
from gateway.routing.rules import RulesError

log = structlog.get_logger("lastmile.rules")

EventHook = Callable[[str, dict[str, object]], None]


class RulesReloader:
    def __init__(
        self,
        directory: str | Path,
        router: Router,
        on_event: EventHook | None = None,
        *,
        debounce_ms: int = 200,
        clusters: Collection[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clusters = clusters
        self.router = router
        self.on_event = on_event
        self.debounce_ms = debounce_ms
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_errors: list[str] = []

    def _emit(self, event: str, **fields: object) -> None:
        if self.on_event is not None:
            self.on_event(event, fields)

    def reload(self) -> bool:
        """Load and validate the whole set; swap on success, keep the old rules on failure."""
        try:
            table = load_rules(self.directory, self.clusters)
        except RulesError as exc:
            self.reloads_failed += 1
            self.last_errors = [str(e) for e in exc.errors]
            log.error(
                "rules_reload_failed",
                directory=str(self.directory),
                errors=self.last_errors,
                keeping_version=self.router.table.version,
            )
            self._emit("rules_reload_failed", errors=self.last_errors)
            return False
        self.last_errors = []
        if table.version == self.router.table.version:
            return True  # an event that changed nothing we read (touch, swap file)
        old = self.router.table.version
        self.router.swap(table)
        self.reloads_ok += 1
        log.info(
            "rules_loaded",
            version=table.version,
            previous=old,
            files=list(table.files),
            rules=table.rules,
        )
        self._emit("rules_loaded", version=table.version, files=table.files, rules=table.rules)
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch the directory until cancelled (or ``stop`` is set), reloading on change."""
        import watchfiles  # imported here: only processes that watch pay for it

        async for _changes in watchfiles.awatch(
            self.directory, debounce=self.debounce_ms, stop_event=stop, recursive=True
        ):
            self.reload()
