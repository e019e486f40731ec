"""Hot reload: a valid edit swaps atomically; a broken edit keeps the old rules."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from gateway.model import Message
from gateway.routing import Router, RulesReloader, load_rules

pytestmark = pytest.mark.unit

V1 = 'rules:\n  - {name: r, match: "t/#", kafka: {topic: v1}}\n'
V2 = 'rules:\n  - {name: r, match: "t/#", kafka: {topic: v2}}\n'
BROKEN = 'rules:\n  - {name: r, match: "t/#", kafka: {topic: "{nope}"}}\n'


def _topic(router: Router) -> str:
    result = router.route(Message(source="mqtt", topic="t/1", payload=b""))
    return result.records[0].topic


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / "10-r.yaml").write_text(V1)
    return tmp_path


def test_reload_swaps_valid_and_keeps_old_on_error(rules_dir: Path) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    router = Router(load_rules(rules_dir))
    reloader = RulesReloader(rules_dir, router, on_event=lambda e, f: events.append((e, f)))
    v1 = router.table.version

    (rules_dir / "10-r.yaml").write_text(BROKEN)
    assert reloader.reload() is False
    assert router.table.version == v1 and _topic(router) == "v1"
    assert reloader.reloads_failed == 1 and reloader.reloads_ok == 0
    assert events[-1][0] == "rules_reload_failed"
    assert "10-r.yaml:2: r: kafka.topic: unknown variable {nope}" in reloader.last_errors[0]

    (rules_dir / "10-r.yaml").write_text(V2)
    assert reloader.reload() is True
    assert router.table.version != v1 and _topic(router) == "v2"
    assert reloader.reloads_ok == 1 and events[-1][0] == "rules_loaded"

    # Nothing changed: no new table, no count (watch events for touched files are common).
    table = router.table
    assert reloader.reload() is True
    assert router.table is table and reloader.reloads_ok == 1


def test_version_depends_on_bytes_and_names(rules_dir: Path) -> None:
    first = load_rules(rules_dir).version
    (rules_dir / "10-r.yaml").write_text(V1 + "# a comment\n")
    assert load_rules(rules_dir).version != first
    (rules_dir / "10-r.yaml").write_text(V1)
    assert load_rules(rules_dir).version == first
    (rules_dir / "10-r.yaml").rename(rules_dir / "20-r.yaml")
    assert load_rules(rules_dir).version != first


async def test_watch_picks_up_edits(rules_dir: Path) -> None:
    router = Router(load_rules(rules_dir))
    seen: dict[str, asyncio.Event] = {"rules_loaded": asyncio.Event()}
    seen["rules_reload_failed"] = asyncio.Event()
    reloader = RulesReloader(rules_dir, router, lambda e, _: seen[e].set(), debounce_ms=50)
    task = asyncio.create_task(reloader.run())
    try:
        await asyncio.sleep(0.3)  # let the watcher start before the edit
        (rules_dir / "10-r.yaml").write_text(V2)
        await asyncio.wait_for(seen["rules_loaded"].wait(), 10)
        assert _topic(router) == "v2"
        (rules_dir / "10-r.yaml").write_text(BROKEN)
        await asyncio.wait_for(seen["rules_reload_failed"].wait(), 10)
        assert _topic(router) == "v2"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
