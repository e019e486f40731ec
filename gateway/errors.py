"""The error tree.

Every error carries hints for the I/O layer that reports it: the MQTT 5 reason
code a device sees, the HTTP status an app sees, a stable machine-readable
``code`` for JSON bodies and metrics, and whether retrying may succeed.
Protocol code raises these; only the I/O layer turns them into bytes.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error Lastmile reports to a client or an operator."""

    code: str = "internal_error"
    mqtt_reason: int = 0x80  # Unspecified error
    http_status: int = 500
    retriable: bool = False

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.details = details

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = {k: v for k, v in self.details.items() if v is not None}
        return body


# --- configuration -------------------------------------------------------------


class ConfigError(GatewayError):
    """The configuration is invalid."""

    code = "config_error"

    def __init__(
        self, message: str, *, file: str = "", line: int | None = None, key: str = ""
    ) -> None:
        where = file
        if line is not None:
            where = f"{file}:{line}"
        text = message
        if key:
            text = f"{key}: {text}"
        if where:
            text = f"{where}: {text}"
        super().__init__(text)
        self.reason = message
        self.file = file
        self.line = line
        self.key = key


# --- what a client did wrong ------------------------------------------------------


class ProtocolError(GatewayError):
    """The client broke the protocol."""

    code = "protocol_error"
    mqtt_reason = 0x82
    http_status = 400


class MalformedPacket(ProtocolError):
    """The packet could not be parsed."""

    code = "malformed_packet"
    mqtt_reason = 0x81


class PacketTooLarge(ProtocolError):
    """The packet exceeds the maximum packet size."""

    code = "packet_too_large"
    mqtt_reason = 0x95
    http_status = 413


class RecordTooLarge(PacketTooLarge):
    """The Kafka record (value, key and headers) exceeds what the cluster accepts."""

    code = "record_too_large"
    # 0x95 is not a PUBACK/PUBREC reason code; a packet over the announced Maximum
    # Packet Size gets DISCONNECT 0x95 from the codec instead.  This one is a record
    # that rules made larger than its packet: "not willing to accept".
    mqtt_reason = 0x83


class UnknownPartition(GatewayError):
    """The record names a partition its topic does not have."""

    code = "unknown_partition"
    mqtt_reason = 0x83
    http_status = 404


class NotAuthorized(GatewayError):
    """The client is not allowed to publish here."""

    code = "not_authorized"
    mqtt_reason = 0x87
    http_status = 403


class ReservedHeader(GatewayError):
    """A client-supplied header would set or shadow one the gateway or the rule sets."""

    code = "reserved_header"
    mqtt_reason = 0x99  # the PUBACK code for "the message is not acceptable as sent"
    http_status = 400


class TopicInvalid(GatewayError):
    """The topic name is not valid."""

    code = "topic_invalid"
    mqtt_reason = 0x90
    http_status = 400


class PayloadInvalid(GatewayError):
    """The payload does not have the format its rule requires."""

    code = "payload_invalid"
    mqtt_reason = 0x99
    http_status = 400


class PayloadTooLarge(PayloadInvalid):
    """The payload is larger than its rule allows."""

    code = "payload_too_large"
    mqtt_reason = 0x95
    http_status = 413


class Rejected(GatewayError):
    """A rule rejects messages on this topic."""

    code = "rejected"
    mqtt_reason = 0x83  # Implementation specific error
    http_status = 422


class NoMatchingRule(GatewayError):
    """No rule routes this topic."""

    code = "no_matching_rule"
    mqtt_reason = 0x90
    http_status = 404


class QuotaExceeded(GatewayError):
    """The client exceeded a rate or quota."""

    code = "quota_exceeded"
    mqtt_reason = 0x97
    http_status = 429
    retriable = True


# --- what the gateway or Kafka could not do ----------------------------------------


class Unavailable(GatewayError):
    """The gateway cannot take more right now."""

    code = "unavailable"
    mqtt_reason = 0x89  # Server busy
    http_status = 503
    retriable = True


class ShuttingDown(Unavailable):
    """The gateway is shutting down."""

    code = "shutting_down"
    mqtt_reason = 0x8B


class DeliveryFailed(GatewayError):
    """Kafka did not accept the record."""

    code = "delivery_failed"
    mqtt_reason = 0x80
    http_status = 502

    def __init__(self, message: str = "", *, retriable: bool = False, kafka_code: str = "") -> None:
        super().__init__(message, kafka_code=kafka_code or None)
        self.retriable = retriable
        self.kafka_code = kafka_code


class SpoolError(GatewayError):
    """The durable spool could not store the record."""

    code = "spool_error"
    mqtt_reason = 0x80
    http_status = 503
    retriable = True
