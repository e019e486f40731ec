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


async def edit_until_seen(path: Path, text: str, event: asyncio.Event,
                          timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not event.is_set():
        assert asyncio.get_running_loop().time() < deadline, f"{path.name}: edit never seen"
        await asyncio.to_thread(path.write_text, text)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 1.0)


async def test_watch_picks_up_edits(rules_dir: Path) -> None:
    router = Router(load_rules(rules_dir))
    seen: dict[str, asyncio.Event] = {"rules_loaded": asyncio.Event()}
    seen["rules_reload_failed"] = asyncio.Event()
    reloader = RulesReloader(rules_dir, router, lambda e, _: seen[e].set(), debounce_ms=50)
    task = asyncio.create_task(reloader.run())
    try:
        # The watcher starts in its own time: write again until it has seen the edit.
        await edit_until_seen(rules_dir / "10-r.yaml", V2, seen["rules_loaded"])
        assert _topic(router) == "v2"
        await edit_until_seen(rules_dir / "10-r.yaml", BROKEN, seen["rules_reload_failed"])
        assert _topic(router) == "v2"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
