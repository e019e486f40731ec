"""Per-client-id state that outlives a connection (clean session 0 / session expiry).

Today that state is the QoS 2 packet ids not yet released by PUBREL: a client
that reconnects and retransmits one must not get it produced twice.  The
server keeps one ``SessionStore`` per worker; the session reads and writes it
synchronously (no I/O), and the server's sweep calls ``expire``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.protocols.mqtt.events import PublishToken

if TYPE_CHECKING:
    from gateway.protocols.mqtt.session import MqttSession


class ClientState:
    """What one client id keeps between connections."""

    __slots__ = ("expires_at", "owner", "qos2")

    def __init__(self) -> None:
        # QoS 2 packet id -> its token until PUBREL releases it (None until the first).
        self.qos2: dict[int, PublishToken] | None = None
        self.owner: MqttSession | None = None
        self.expires_at: float | None = None  # None: never, while no owner


class SessionStore:
    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[str, ClientState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def open(
        self, client_id: str, clean_start: bool, owner: MqttSession, now: float
    ) -> tuple[ClientState, bool]:
        """The state for a new connection of ``client_id`` and whether it existed."""
        state = self._states.get(client_id)
        present = state is not None and not clean_start and not _expired(state, now)
        if state is None or not present:
            state = ClientState()
            self._states[client_id] = state
        state.owner = owner
        state.expires_at = None
        return state, present

    def release(
        self, client_id: str, state: ClientState, owner: MqttSession, expiry: int | None, now: float
    ) -> None:
        """The connection ended; keep the state ``expiry`` seconds (None: forever)."""
        if state.owner is not owner:
            return  # taken over: the new connection owns it now
        state.owner = None
        if expiry == 0:
            if self._states.get(client_id) is state:
                del self._states[client_id]
            return
        state.expires_at = None if expiry is None else now + expiry

    def expire(self, now: float) -> int:
        """Drop expired state; called from the server's periodic sweep."""
        dead = [cid for cid, st in self._states.items() if st.owner is None and _expired(st, now)]
        for cid in dead:
            del self._states[cid]
        return len(dead)


def _expired(state: ClientState, now: float) -> bool:
    return state.expires_at is not None and state.expires_at <= now
