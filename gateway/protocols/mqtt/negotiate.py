"""What CONNECT negotiates: keep alive, session expiry, client id, CONNACK properties.

Pure functions of the CONNECT and the server's limits, kept apart from the
session's state machine so each rule reads (and is tested) on its own.
"""

from __future__ import annotations

import secrets

from gateway.protocols.mqtt import packets as p
from gateway.protocols.mqtt.events import MqttLimits
from gateway.protocols.mqtt.properties import EMPTY, Properties


def default_client_id() -> str:
    """An id for a client that sent none (3.1.1 clean session, or any 5.0 client)."""
    return "lastmile-" + secrets.token_hex(8)


def keep_alive(asked: int, level: int, limits: MqttLimits) -> tuple[int, int | None]:
    """The keep alive in force and, when it differs, the MQTT 5 Server Keep Alive to send.

    ``limits.max_keep_alive`` bounds every connection's silence, 0 ("no keep alive")
    included.  MQTT 5 tells the client (Server Keep Alive); 3.1.1 cannot, so a 3.1.1
    client asking 0 or more than the cap is simply closed after 1.5 x the cap of silence,
    which 3.1.1 allows: "a Server is permitted to disconnect a Client that it determines
    to be inactive or non-responsive at any time" (3.1.2.10).
    """
    cap = limits.max_keep_alive
    if level != 5:
        # 3.1.1 has no way to tell the client another value.
        return (cap if cap and (not asked or asked > cap) else asked), None
    server = limits.server_keep_alive
    if server is None and cap and (not asked or asked > cap):
        server = cap
    if server is None or server == asked:
        return asked, None
    return server, server


def session_expiry(pk: p.Connect, limits: MqttLimits) -> int:
    """Seconds to keep the client's state after the connection ends."""
    if pk.protocol_level == 5:
        asked = (pk.properties or EMPTY).session_expiry_interval or 0
    else:
        asked = 0 if pk.clean_start else 0xFFFFFFFF  # 3.1.1 clean session 0: "forever"
    return min(asked, limits.max_session_expiry)


def connack_properties(
    pk: p.Connect, limits: MqttLimits, assigned: str | None, server_keep: int | None, expiry: int,
    subscriptions: bool = False,
) -> Properties:
    """MQTT 5 CONNACK properties: what the server grants and what it does not offer.

    ``subscriptions``: the downlink serves SUBSCRIBE (wildcards, identifiers and
    shared subscriptions included), so the three "not available" flags are left out
    (absent means available).
    """
    asked = (pk.properties or EMPTY).session_expiry_interval
    unavailable = None if subscriptions else 0
    return Properties(
        assigned_client_identifier=assigned,
        server_keep_alive=server_keep,
        receive_maximum=limits.receive_maximum,
        topic_alias_maximum=limits.topic_alias_maximum or None,
        maximum_packet_size=limits.max_packet_size,
        # Only said when we keep the state for less than the client asked.
        session_expiry_interval=expiry if asked is not None and asked != expiry else None,
        wildcard_subscription_available=unavailable,
        subscription_identifier_available=unavailable,
        shared_subscription_available=unavailable,
    )
