"""Downlink: Kafka records to MQTT subscribers (issue #17).

Groundwork only so far, every piece sans-IO and unit-tested (docs/downlink.md):
``record`` (the consumed-record shape), ``subscriptions`` (the subscription
trie), ``outbound`` (per-client outgoing QoS 1/2 flows and the committable
offset watermark).  The downlink rules are ``gateway.routing.downlink``.
"""
