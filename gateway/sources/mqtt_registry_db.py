"""The session registry's shared store: one SQLite file (WAL) for the workers of one gateway.

The supervisor creates the directory and the schema (``create``) and, when a
worker dies, orphans what it held (``forget_worker``); each worker opens its
own connection (``RegistryDb``).  Three tables:

- ``workers``: worker id -> generation of the live incarnation.  A generation
  that is not here is dead: nothing it held is waited for.
- ``clients``: client id -> owning worker, its generation, the claim (a fresh
  random number per CONNECT) and when the kept state expires (NULL: connected).
- ``qos2``: unreleased QoS 2 packet ids written at a handover: done (a verdict,
  with its reason code) or in progress (``done = 0``), with the generation that
  will write the verdict (``holder_gen``).
- ``seqs``: a session's stamp counter (``kafka.sequence``: session id, last number)
  written at a handover beside its QoS 2 ids, read by the new owner.

Nothing is written per message: rows are written per CONNECT, per disconnect
and per handover (so a stamp counter survives a handover, never a dead worker).
Clocks are ``CLOCK_MONOTONIC`` seconds (the event loops' ``time()``), the same
in every process of one machine.  Durability is not wanted (the file lives as
long as the process tree): ``synchronous=OFF``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ENV = "LASTMILE_SESSIONS_DIR"  # set by the supervisor for its workers
DB_NAME = "sessions.sqlite3"
ORPHAN_KEEP_S = 24 * 3600.0  # state of a dead worker's connected clients: kept this long
BUSY_TIMEOUT_S = 5.0  # waiting for another worker's write lock longer than this is an error
ORPHAN_BATCH = 2000  # expired rows of dead workers removed per orphan sweep, at most

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (worker INTEGER PRIMARY KEY, gen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, worker INTEGER, gen INTEGER, claim INTEGER NOT NULL,
    expires_at REAL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clients_orphans ON clients (expires_at) WHERE worker IS NULL;
CREATE TABLE IF NOT EXISTS qos2 (
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL, done INTEGER NOT NULL,
    code INTEGER NOT NULL, holder_gen INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seqs (
    client_id TEXT PRIMARY KEY, session TEXT NOT NULL, last INTEGER NOT NULL) WITHOUT ROWID;
"""
_ALIVE = "holder_gen IN (SELECT gen FROM workers)"
Row = tuple[int, bool, int, int]  # a handed-over QoS 2 id: packet id, done, code, holder gen


def new_id() -> int:
    """A random positive 62-bit number (generations and claims never repeat in practice)."""
    return int.from_bytes(os.urandom(8), "big") >> 2


