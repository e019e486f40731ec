"""Lastmile benchmarks: MQTT load generator, Kafka checker, runner."""
