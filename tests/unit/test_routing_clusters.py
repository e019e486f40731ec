"""A rule naming a Kafka cluster the gateway lacks is an error, at startup and on reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.routing import Router, RulesError, RulesReloader, load_rules

pytestmark = pytest.mark.unit

GOOD = 'rules:\n  - {name: t, match: "a/#", kafka: {topic: a}}\n'
BAD = 'rules:\n  - {name: t, match: "a/#", kafka: {topic: a}}\n' \
      '  - {name: edge, match: "b/#", kafka: {topic: b, cluster: edge}}\n'


def test_unknown_cluster_is_located(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(BAD)
    load_rules(tmp_path)  # without a cluster list the set itself is valid
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path, {"default"})
    [err] = info.value.errors
    assert str(err).startswith(f"{tmp_path / 'r.yaml'}:3: edge: kafka.cluster: no Kafka cluster")


def test_reload_with_unknown_cluster_keeps_the_old_rules(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(GOOD)
    router = Router(load_rules(tmp_path, {"default"}))
    before = router.table.version
    reloader = RulesReloader(tmp_path, router, clusters={"default"})
    (tmp_path / "r.yaml").write_text(BAD)
    assert reloader.reload() is False
    assert router.table.version == before and reloader.reloads_failed == 1
