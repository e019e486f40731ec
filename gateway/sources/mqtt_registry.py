"""The session registry shared by the workers of one gateway (``workers > 1``).

A client id has one owner worker at a time, recorded in a small SQLite store
(``mqtt_registry_db``) in a directory the supervisor creates.  Each worker reads
a datagram socket in that directory (``Mailbox``).  See docs/sessions.md.

CONNECT on worker B for a client id that worker A owns (connected or keeping
its state):

1. B claims the id in the store (the session's synchronous ``store.open``) and
   holds the connection: the CONNACK stays queued and reading pauses.
2. B sends ``take`` to A.  A ends its connection (MQTT 5: DISCONNECT 0x8E),
   writes the unreleased QoS 2 ids of that client with their verdicts (safe,
   failed, or still in progress) and the session's stamp counter (``kafka.sequence``,
   docs/rules.md), and answers ``released``.
   With downlink rules, A also hands over the client's downlink session (a file named
   by the claim; docs/downlink.md) before it answers.
3. B takes those ids and the counter into the new session, then writes the CONNACK.  An id
   still in progress gets its verdict later: A writes it to the store when the
   pipeline answers and sends ``check`` to the current owner.

A dead A (its socket refuses) holds nothing; a stuck A is given up after
``HANDOVER_TIMEOUT_S``.  QoS 0/1 and steady-state QoS 2 never touch the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.protocols.mqtt.events import MqttLimits, PublishToken
from gateway.protocols.mqtt.session import MqttSession
from gateway.protocols.mqtt.store import ClientState, SessionStore
from gateway.sources.mqtt_registry_db import ENV, Busy, Prev, RegistryDb, Row

if TYPE_CHECKING:
    from gateway.sources.mqtt_server import MqttConnection, MqttServer

log = structlog.get_logger("lastmile.mqtt.registry")

HANDOVER_TIMEOUT_S = 5.0  # a live but unresponsive old owner is given up after this
ORPHAN_SWEEP_EVERY = 60  # sweeps between removals of expired rows of dead workers
SEND_RETRIES = 300  # x 10 ms: a full receiver queue (net.unix.max_dgram_qlen) drains
LOST = 0x80  # what a client sees for an id whose verdict died with its worker


def open_shared(worker: int, limits: MqttLimits, now: float) -> SharedSessions | None:
    """The shared registry when running under the supervisor, else None (in-memory)."""
    directory = os.environ.get(ENV)
    return SharedSessions(directory, worker, limits, now) if directory else None


class Handover:
    __slots__ = ("claim", "clean", "conn", "downlink", "prev", "state", "timer")

    def __init__(self, prev: int, claim: int, clean: bool, state: ClientState,
                 downlink: bool | None = None) -> None:
        self.prev = prev
        self.claim = claim
        self.clean = clean
        self.state = state
        # Take the client's downlink session (docs/downlink.md): kept unless clean.
        self.downlink = not clean if downlink is None else downlink
        self.conn: MqttConnection | None = None
        self.timer: asyncio.TimerHandle | None = None


class SharedSessions(SessionStore):
    """``SessionStore`` whose ownership and unreleased QoS 2 ids move between workers."""

    __slots__ = ("_awaiting", "_claimed", "_closed", "_evicting", "_exported", "_handovers",
                 "_limbo", "_release_scheduled", "_releases", "_sweeps", "db", "mailbox", "server")

    def __init__(self, directory: str, worker: int, limits: MqttLimits, now: float) -> None:
        super().__init__(limits.max_sessions)
        self.db = RegistryDb(directory, worker, now, limits.max_sessions)
        self.mailbox = Mailbox(Path(directory), worker, self._on_message)
        self.server: MqttServer | None = None
        self._handovers: dict[str, Handover] = {}  # claimed, waiting for the old owner
        # Ids taken over while their verdict was still to come: client -> packet id -> token.
        self._awaiting: dict[str, dict[int, PublishToken]] = {}
        self._exported: dict[PublishToken, str] = {}  # our tokens another worker waits for
        # Owner of tokens not attached to any connection yet: acking it changes nothing.
        self._limbo = MqttSession(limits, SessionStore(), now)
        self._sweeps = 0
        self._closed = False
        self._evicting: list[str] = []  # evicted by the release being written
        # Releases not written yet: one transaction per turn of the loop (flush_releases).
        self._releases: list[tuple[str, float | None, list[str]]] = []
        self._release_scheduled = False
        # Claims written ahead for this turn's CONNECTs (claim_many), used by their open().
        self._claimed: dict[str, tuple[Prev | None, int, list[Row] | None]] = {}

    @property
    def handovers(self) -> int:
        """Client ids claimed here, waiting for their old owner to let go."""
        return len(self._handovers)

    def attach(self, server: MqttServer) -> None:
        self.server = server
        self.mailbox.start()

    def close(self) -> None:
        """At shutdown, after the last connection: verdicts arriving later go nowhere."""
        self.flush_releases()
        self._closed = True
        for handover in self._handovers.values():
            if handover.timer is not None:
                handover.timer.cancel()
        self._handovers.clear()
        self.mailbox.close()
        self.db.close()

    # --- SessionStore, called by the sans-IO session -----------------------------

    def claim_many(self, connects: list[tuple[str, bool]], now: float, *,
                   wait: bool = True) -> bool:
        """Claim the client ids (with their clean start flags) of a turn's CONNECTs in one
        transaction, ahead of their ``open`` in the same callback (docs/sessions.md):
        a storm takes the store's write lock once per turn, not once per CONNECT.
        A client id twice in one turn is claimed once: the second ``open`` claims again.
        ``wait`` False: False at once (nothing claimed) while another worker writes."""
        if self._releases:
            self.flush_releases()  # the rows as the last releases left them
        todo: dict[str, bool] = {}
        for client_id, clean_start in connects:
            todo.setdefault(client_id, clean_start)
        items = list(todo.items())
        try:
            claims = self.db.claim_many(items, now, wait=wait)
        except Busy:
            return False
        for (client_id, _), claimed in zip(items, claims, strict=True):
            self._claimed[client_id] = claimed
        return True

    def drop_claims(self) -> None:
        """End of the turn: a claim no ``open`` used (its CONNECT failed on the way) stays
        written (the id is ours until a later CONNECT or our end); said in the log."""
        if self._claimed:
            log.warning("mqtt_registry_claims_unused", clients=len(self._claimed))
            self._claimed.clear()

    def open(self, client_id: str, clean_start: bool, owner: MqttSession,
             now: float) -> tuple[ClientState, bool]:
        if self._releases:
            self.flush_releases()  # this id's row as its last release left it
        claimed = self._claimed.pop(client_id, None) if self._claimed else None
        if claimed is None:
            claimed = self.db.claim_many([(client_id, clean_start)], now)[0]
        prev, claim, rows = claimed
        if prev is not None and prev.mine:
            state, present = super().open(client_id, clean_start, owner, now)
            if not present:  # a new session here: ids kept for the old one are void
                if self._forget_ids(client_id):
                    self.db.rename_claim(client_id, claim)  # its old owner's answer too
                    rows = None  # an export may have come since the claim: take again
                if rows is None:
                    self.db.take_rows(client_id, keep=False)
            return state, present
        self._drop_local(client_id)
        # Ids of a session the client is told is gone must not answer its new messages.
        present = (prev is not None and not clean_start
                   and (prev.expires_at is None or prev.expires_at > now))
        state, _ = super().open(client_id, True, owner, now)
        holder = self._downlink_holder(client_id) if prev is None and not clean_start else None
        if prev is not None and prev.alive and prev.worker is not None:
            self._handovers[client_id] = Handover(prev.worker, claim, not present, state)
        elif holder is not None:  # after a restart: its downlink session is over there
            self._handovers[client_id] = Handover(holder, claim, True, state, downlink=True)
        else:  # nobody, or a dead worker: it holds nothing to wait for (taken with the claim)
            self._adopt(client_id, state, rows if rows is not None
                        else self.db.take_rows(client_id, present))
        return state, present

    def release(self, client_id: str, state: ClientState, owner: MqttSession,
                expiry: int | None, now: float) -> None:
        if self._states.get(client_id) is not state or state.owner is not owner:
            return  # taken over, here or by another worker
        evicted = self._evicting = []
        super().release(client_id, state, owner, expiry, now)  # may evict (max_sessions)
        self._evicting = []
        if expiry == 0 or client_id in evicted:
            self._awaiting.pop(client_id, None)
            self._release_later(client_id, None, evicted)
        else:
            self._release_later(client_id, 1e18 if expiry is None else now + expiry, evicted)

    def _release_later(self, client_id: str, expires_at: float | None,
                       evicted: list[str]) -> None:
        """Write a release with the others of this turn of the loop (docs/sessions.md).

        A storm of disconnects (a cell going away) costs one transaction per turn,
        not one each.  Safe to delay: a row another worker claimed meanwhile is no
        longer ours and the write skips it (rows are matched on our generation).
        """
        self._releases.append((client_id, expires_at, evicted))
        if self._release_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): at once
            self.flush_releases()
            return
        self._release_scheduled = True
        loop.call_soon(self.flush_releases)

    def flush_releases(self) -> None:
        """Write every release queued, in one transaction."""
        self._release_scheduled = False
        batch, self._releases = self._releases, []
        if not batch or self._closed:
            return
        try:
            self.db.release_many(batch)
        except sqlite3.Error:  # the rows stay claimed: their expiry comes from our sweep
            log.exception("mqtt_registry_release_failed", clients=len(batch))

    def _holds(self, client_id: str, state: ClientState) -> bool:
        # Ids still coming from the old owner (its connection ended during the handover).
        return super()._holds(client_id, state) or client_id in self._handovers

    def _evicted(self, client_id: str, qos2_ids: int) -> None:
        self._forget_ids(client_id)
        self._evicting.append(client_id)  # its row goes in the release's transaction
        super()._evicted(client_id, qos2_ids)

    def expire(self, now: float) -> int:
        if self._releases:
            self.flush_releases()
        dead = self._expire_ids(now)  # a heap: proportional to what expires
        for cid in dead:
            self._forget_ids(cid)
        self._sweeps += 1
        orphans = self._sweeps % ORPHAN_SWEEP_EVERY == 0
        try:
            if dead or orphans:
                self.db.expire(dead, now, orphans)
            for cid in list(self._awaiting):
                self._check(cid)  # a verdict whose "check" was lost, or a holder that died
        except sqlite3.Error:
            log.exception("mqtt_registry_sweep_failed")  # the next sweep tries again
        return len(dead)

    # --- called by the server ------------------------------------------------------

    def connected(self, conn: MqttConnection, client_id: str) -> bool:
        """A CONNACK was queued: True while it must wait for the old owner."""
        handover = self._handovers.get(client_id)
        if handover is None or handover.state is not self._states.get(client_id):
            return False
        if handover.conn is not None:  # a second connection while the first one waited
            handover.conn = conn
            return True
        handover.conn = conn
        loop = asyncio.get_running_loop()
        handover.timer = loop.call_later(HANDOVER_TIMEOUT_S, self._timed_out, client_id,
                                         handover.claim)
        downlink = self.server.downlink if self.server is not None else None
        positions = (downlink.begin_take(client_id)
                     if downlink is not None and handover.downlink else None)
        self._send_take(client_id, handover, positions)
        return client_id in self._handovers

    def _send_take(self, client_id: str, handover: Handover, positions: Any) -> None:
        if self._handovers.get(client_id) is not handover:
            return
        if self.mailbox.send(handover.prev, ("take", client_id, self.db.worker,
                                             handover.claim, positions)):
            return
        if handover.clean and handover.downlink:
            # A downlink session in the state file of a worker still starting (a gateway
            # restart): ask again until it listens, or the handover's timer gives up.
            asyncio.get_running_loop().call_later(0.1, self._send_take, client_id, handover,
                                                  positions)
        else:
            self._finish(client_id)  # nobody there: a dead worker holds nothing

    def verdict(self, token: PublishToken, code: int) -> None:
        """The pipeline answered a QoS 2 message; tell its new owner if it moved."""
        client_id = self._exported.pop(token, None)
        if client_id is None or self._closed:
            return
        try:
            owner = self.db.write_verdict(client_id, token.packet_id, code)
        except sqlite3.Error:
            # The new owner's sweep gives the id up when this worker is gone; until then
            # its client waits for a PUBREC (a retransmission is answered when it comes).
            log.exception("mqtt_registry_verdict_failed", client_id=client_id)
            return
        if owner == self.db.worker:
            self._check(client_id)
        elif owner is not None:
            self.mailbox.send(owner, ("check", client_id))

    # --- handover --------------------------------------------------------------------

    def _on_message(self, msg: list[Any]) -> None:
        if self._releases:
            self.flush_releases()
        kind = msg[0]
        if kind == "take":
            self._give_up(msg[1], msg[2], msg[3], msg[4] if len(msg) > 4 else None)
        elif kind == "released":
            handover = self._handovers.get(msg[1])
            if handover is not None and handover.claim == msg[2]:
                self._finish(msg[1])
        elif kind == "check":
            self._check(msg[1])

    def _give_up(self, client_id: str, to_worker: int, claim: int,
                 positions: list[Any] | None = None) -> None:
        """Another worker took ``client_id``: end our connection, write what we hold."""
        server = self.server
        conn = server.unregister(client_id) if server is not None else None
        if conn is not None:
            if conn.held:
                conn.abort()  # it never got its CONNACK: the client simply retries
            else:
                conn.handle_events(conn.session.takeover())
        state = self._states.get(client_id)
        awaiting = self._awaiting.get(client_id, {})
        mine: list[PublishToken] = []
        if state is not None and state.qos2:
            mine = [t for pid, t in state.qos2.items() if awaiting.get(pid) is not t]
        rows = [(t.packet_id, t.done, t.reason_code) for t in mine]
        seq = state.sequence if state is not None else None
        counter = (seq.session, seq.last) if seq is not None and seq.last else None
        self._drop_local(client_id)
        exported = self.db.export(client_id, claim, rows, counter)
        if exported:
            for token in mine:
                if not token.done:
                    self._exported[token] = client_id
        downlink = server.downlink if server is not None else None
        if downlink is None or not exported:
            self.mailbox.send(to_worker, ("released", client_id, claim))
            return

        def released(session: bytes | None) -> None:  # maybe later: the downlink's pace
            if session is not None and not self._closed:
                write_downlink(self.mailbox.directory, claim, session)
            self.mailbox.send(to_worker, ("released", client_id, claim))

        downlink.give(client_id, positions, released)

    def _timed_out(self, client_id: str, claim: int) -> None:
        handover = self._handovers.get(client_id)
        if handover is None or handover.claim != claim:
            return
        log.warning("mqtt_handover_timeout", client_id=client_id, owner_worker=handover.prev)
        self.db.rename_claim(client_id, claim)  # its late answer must not be written
        self._finish(client_id)

    def _finish(self, client_id: str) -> None:
        handover = self._handovers.pop(client_id, None)
        if handover is None:
            return
        if handover.timer is not None:
            handover.timer.cancel()
        downlink = self.server.downlink if self.server is not None else None
        session = (read_downlink(self.mailbox.directory, handover.claim)
                   if downlink is not None and handover.downlink else None)
        if self._states.get(client_id) is not handover.state:
            if client_id in self._states:  # a clean start replaced it here: old ids go
                self.db.take_rows(client_id, keep=False)
            return
        rows = self.db.take_rows(client_id, not handover.clean)
        added = self._adopt(client_id, handover.state, rows)
        if not handover.clean:
            counter = self.db.take_sequence(client_id)
            seq = handover.state.sequence
            if counter is not None and not seq.last:  # else: numbers drawn already here
                seq.session, seq.last = counter
        conn = handover.conn
        if conn is not None:
            if added:
                conn.session.imported_qos2(added)
            if downlink is not None:
                downlink.take(conn.session, session)
            conn.release_hold()

    def _adopt(self, client_id: str, state: ClientState,
               rows: list[tuple[int, bool, int, int]]) -> int:
        """Put handed-over QoS 2 ids into ``state``; returns how many were added."""
        if not rows:
            return 0
        qos2 = state.qos2 if state.qos2 is not None else {}
        state.qos2 = qos2
        added = 0
        for pid, done, code, _gen in rows:
            if pid in qos2:
                continue  # a new message already uses the id (a client that did not wait)
            token = PublishToken(self._limbo, 2, pid)
            if done:
                token.done, token.reason_code, token.sent = True, code, code < 0x80
            else:
                self._awaiting.setdefault(client_id, {})[pid] = token
            qos2[pid] = token
            added += 1
        return added

    def _check(self, client_id: str) -> None:
        """Deliver verdicts written for ids we took over; end the ones lost with a worker."""
        awaiting = self._awaiting.get(client_id)
        if not awaiting:
            self._awaiting.pop(client_id, None)
            return
        done, pending = self.db.verdicts(client_id)
        state = self._states.get(client_id)
        for pid, token in list(awaiting.items()):
            if pid in done:
                del awaiting[pid]
                self._deliver(token, done[pid])
            elif pid not in pending:
                del awaiting[pid]
                self._lost(state, token)
        if not awaiting:
            del self._awaiting[client_id]

    def _deliver(self, token: PublishToken, code: int) -> None:
        if self.server is not None:
            self.server.deliver(token, code, None if code < 0x80 else "failed")
        else:
            token.session.ack(token, code)

    def _lost(self, state: ClientState | None, token: PublishToken) -> None:
        """The worker that would have answered died: a retransmission is produced again."""
        if state is not None and state.qos2 and state.qos2.get(token.packet_id) is token:
            del state.qos2[token.packet_id]
        conn = token.session.context
        if token.session is not self._limbo and conn is not None:
            # The client already waits on this id: disconnect, so it sends it again.
            from gateway.sources.mqtt_server import MqttConnection

            if isinstance(conn, MqttConnection):
                conn.handle_events(token.session.server_disconnect(
                    LOST, "the worker holding this message's verdict died"))

    def _downlink_holder(self, client_id: str) -> int | None:
        downlink = self.server.downlink if self.server is not None else None
        holder = downlink.holder(client_id) if downlink is not None else None
        return holder if holder != self.db.worker else None

    def _drop_local(self, client_id: str) -> None:
        self._drop(client_id)
        self._forget_ids(client_id)

    def _forget_ids(self, client_id: str) -> bool:
        """Stop waiting for ``client_id``'s ids; True if a handover was pending."""
        self._awaiting.pop(client_id, None)
        handover = self._handovers.pop(client_id, None)
        if handover is not None and handover.timer is not None:
            handover.timer.cancel()
        return handover is not None


