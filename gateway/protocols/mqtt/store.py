"""Per-client-id state that outlives a connection (clean session 0 / session expiry).

That state is the QoS 2 packet ids not yet released by PUBREL (a client that
reconnects and retransmits one must not get it produced twice) and the session's
stamp counter (``kafka.sequence``, docs/rules.md: a resumed session continues it).  The
server keeps one ``SessionStore`` per worker; the session reads and writes it
synchronously (no I/O), and the server's sweep calls ``expire``.

Bounded (docs/sessions.md, "Bounds"):

- A session with a live connection is a ``ClientState`` in ``_states``; it is
  never evicted (``limits.max_connections`` bounds those).
- A released session that holds unreleased QoS 2 ids, or whose stamp counter
  has been used, keeps its ``ClientState`` (``_kept``: client id -> expiry).
  One that holds nothing is only its client id and its expiry (``_empty``):
  enough to answer session present = 1.
- At most ``max_sessions`` released sessions are kept.  Over it, the one
  released longest ago is evicted, first among the empty ones, then among those
  holding QoS 2 ids or a counter (both dicts are in release order).  An evicted client
  reconnects with session present = 0.
- Expiry reads two heaps ordered by expiry time: the sweep's work is
  proportional to what expires, not to what is stored.  Heap entries that a
  reconnect or an eviction made stale are skipped when popped, and a heap is
  rebuilt when its stale entries outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.model import Sequence
from gateway.protocols.mqtt.events import PublishToken

if TYPE_CHECKING:
    from gateway.protocols.mqtt.session import MqttSession

FOREVER = float("inf")
DEFAULT_MAX_SESSIONS = 100_000
_SLACK = 64  # stale heap entries tolerated beyond the live ones before a rebuild


class ClientState(Sequence):
    """What one client id keeps while connected, and after it if it holds QoS 2 ids
    or a used stamp counter.

    It is its own stamp counter (``sequence``): one object per connection, not two.
    """

    __slots__ = ("owner", "qos2")

    def __init__(self) -> None:
        super().__init__()
        # QoS 2 packet id -> its token until PUBREL releases it (None until the first).
        self.qos2: dict[int, PublishToken] | None = None
        self.owner: MqttSession | None = None

    @property
    def sequence(self) -> Sequence:
        """This session's stamp counter: a new session (a new ClientState) starts a new one."""
        return self


class SessionStore:
    __slots__ = ("_empty", "_empty_heap", "_kept", "_kept_heap", "_states", "evicted",
                 "expired", "max_sessions", "on_evict", "refused_client_ids")

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._states: dict[str, ClientState] = {}  # live, and released holding QoS 2 ids
        # Released sessions, oldest release first: client id -> when it expires.
        self._kept: OrderedDict[str, float] = OrderedDict()  # those of _states (QoS 2 ids)
        self._empty: OrderedDict[str, float] = OrderedDict()  # holding nothing
        self._kept_heap: list[tuple[float, str]] = []
        self._empty_heap: list[tuple[float, str]] = []
        # Counters for /metrics (the pump reads them).
        self.evicted = 0
        self.expired = 0
        self.refused_client_ids = 0  # over limits.max_client_id_bytes (counted by the session)
        self.on_evict: Callable[[str, int], None] | None = None  # (client id, QoS 2 ids held)

    def __len__(self) -> int:
        """Client ids known: connected or retained."""
        return len(self._states) + len(self._empty)

    @property
    def retained(self) -> int:
        """Released sessions kept for a reconnect (bounded by ``max_sessions``)."""
        return len(self._kept) + len(self._empty)

    def open(
        self, client_id: str, clean_start: bool, owner: MqttSession, now: float
    ) -> tuple[ClientState, bool]:
        """The state for a new connection of ``client_id`` and whether it existed."""
        expires = self._kept.pop(client_id, None)
        state = self._states.get(client_id)
        if state is not None:
            present = not clean_start and (expires is None or expires > now)
        else:
            expires = self._empty.pop(client_id, None)
            present = expires is not None and not clean_start and expires > now
        if state is None or not present:
            state = ClientState()
            self._states[client_id] = state
        state.owner = owner
        return state, present

    def release(
        self, client_id: str, state: ClientState, owner: MqttSession, expiry: int | None, now: float
    ) -> None:
        """The connection ended; keep the state ``expiry`` seconds (None: forever)."""
        if state.owner is not owner:
            return  # taken over: the new connection owns it now
        state.owner = None
        if self._states.get(client_id) is not state:
            return  # replaced by a clean start of another connection
        if expiry == 0:
            del self._states[client_id]
            return
        expires = FOREVER if expiry is None else now + expiry
        if self._holds(client_id, state):
            self._kept[client_id] = expires
            self._push(self._kept_heap, self._kept, expires, client_id)
        else:
            del self._states[client_id]  # nothing to resume: the id and expiry are enough
            self._empty[client_id] = expires
            self._push(self._empty_heap, self._empty, expires, client_id)
        while self.retained > self.max_sessions:
            self._evict_one()

    def expire(self, now: float) -> int:
        """Drop expired state; called from the server's periodic sweep."""
        return len(self._expire_ids(now))

    # --- internals ---------------------------------------------------------------------

    def _expire_ids(self, now: float) -> list[str]:
        """Drop what expired by ``now``; the client ids dropped."""
        dead: list[str] = []
        for heap, index in ((self._empty_heap, self._empty), (self._kept_heap, self._kept)):
            while heap and heap[0][0] <= now:
                expires, cid = heapq.heappop(heap)
                if index.get(cid) == expires:  # else stale: reconnected or dropped since
                    self._drop(cid)
                    dead.append(cid)
        self.expired += len(dead)
        return dead

    def _holds(self, client_id: str, state: ClientState) -> bool:
        """Whether a released session has something to resume (keeps its ClientState)."""
        return bool(state.qos2) or state.sequence.last > 0

    def _evict_one(self) -> None:
        """Drop the session released longest ago, an empty one if there is one."""
        index = self._empty or self._kept
        cid, _ = index.popitem(last=False)  # its heap entry is stale now
        state = self._drop(cid)
        self.evicted += 1
        self._evicted(cid, len(state.qos2) if state is not None and state.qos2 else 0)

    def _evicted(self, client_id: str, qos2_ids: int) -> None:
        if self.on_evict is not None:
            self.on_evict(client_id, qos2_ids)

    def _drop(self, client_id: str) -> ClientState | None:
        """Forget ``client_id`` entirely (its heap entries become stale)."""
        self._empty.pop(client_id, None)
        self._kept.pop(client_id, None)
        state = self._states.pop(client_id, None)
        if state is not None:
            state.owner = None
        return state

    @staticmethod
    def _push(heap: list[tuple[float, str]], index: OrderedDict[str, float], expires: float,
              client_id: str) -> None:
        heapq.heappush(heap, (expires, client_id))
        if len(heap) > 2 * len(index) + _SLACK:
            # Reconnects left stale entries behind: keep only the live ones.  O(n), paid
            # for by the n / 2 pushes since the last rebuild.
            heap[:] = [(e, c) for c, e in index.items()]
            heapq.heapify(heap)
