"""Shared fixtures: a real tansu broker, gateway configs on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, Broker, GatewayProcess, write_config


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One tansu broker for the whole session (topics auto-created, in memory)."""
    b = Broker().start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of the test's own, for tests that pause or stop it."""
    b = Broker().start()
    yield b
    b.stop()


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A copy of the shipped sample rules the test may edit."""
    target = tmp_path / "rules"
    target.mkdir()
    for src in sorted((ROOT / "bridge-rules").glob("*.yaml")):
        (target / src.name).write_text(src.read_text())
    return target


@pytest.fixture
def gateway_factory(tmp_path: Path, broker: Broker, rules_dir: Path):  # type: ignore[no-untyped-def]
    """Build ``lastmile serve`` processes on free ports against a broker."""
    procs: list[GatewayProcess] = []

    def make(
        bootstrap: str | None = None, **overrides: object
    ) -> tuple[GatewayProcess, dict[str, int]]:
        n = len(procs)
        cfg = tmp_path / f"gateway-{n}.yaml"
        ports = write_config(cfg, bootstrap=bootstrap or broker.bootstrap, rules_dir=rules_dir,
                             spool_dir=tmp_path / "spool", **overrides)
        proc = GatewayProcess(cfg, tmp_path / f"gateway-{n}.log")
        procs.append(proc)
        return proc, ports

    yield make
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