def _downlink_path(directory: Path, claim: int) -> Path:
    return directory / f"downlink-{claim}.bin"


def write_downlink(directory: Path, claim: int, session: bytes) -> None:
    """The downlink session handed over with ``claim`` (too big for a datagram)."""
    path = _downlink_path(directory, claim)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(session)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("downlink_handover_write_failed", path=str(path), error=str(exc))


def read_downlink(directory: Path, claim: int) -> bytes | None:
    path = _downlink_path(directory, claim)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("downlink_handover_read_failed", path=str(path), error=str(exc))
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    return data


class Mailbox:
    """This worker's AF_UNIX datagram socket, read by the event loop."""

    def __init__(self, directory: Path, worker: int, on_message: Any) -> None:
        self.directory = directory
        self.path = directory / f"worker-{worker}.sock"
        self.on_message = on_message
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # the socket of the incarnation this one replaces
        self.sock.bind(str(self.path))
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def send(self, worker: int, msg: tuple[Any, ...], tries: int = 0) -> bool:
        """False when nobody listens there (a dead worker); a full queue is retried."""
        try:
            self.sock.sendto(msgspec.msgpack.encode(msg),
                             str(self.directory / f"worker-{worker}.sock"))
        except BlockingIOError:
            if tries < SEND_RETRIES and self._loop is not None and self.sock.fileno() >= 0:
                self._loop.call_later(0.01, self.send, worker, msg, tries + 1)
        except OSError:  # no such socket, nobody bound to it, or ours is closed
            return False
        return True

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            try:
                self.on_message(msgspec.msgpack.decode(data))
            except Exception:
                log.exception("mqtt_registry_message_failed")