def connect(directory: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(Path(directory) / DB_NAME, isolation_level=None)
    # SQLite's own busy handler sleeps up to 100 ms at a time: a whole event loop would
    # stall behind a lock holder that was merely descheduled.  ``_begin`` waits in 0.1-2 ms
    # steps instead.
    db.execute("PRAGMA busy_timeout = 0")
    db.execute("PRAGMA synchronous = OFF")
    return db


def create(directory: str | Path) -> None:
    """Make the store for a new process tree (the supervisor, before any worker)."""
    db = connect(directory)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
    finally:
        db.close()


class Busy(Exception):
    """Another worker holds the store's write lock (a transaction asked not to wait)."""


def _begin(db: sqlite3.Connection, wait: bool = True) -> None:
    delay, deadline = 0.0001, time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            if not wait:
                raise Busy from None
        time.sleep(delay)  # another worker writes: its transactions take microseconds
        delay = min(delay * 2, 0.002)


@contextlib.contextmanager
def _txn(db: sqlite3.Connection, wait: bool = True) -> Iterator[sqlite3.Connection]:
    _begin(db, wait)
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _orphan(db: sqlite3.Connection, worker: int, now: float) -> None:
    """Forget a dead incarnation: its clients keep their rows (session present), its
    in-progress QoS 2 verdicts are gone (a retransmission is produced again)."""
    # A scan of ``clients`` (no index on ``worker``): it runs when a worker starts or
    # dies, while an index would be written by every claim and release (~20 % of each).
    db.execute("DELETE FROM workers WHERE worker = ?", (worker,))
    db.execute("UPDATE clients SET worker = NULL, gen = NULL,"
               " expires_at = COALESCE(expires_at, ?) WHERE worker = ?",
               (now + ORPHAN_KEEP_S, worker))
    db.execute(f"DELETE FROM qos2 WHERE done = 0 AND NOT {_ALIVE}")


def _delete_clients(db: sqlite3.Connection, client_ids: list[str]) -> None:
    db.executemany("DELETE FROM qos2 WHERE client_id = ?", [(c,) for c in client_ids])
    db.executemany("DELETE FROM seqs WHERE client_id = ?", [(c,) for c in client_ids])
    db.executemany("DELETE FROM clients WHERE client_id = ?", [(c,) for c in client_ids])


def forget_worker(directory: str | Path, worker: int) -> None:
    """The supervisor saw ``worker`` die: nobody waits for it any more."""
    db = connect(directory)
    try:
        with _txn(db):
            _orphan(db, worker, time.monotonic())
    finally:
        db.close()


class Prev:
    """The row a claim replaced: its owner (None: orphaned), whether that owner is this
    incarnation or another live one, and when its kept state expires (None: connected)."""

    __slots__ = ("alive", "expires_at", "mine", "worker")

    def __init__(self, worker: int | None, expires_at: float | None, alive: bool,
                 mine: bool) -> None:
        self.worker = worker
        self.expires_at = expires_at
        self.alive = alive
        self.mine = mine


class RegistryDb:
    """One worker's connection to the store; every call is one short transaction."""

    def __init__(self, directory: str | Path, worker: int, now: float,
                 max_sessions: int | None = None) -> None:
        self.db = connect(directory)
        self.worker = worker
        self.gen = new_id()
        with _txn(self.db) as db:
            _orphan(db, worker, now)  # a predecessor the supervisor did not report
            db.execute("INSERT INTO workers VALUES (?, ?)", (worker, self.gen))
            if max_sessions is not None:
                # Rows orphaned by dead workers (a crash loop adds some at every restart):
                # at most max_sessions, the soonest to expire go first.
                (orphans,) = db.execute(
                    "SELECT count(*) FROM clients WHERE worker IS NULL").fetchone()
                if orphans > max_sessions:
                    _delete_clients(db, [cid for (cid,) in db.execute(
                        "SELECT client_id FROM clients INDEXED BY clients_orphans"
                        " WHERE worker IS NULL ORDER BY expires_at LIMIT ?",
                        (orphans - max_sessions,))])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error), _txn(self.db) as db:
            db.execute("DELETE FROM workers WHERE worker = ? AND gen = ?",
                       (self.worker, self.gen))
        self.db.close()

    def claim(self, client_id: str) -> tuple[Prev | None, int]:
        """Make this worker the owner of ``client_id``; the row it replaced and the claim.

        A claim of our own row keeps its number: an old owner's answer still counts.
        """
        with _txn(self.db) as db:
            return self._claim(db, client_id)

    def claim_many(self, connects: list[tuple[str, bool]], now: float, *, wait: bool = True
                   ) -> list[tuple[Prev | None, int, list[Row] | None]]:
        """``claim`` for each (client id, clean start), in one transaction (a turn's CONNECTs:
        one write lock, not one per CONNECT).  ``wait`` False: ``Busy`` at once, rather
        than waiting, while another worker holds the lock.

        Where ``SharedSessions.open`` would ``take_rows`` right after the claim, it is done
        here in the same transaction: the id had no live owner elsewhere (its rows are
        ours at once), or it was ours and the clean start voids them.  Else rows is None.
        """
        out: list[tuple[Prev | None, int, list[Row] | None]] = []
        with _txn(self.db, wait) as db:
            for client_id, clean_start in connects:
                prev, claim = self._claim(db, client_id)
                rows = None
                if prev is not None and prev.mine:
                    if clean_start:
                        rows = self._take_rows(db, client_id, False)
                elif prev is None:
                    rows = []  # no row, no ids: they are deleted with it, and written with one
                elif not prev.alive or prev.worker is None:
                    present = not clean_start and (prev.expires_at is None
                                                   or prev.expires_at > now)
                    rows = self._take_rows(db, client_id, present)
                out.append((prev, claim, rows))
        return out

    def _claim(self, db: sqlite3.Connection, client_id: str) -> tuple[Prev | None, int]:
        row = db.execute(
            "SELECT c.worker, c.gen, c.expires_at, w.gen IS NOT NULL, c.claim FROM clients c"
            " LEFT JOIN workers w ON w.worker = c.worker AND w.gen = c.gen"
            " WHERE c.client_id = ?", (client_id,)).fetchone()
        mine = row is not None and row[1] == self.gen
        claim = row[4] if mine else new_id()
        db.execute("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, NULL)",
                   (client_id, self.worker, self.gen, claim))
        if row is None:
            return None, claim
        return Prev(row[0], row[2], bool(row[3]) and not mine, mine), claim

    def rename_claim(self, client_id: str, claim: int) -> int:
        """A new claim number, so a late export for the old one is not written."""
        new = new_id()
        with _txn(self.db) as db:
            db.execute("UPDATE clients SET claim = ? WHERE client_id = ? AND claim = ?",
                       (new, client_id, claim))
        return new

    def release(self, client_id: str, expires_at: float | None,
                evicted: Iterable[str] = ()) -> None:
        """The connection ended; keep the row until ``expires_at`` (None: drop it now).

        ``evicted``: client ids this worker stopped keeping (over max_sessions).
        """
        with _txn(self.db) as db:
            self._release(db, client_id, expires_at, evicted)

    def _release(self, db: sqlite3.Connection, client_id: str, expires_at: float | None,
                 evicted: Iterable[str]) -> None:
        if expires_at is None:
            self._delete_mine(db, client_id)
        else:
            db.execute("UPDATE clients SET expires_at = ? WHERE client_id = ? AND gen = ?",
                       (expires_at, client_id, self.gen))
        for cid in evicted:
            if cid != client_id:
                self._delete_mine(db, cid)

    def release_many(self, releases: Iterable[tuple[str, float | None, Iterable[str]]]) -> None:
        """Several ``release`` calls (client id, expires_at, evicted) in one transaction."""
        with _txn(self.db) as db:
            for client_id, expires_at, evicted in releases:
                self._release(db, client_id, expires_at, evicted)

    def expire(self, client_ids: Iterable[str], now: float, orphans: bool) -> None:
        """Drop this worker's expired rows and (``orphans``) at most ``ORPHAN_BATCH`` expired
        rows of dead workers (an index on their expiry: no scan)."""
        with _txn(self.db) as db:
            for cid in client_ids:
                self._delete_mine(db, cid)
            if orphans:
                _delete_clients(db, [cid for (cid,) in db.execute(
                    "SELECT client_id FROM clients INDEXED BY clients_orphans"
                    " WHERE worker IS NULL AND expires_at <= ? LIMIT ?", (now, ORPHAN_BATCH))])

    def _delete_mine(self, db: sqlite3.Connection, client_id: str) -> None:
        if db.execute("DELETE FROM clients WHERE client_id = ? AND gen = ?",
                      (client_id, self.gen)).rowcount:
            db.execute("DELETE FROM qos2 WHERE client_id = ?", (client_id,))
            db.execute("DELETE FROM seqs WHERE client_id = ?", (client_id,))

    def export(self, client_id: str, claim: int, rows: list[tuple[int, bool, int]],
               sequence: tuple[str, int] | None = None) -> bool:
        """Write this worker's QoS 2 ids of ``client_id`` for the claim that took it over,
        and its stamp counter (session id, last number; None: unused).

        False (nothing written) when that claim is no longer the current one.
        """
        with _txn(self.db) as db:
            row = db.execute("SELECT claim FROM clients WHERE client_id = ?",
                             (client_id,)).fetchone()
            if row is None or row[0] != claim:
                return False
            db.executemany("INSERT OR REPLACE INTO qos2 VALUES (?, ?, ?, ?, ?)",
                           [(client_id, pid, done, code, self.gen) for pid, done, code in rows])
            if sequence is None:
                db.execute("DELETE FROM seqs WHERE client_id = ?", (client_id,))
            else:
                db.execute("INSERT OR REPLACE INTO seqs VALUES (?, ?, ?)", (client_id, *sequence))
        return True

    def take_rows(self, client_id: str, keep: bool) -> list[Row]:
        """The QoS 2 ids handed to this owner: (packet id, done, code, holder generation).

        Verdicts are deleted as they are read (this worker holds them now); in-progress
        rows stay until their verdict arrives; those of dead holders are dropped.
        ``keep`` False (clean start): drop them all.
        """
        with _txn(self.db) as db:
            return self._take_rows(db, client_id, keep)

    @staticmethod
    def _take_rows(db: sqlite3.Connection, client_id: str,
                   keep: bool) -> list[Row]:
        rows: list[Row] = []
        if keep:
            rows = [(pid, bool(done), code, gen) for pid, done, code, gen in db.execute(
                f"SELECT packet_id, done, code, holder_gen FROM qos2"
                f" WHERE client_id = ? AND (done = 1 OR {_ALIVE})", (client_id,))]
            db.execute(f"DELETE FROM qos2 WHERE client_id = ? AND (done = 1 OR NOT {_ALIVE})",
                       (client_id,))
        else:
            db.execute("DELETE FROM qos2 WHERE client_id = ?", (client_id,))
            db.execute("DELETE FROM seqs WHERE client_id = ?", (client_id,))
        return rows

    def take_sequence(self, client_id: str) -> tuple[str, int] | None:
        """The stamp counter the old owner exported at a handover (read and deleted)."""
        with _txn(self.db) as db:
            row = db.execute("SELECT session, last FROM seqs WHERE client_id = ?",
                             (client_id,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM seqs WHERE client_id = ?", (client_id,))
        return None if row is None else (row[0], row[1])

    def verdicts(self, client_id: str) -> tuple[dict[int, int], set[int]]:
        """Verdicts written for ``client_id`` (read and deleted) and the ids still in progress
        at a live holder; an awaited id in neither was lost with its worker.

        Polled by the sweep: a read (no lock) unless there is something to delete.
        """
        done: dict[int, int] = {}
        pending: set[int] = set()
        stale = False
        for pid, is_done, code, alive in self.db.execute(
                f"SELECT packet_id, done, code, {_ALIVE} FROM qos2 WHERE client_id = ?",
                (client_id,)):
            if is_done:
                done[pid] = code
            elif alive:
                pending.add(pid)
            else:
                stale = True
        if done or stale:
            with _txn(self.db) as db:
                db.executemany("DELETE FROM qos2 WHERE client_id = ? AND packet_id = ?"
                               " AND done = 1", [(client_id, pid) for pid in done])
                db.execute(f"DELETE FROM qos2 WHERE client_id = ? AND done = 0 AND NOT {_ALIVE}",
                           (client_id,))
        return done, pending

    def write_verdict(self, client_id: str, packet_id: int, code: int) -> int | None:
        """A late verdict of an exported id; returns the worker that owns the client now."""
        with _txn(self.db) as db:
            db.execute("UPDATE qos2 SET done = 1, code = ? WHERE client_id = ? AND packet_id = ?"
                       " AND holder_gen = ? AND done = 0",
                       (code, client_id, packet_id, self.gen))
            row = db.execute("SELECT worker FROM clients WHERE client_id = ?",
                             (client_id,)).fetchone()
        return None if row is None else row[0]
