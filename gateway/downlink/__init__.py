"""Downlink: Kafka records to MQTT subscribers (issue #17).

Groundwork only so far, every piece sans-IO and unit-tested, none wired
(docs/downlink.md): ``record`` (the consumed-record shape), ``subscriptions``
(the subscription trie), ``retained`` (retained messages), ``outbound``
(per-client outgoing QoS 1/2 flows and the committable offset watermark),
``subscribe`` (SUBSCRIBE / UNSUBSCRIBE answered) and ``fanout`` (one record to
every subscriber).  The downlink rules are ``gateway.routing.downlink``; the
packet side is ``gateway.protocols.mqtt.subscribe_codec``.
"""
