"""The shared session store's rules, one per test, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sources import mqtt_registry_db as store

pytestmark = pytest.mark.unit


@pytest.fixture
def two(tmp_path: Path) -> tuple[store.RegistryDb, store.RegistryDb]:
    store.create(tmp_path)
    return store.RegistryDb(tmp_path, 0, 0.0), store.RegistryDb(tmp_path, 1, 0.0)


def test_a_claim_names_the_owner_it_replaced(two: tuple[store.RegistryDb, ...]) -> None:
    a, b = two
    assert a.claim("c")[0] is None
    prev, _ = b.claim("c")
    assert prev is not None and (prev.worker, prev.alive, prev.mine) == (0, True, False)
    again, _ = b.claim("c")
    assert again is not None and again.mine


def test_an_export_for_a_claim_that_is_no_longer_current_is_not_written(
    two: tuple[store.RegistryDb, ...]
) -> None:
    a, b = two
    a.claim("c")
    _, claim = b.claim("c")
    b.rename_claim("c", claim)  # b gave up waiting for a
    assert not a.export("c", claim, [(1, True, 0)])
    assert b.take_rows("c", keep=True) == []


def test_verdicts_move_and_in_progress_ids_wait_for_their_holder(
    two: tuple[store.RegistryDb, ...]
) -> None:
    a, b = two
    a.claim("c")
    _, claim = b.claim("c")
    assert a.export("c", claim, [(1, True, 0), (2, False, 0), (3, True, 0x97)])
    rows = sorted(b.take_rows("c", keep=True))
    assert [(pid, done, code) for pid, done, code, _ in rows] == [
        (1, True, 0), (2, False, 0), (3, True, 0x97)]
    assert b.verdicts("c") == ({}, {2})  # verdicts were taken; id 2 is still due
    assert a.write_verdict("c", 2, 0) == 1  # the owner to tell
    assert b.verdicts("c") == ({2: 0}, set())
    assert b.verdicts("c") == ({}, set())  # read once


def test_a_dead_worker_holds_nothing_but_its_clients_keep_their_session(
    tmp_path: Path, two: tuple[store.RegistryDb, ...]
) -> None:
    a, b = two
    a.claim("c")
    _, claim = b.claim("c")
    a.export("c", claim, [(5, False, 0)])
    store.forget_worker(tmp_path, 0)
    assert b.verdicts("c") == ({}, set())  # id 5 lost with its holder
    a.claim("d")
    store.forget_worker(tmp_path, 0)
    prev, _ = b.claim("d")
    assert prev is not None and prev.worker is None and not prev.alive
    assert prev.expires_at is not None  # orphaned: kept for a while, then expired


def test_a_clean_start_drops_ids_left_for_the_client(two: tuple[store.RegistryDb, ...]) -> None:
    a, b = two
    a.claim("c")
    _, claim = b.claim("c")
    a.export("c", claim, [(1, True, 0)])
    assert b.take_rows("c", keep=False) == []
    assert b.take_rows("c", keep=True) == []


def test_claim_many_takes_the_rows_a_claim_would_take_next(
    tmp_path: Path, two: tuple[store.RegistryDb, ...]
) -> None:
    """Per id, claim_many answers what claim and then take_rows would: rows of an id
    nobody alive holds are taken with its claim (kept for a resumed session, dropped for
    a clean start); an id a live worker holds waits for its export (rows None)."""
    a, b = two
    for cid in ("resumed", "clean", "live"):
        a.claim(cid)
        _, claim = b.claim(cid)
        a.export(cid, claim, [(1, True, 0)])
        a.claim(cid)  # a holds it again: b's rows are left for a to take
    a.release("resumed", 100.0)
    a.release("clean", 100.0)
    store.forget_worker(tmp_path, 0)  # nobody alive holds "resumed" and "clean" now
    c = store.RegistryDb(tmp_path, 0, 0.0)
    c.claim("live")
    got = b.claim_many([("resumed", False), ("clean", True), ("live", False)], now=1.0)
    (p1, _, resumed), (p2, _, clean), (p3, _, live) = got
    assert p1 is not None and not p1.alive and [r[:3] for r in resumed or []] == [(1, True, 0)]
    assert p2 is not None and clean == []
    assert p3 is not None and p3.alive and live is None
    assert b.take_rows("resumed", keep=True) == []  # taken once
    mine = b.claim_many([("clean", True)], now=1.0)[0]
    assert mine[0] is not None and mine[0].mine and mine[2] == []
