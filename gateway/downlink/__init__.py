"""Downlink: Kafka records to MQTT subscribers (issue #17).

The sans-IO pieces (docs/downlink.md): ``record`` (the consumed-record shape), ``subscriptions``
(the subscription trie), ``retained`` (retained messages), ``outbound``
(per-client outgoing QoS 1/2 flows and the committable offset watermark),
``subscribe`` (SUBSCRIBE / UNSUBSCRIBE answered) and ``fanout`` (one record to
every subscriber).  Wired by ``service`` (the worker's consumer, fan-out
and delivery, called by the MQTT listener through ``hook``) and ``wills``
(wills and presence).  The downlink rules are ``gateway.routing.downlink``; the
packet side is ``gateway.protocols.mqtt.subscribe_codec``.
"""
