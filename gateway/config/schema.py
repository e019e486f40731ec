"""Schema of config/gateway.yaml.

Every key has a default that serves; unknown keys are errors (forbid_unknown_fields).
Durations are plain numbers in the unit their name says (``_ms``, ``_s``). Byte sizes
(``Bytes``) are ints of bytes or strings with a unit: ``512MiB``, ``1GiB``, ``10MB``
(gateway/config/sizes.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from gateway.config.sizes import BYTES

# A byte size; "512MiB" and the like are converted before validation.
Bytes = Annotated[int, BYTES]


class Listener(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 0


class TlsListener(Listener, forbid_unknown_fields=True, kw_only=True):
    """A TLS listener; the files are re-read when they change (gateway/tls.py)."""

    enabled: bool = False
    certfile: str | None = None  # PEM: the server certificate, then any intermediates
    keyfile: str | None = None  # PEM, unencrypted
    cafile: str | None = None  # PEM: CAs whose client certificates are accepted
    require_client_cert: bool = False  # with cafile: no certificate, no handshake


# Each listener keeps its own port default when its section is given without one.
class MqttListener(Listener, forbid_unknown_fields=True, kw_only=True):
    port: int = 1883


class MqttsListener(TlsListener, forbid_unknown_fields=True, kw_only=True):
    port: int = 8883


class HttpListener(Listener, forbid_unknown_fields=True, kw_only=True):
    port: int = 8080


class HttpsListener(TlsListener, forbid_unknown_fields=True, kw_only=True):
    """The HTTP routes (and MQTT over WebSocket: WSS) over TLS."""

    port: int = 8443


class MetricsListener(Listener, forbid_unknown_fields=True, kw_only=True):
    """/metrics, /healthz, /readyz: loopback unless the operator opens it."""

    host: str = "127.0.0.1"
    port: int = 9100
    # /healthz fails once a worker's event loop has not ticked for this long.
    stall_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class WebSocketListener(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """MQTT over WebSocket, served on the HTTP and HTTPS listeners."""

    enabled: bool = True
    path: str = "/mqtt"


class Listeners(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mqtt: MqttListener = msgspec.field(default_factory=MqttListener)
    mqtts: MqttsListener = msgspec.field(default_factory=MqttsListener)
    http: HttpListener = msgspec.field(default_factory=HttpListener)
    https: HttpsListener = msgspec.field(default_factory=HttpsListener)
    ws: WebSocketListener = msgspec.field(default_factory=WebSocketListener)
    metrics: MetricsListener = msgspec.field(default_factory=MetricsListener)


class Cluster(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # "embedded" starts the dev-only tansu broker; anything else is a real bootstrap list.
    bootstrap_servers: str = "embedded"
    acks: Literal["all", "1", "0", "-1"] = "all"
    idempotence: bool = True
    linger_ms: int = 5
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    message_timeout_ms: int = 30_000
    queue_max_kbytes: int = 262_144
    queue_max_messages: int = 500_000
    connect_timeout_s: float = 10.0
    # librdkafka settings passed through unchanged (checked for conflicts).
    producer: dict[str, str | int | float | bool] = {}


class Embedded(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 9092


class Kafka(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    clusters: dict[str, Cluster] = msgspec.field(default_factory=lambda: {"default": Cluster()})
    embedded: Embedded = msgspec.field(default_factory=Embedded)


class Rules(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = "bridge-rules"
    watch: bool = True


class Spool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    dir: str = "var/spool"
    # "kafka": ack on the Kafka delivery report, spool only what Kafka cannot take now.
    # "write-ahead": ack after the spool fsync, for every message.
    mode: Literal["kafka", "write-ahead"] = "kafka"
    max_bytes: Bytes = 1 << 30
    segment_bytes: Bytes = 64 << 20
    # Least time between the starts of two group-commit fsyncs; 0: the next batch is
    # written as soon as the previous fsync ends (docs/spool.md, "Group commit").
    fsync_interval_ms: float = 0.0
    # Hand a record to the spool when Kafka has not confirmed it within this time.
    spill_after_ms: int = 2_000


class Buffer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Bytes in flight to Kafka (or the spool) above which device reads pause.
    high_water_bytes: Bytes = 64 << 20
    low_water_bytes: Bytes = 32 << 20


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_connections: int = 100_000  # MQTT (TCP, TLS, WebSocket) per worker process
    max_packet_size: Bytes = 1 << 20
    max_inflight: int = 256  # MQTT 5 Receive Maximum and the 3.1.1 inflight bound
    connect_timeout_s: float = 10.0
    # The longest silence any MQTT connection gets (docs/mqtt.md, "Idle and partial input"):
    # MQTT 5 keep alives of 0 or above it are replaced (Server Keep Alive); a 3.1.1 client
    # asking 0 or more is closed after 1.5 x this of silence.  0: no cap (not recommended).
    max_keepalive_s: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 3_600
    # An MQTT packet not complete this long after its first byte closes the connection.
    partial_packet_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # MQTT 5 Topic Alias Maximum (Mosquitto's default; 0: no aliases), and the bytes of
    # topic names one connection's aliases may hold (over it: DISCONNECT 0x97).
    topic_alias_maximum: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 10
    topic_alias_max_bytes: Annotated[int, msgspec.Meta(ge=1), BYTES] = 64 << 10
    # Disconnected MQTT sessions kept per worker for a reconnect (0: none); over it the one
    # released longest ago is dropped, empty ones first (docs/sessions.md, "Bounds").
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    # Longer MQTT client ids are refused at CONNECT (MQTT 5: 0x85, 3.1.1: 0x02); MQTT
    # guarantees 23.
    max_client_id_bytes: Annotated[int, msgspec.Meta(ge=23, le=65_535), BYTES] = 256
    # MQTT output a client has not read: above it the gateway stops reading that client,
    # and closes it when it stays above for slow_reader_timeout_s (docs/mqtt.md).
    max_write_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096), BYTES] = 64 << 10
    slow_reader_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # New MQTT connections per second per worker (token bucket; burst 0: one second's
    # worth); over it MQTT 5 gets CONNACK 0x9F, 3.1.1 a close.  0: no limit (the default).
    connect_rate_per_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    connect_burst: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Open MQTT connections per source address per worker; more are closed unread.
    # 0: no limit (the default: devices behind carrier NAT share addresses).
    max_connections_per_source: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Downlink (docs/downlink.md): messages queued per subscribing MQTT client, online or
    # offline; past it the policy drops the oldest or the newest (counted).
    downlink_queue: Annotated[int, msgspec.Meta(ge=1)] = 1_000
    downlink_full_policy: Literal["drop-oldest", "drop-newest"] = "drop-oldest"
    http_max_body_bytes: Bytes = 1 << 20
    http_max_batch_records: int = 1_000
    http_rate_per_client: float = 0.0  # requests/s; 0 = unlimited
    http_rate_burst: float = 0.0  # bucket size in requests; 0 = one second's worth
    http_body_timeout_s: float = 30.0
    # A request head (request line and headers) not complete within this is answered 408
    # and closed; a new connection's clock starts when it opens (docs/http.md, "Limits").
    http_header_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # An idle keep-alive connection (no request under way) is closed after this.
    http_keepalive_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 75.0
    # HTTP (and WebSocket) connections per worker process; more are closed at once (0: off).
    http_max_connections: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    # Request-body bytes being read or held per worker; a request that would go over it is
    # answered 503 before its body is read (0: off; a lone request always fits).
    http_max_inflight_body_bytes: Annotated[int, msgspec.Meta(ge=0), BYTES] = 64 << 20
    idempotency_window_s: float = 300.0
    # Bounds on remembered Idempotency-Key answers; the oldest are forgotten first.  The
    # bytes count keys, caller scopes, answers and a fixed overhead per entry.
    idempotency_max_keys: int = 100_000
    idempotency_max_bytes: Bytes = 64 << 20
    # Longer Idempotency-Key values are refused 400 (Stripe's bound).
    idempotency_max_key_bytes: Annotated[int, msgspec.Meta(ge=1, le=8190), BYTES] = 255


class Jwt(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """JWTs as passwords (MQTT) or Bearer tokens (HTTP); the identity is ``sub``."""

    jwks_file: str | None = None  # re-read when it changes
    jwks_url: str | None = None  # fetched at start, then every refresh_s in the background
    refresh_s: float = 300.0
    issuer: str | None = None  # iss must equal this when set
    audience: str | None = None  # aud must contain this when set
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    leeway_s: float = 30.0  # clock skew allowed on exp / nbf


class Auth(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Off by default: say true explicitly to let clients in without credentials.
    allow_anonymous: bool = False
    password_file: str | None = None  # mosquitto_passwd format ($6$ / $7$), re-read on change
    jwt: Jwt | None = None
    # Failed attempts from one source address before its next attempts are held back.
    failures_before_delay: int = 5
    max_failure_delay_s: float = 10.0


class Log(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Downlink(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Kafka to devices (docs/downlink.md); the rules are the ``downlink:`` sections."""

    # Publish a client's will through the uplink rules when its connection ends without
    # DISCONNECT (MQTT 5 will delay honoured).  Off: wills are dropped, as before.
    wills: bool = False
    # Presence events (connect, disconnect with reason, keep-alive timeout, takeover) as JSON
    # records to this Kafka topic, keyed by client id; None: none.
    presence_topic: str | None = None
    presence_cluster: str = "default"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workers: int = 1
    shutdown_timeout_s: float = 15.0
    listeners: Listeners = msgspec.field(default_factory=Listeners)
    kafka: Kafka = msgspec.field(default_factory=Kafka)
    rules: Rules = msgspec.field(default_factory=Rules)
    spool: Spool = msgspec.field(default_factory=Spool)
    buffer: Buffer = msgspec.field(default_factory=Buffer)
    limits: Limits = msgspec.field(default_factory=Limits)
    auth: Auth = msgspec.field(default_factory=Auth)
    log: Log = msgspec.field(default_factory=Log)
    downlink: Downlink = msgspec.field(default_factory=Downlink)
